"""Torchvision networks adapted to small images: CIFAR stems, a first conv for 1-channel data, fast small maps.

Weights are never downloaded here: every model starts randomly initialised (``pretrained.py`` reads local files).
Option values arrive already checked by the model registry (``registry.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ecavg.errors import ModelError
from ecavg.models.small_map import use_small_map_convs

__all__ = [
    "TORCHVISION_NOTE",
    "build_mobilenet_v2",
    "build_resnet",
    "build_torchvision",
    "first_conv",
    "torchvision_classification_models",
    "uses_channels_last",
]

TORCHVISION_NOTE = (
    "any torchvision classification model by name, e.g. shufflenet_v2_x0_5, efficientnet_b0 "
    "(see torchvision.models.list_models(module=torchvision.models))"
)


def _tv_models():
    """torchvision.models, imported on first use: the import costs seconds per process (every Flower ClientApp
    process pays it), and the MLP and CNN do not need it."""
    import torchvision.models

    return torchvision.models


def torchvision_classification_models() -> list[str]:
    return list(_tv_models().list_models(module=_tv_models()))


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first Conv2d in registration order, which for torchvision classifiers is the one applied first."""
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return module_name, module
    return None


def uses_channels_last(model: nn.Module) -> bool:
    """True when the model has Conv2d layers, where channels_last memory format pays off (also on CPU)."""
    return any(isinstance(module, nn.Conv2d) for module in model.modules())


def _replace_module(model: nn.Module, dotted_name: str, new_module: nn.Module) -> None:
    parent_name, _, child_name = dotted_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new_module)


def _new_conv_like(
    conv: nn.Conv2d,
    *,
    in_channels: int,
    kernel_size: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] | str | None = None,
) -> nn.Conv2d:
    """A fresh Conv2d with the same output channels as `conv`, initialised like torchvision's CNNs."""
    new_conv = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size if kernel_size is None else kernel_size,
        stride=conv.stride if stride is None else stride,
        padding=conv.padding if padding is None else padding,
        dilation=conv.dilation,
        groups=1,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    # torchvision's ResNet/MobileNet/EfficientNet use He init with fan_out for their convolutions.
    nn.init.kaiming_normal_(new_conv.weight, mode="fan_out", nonlinearity="relu")
    if new_conv.bias is not None:
        nn.init.zeros_(new_conv.bias)
    return new_conv


def _adapt_input_channels(model: nn.Module, name: str, in_channels: int) -> None:
    """Replace the first conv when the data does not have the 3 channels torchvision networks expect."""
    found = first_conv(model)
    if found is None:
        raise ModelError(f"model {name!r} has no Conv2d layer, so its input channels cannot be set to {in_channels}")
    conv_name, conv = found
    if conv.in_channels == in_channels:
        return
    if conv.groups != 1:
        raise ModelError(
            f"model {name!r}: first conv {conv_name!r} is grouped (groups={conv.groups}); "
            f"cannot change its input channels to {in_channels}"
        )
    _replace_module(model, conv_name, _new_conv_like(conv, in_channels=in_channels))


def _with_small_map_convs(model: nn.Module) -> nn.Module:
    # Torchvision networks on small images end at 2x2 / 1x1 maps, where CPU convolution backward is very slow;
    # SmallMapConv2d computes those layers another way (same parameters and state-dict keys).
    use_small_map_convs(model)
    return model


def build_resnet(
    name: str, *, num_classes: int, in_channels: int, image_size: int, cifar_stem: bool
) -> nn.Module:
    """torchvision's ResNet `name` (resnet18, resnet50, ...), optionally with the CIFAR stem."""
    del image_size
    model = getattr(_tv_models(), name)(weights=None, num_classes=num_classes)
    if cifar_stem:
        # A 7x7/2 conv plus 3x3/2 max-pool shrinks 32x32 images to 8x8 before the first block; small inputs
        # keep their resolution with a 3x3/1 conv and no pooling (the usual CIFAR ResNet stem).
        model.conv1 = _new_conv_like(model.conv1, in_channels=in_channels, kernel_size=3, stride=1, padding=1)
        model.maxpool = nn.Identity()
    else:
        _adapt_input_channels(model, name, in_channels)
    return _with_small_map_convs(model)


def build_mobilenet_v2(
    *, num_classes: int, in_channels: int, image_size: int, cifar_stem: bool, width_mult: float, dropout: float
) -> nn.Module:
    """torchvision's MobileNetV2, optionally with a stride-1 stem for 32x32 images."""
    del image_size
    model = _tv_models().mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult, dropout=dropout)
    if cifar_stem:
        # Stride 1 in the stem keeps 32x32 inputs at 32x32 into the first inverted residual block.
        stem_conv = model.features[0][0]
        _replace_module(model, "features.0.0", _new_conv_like(stem_conv, in_channels=in_channels, stride=1))
    else:
        _adapt_input_channels(model, "mobilenet_v2", in_channels)
    return _with_small_map_convs(model)


def build_torchvision(
    name: str, *, num_classes: int, in_channels: int, image_size: int, options: Mapping[str, Any]
) -> nn.Module:
    """Any torchvision classification model by name; `options` are passed to torchvision.models.get_model."""
    del image_size
    for forbidden in ("weights", "weights_backbone", "num_classes"):
        if forbidden in options:
            raise ModelError(
                f"model {name!r}: option {forbidden!r} is not allowed (weights are never downloaded here; "
                "num_classes comes from the dataset); load local weights with load_pretrained instead"
            )
    try:
        model = _tv_models().get_model(name, weights=None, num_classes=num_classes, **options)
    except TypeError as err:
        # torchvision builders take **kwargs, so a bad option only shows up as a TypeError from the constructor.
        raise ModelError(f"torchvision model {name!r} rejected options {dict(options)!r}: {err}") from err
    except ValueError as err:
        raise ModelError(f"torchvision model {name!r} could not be built with options {dict(options)!r}: "
                         f"{err}") from err
    _adapt_input_channels(model, name, in_channels)
    return _with_small_map_convs(model)
