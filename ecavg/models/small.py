"""Our own small networks: the ECAvg paper's one-hidden-layer MLP and a three-block CNN.

Both name their final layer ``classifier``; the model registry (``registry.py``) records that as their head.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLP", "SmallCNN", "build_cnn", "build_mlp"]


class MLP(nn.Module):
    """Flatten -> Linear -> ReLU -> (Dropout) -> Linear: the one-hidden-layer network of the ECAvg paper."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.hidden = nn.Linear(in_features, hidden)
        self.activation = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.activation(self.hidden(self.flatten(x)))))


class SmallCNN(nn.Module):
    """Three conv blocks (conv3x3 + BatchNorm + ReLU, then pooling) and a linear head.

    The last block ends in global average pooling, so the same network fits 28x28 MNIST and 32x32 CIFAR.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, pool: nn.Module) -> nn.Sequential:
            # bias=False: the following BatchNorm has its own shift.
            return nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                pool,
            )

        self.features = nn.Sequential(
            block(in_channels, width, nn.MaxPool2d(2)),
            block(width, 2 * width, nn.MaxPool2d(2)),
            block(2 * width, 4 * width, nn.AdaptiveAvgPool2d(1)),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_mlp(*, num_classes: int, in_channels: int, image_size: int, hidden: int, dropout: float) -> nn.Module:
    """The MLP for flattened [in_channels, image_size, image_size] images (options already checked)."""
    return MLP(in_features=in_channels * image_size * image_size, hidden=hidden, num_classes=num_classes,
               dropout=dropout)


def build_cnn(*, num_classes: int, in_channels: int, image_size: int, width: int) -> nn.Module:
    """The small CNN; global average pooling makes it independent of ``image_size``."""
    del image_size
    return SmallCNN(in_channels, num_classes, width=width)
