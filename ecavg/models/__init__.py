"""Model construction and pretrained-weight loading (plain PyTorch, no runtime knowledge).

registry.py: the named models (builder, options, classifier head); small.py: our MLP and CNN;
torchvision_adapt.py: torchvision networks adapted to small images; pretrained.py: local weight files.
"""

from ecavg.errors import ModelError
from ecavg.models.pretrained import load_pretrained
from ecavg.models.registry import (
    MODEL_NAME_ATTRIBUTE,
    MODELS,
    ModelSpec,
    available_models,
    batchnorm_keys,
    build_model,
    classifier_head,
    head_keys,
)
from ecavg.models.torchvision_adapt import uses_channels_last

__all__ = [
    "MODELS",
    "MODEL_NAME_ATTRIBUTE",
    "ModelError",
    "ModelSpec",
    "available_models",
    "batchnorm_keys",
    "build_model",
    "classifier_head",
    "head_keys",
    "load_pretrained",
    "uses_channels_last",
]
