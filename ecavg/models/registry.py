"""Model registry: one entry per network we name, with its builder, its options and its classifier head.

``MODELS`` maps a name to a ``ModelSpec``. Adding a model is one entry here plus its builder (in ``small.py``,
``torchvision_adapt.py`` or a new module): the builder receives ``num_classes``, ``in_channels``, ``image_size``
and the checked options as keyword arguments. Any other torchvision classification model can be built by name;
its options go to torchvision unchecked and its head is found from its module structure.

The head is what a personalised update keeps local (``update.keep_local = ["head"]``) and what
``load_pretrained`` may replace when the number of classes differs, so it is looked up here and nowhere else.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from torch import nn

from ecavg.config.checks import boolean, int_at_least, number_in
from ecavg.errors import ModelError
from ecavg.models.small import build_cnn, build_mlp
from ecavg.models.torchvision_adapt import (
    TORCHVISION_NOTE,
    build_mobilenet_v2,
    build_resnet,
    build_torchvision,
    torchvision_classification_models,
)
from ecavg.registry import Key


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: `build(num_classes=, in_channels=, image_size=, **options)`, the options it takes
    (in the order they are checked), and `head`, the module path of its final classifier layer."""

    build: Callable[..., nn.Module]
    head: str
    options: Mapping[str, Key] = field(default_factory=dict)

    def checked_options(self, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overridden by `options`, each value checked; an unknown key is a ModelError."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ModelError(
                f"model {name!r}: unknown option(s) {', '.join(repr(k) for k in unknown)}; "
                f"allowed options are {', '.join(sorted(self.options)) or '(none)'}"
            )
        return {
            key: _checked(name, key, options.get(key, option.default), option) for key, option in self.options.items()
        }


_CIFAR_STEM = Key(False, boolean)

MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(
        build_mlp, head="classifier",
        options={"hidden": Key(200, int_at_least(1)), "dropout": Key(0.0, number_in(0.0, 0.99))},
    ),
    # width: channels of the first block, doubled in each next block.
    "cnn": ModelSpec(build_cnn, head="classifier", options={"width": Key(32, int_at_least(1))}),
    "mobilenet_v2": ModelSpec(
        build_mobilenet_v2, head="classifier.1",  # classifier.0 is the Dropout
        options={
            "cifar_stem": _CIFAR_STEM,
            "width_mult": Key(1.0, number_in(0.0, 100.0, lo_open=True)),
            "dropout": Key(0.2, number_in(0.0, 0.99)),
        },
    ),
    "resnet18": ModelSpec(partial(build_resnet, "resnet18"), head="fc", options={"cifar_stem": _CIFAR_STEM}),
    "resnet50": ModelSpec(partial(build_resnet, "resnet50"), head="fc", options={"cifar_stem": _CIFAR_STEM}),
}

# build_model records the name a model was built under here, so that its registry entry can be found again.
MODEL_NAME_ATTRIBUTE = "ecavg_model_name"

# Top-level module names that hold a classifier head: torchvision's names plus our `classifier`.
HEAD_MODULE_NAMES: frozenset[str] = frozenset({"fc", "classifier", "heads", "head"})

_HEAD_LAYER_TYPES = (nn.Linear, nn.Conv2d)  # squeezenet's head is a 1x1 Conv2d
_BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _checked(model: str, key: str, value: Any, option: Key) -> Any:
    problem = option.check(value)
    if problem:
        raise ModelError(f"model {model!r}: option {key!r} {problem}, got {value!r}")
    return value


def available_models() -> list[str]:
    """Our registered names, then a note (last entry) that any torchvision classification model works."""
    return [*MODELS, TORCHVISION_NOTE]


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build a randomly initialised classifier for images of shape [in_channels, image_size, image_size].

    Options per model are those of its ``MODELS`` entry:
      mlp:                 hidden (200), dropout (0.0)
      cnn:                 width (32, channels of the first block; doubled in each next block)
      resnet18, resnet50:  cifar_stem (False)
      mobilenet_v2:        cifar_stem (False), width_mult (1.0), dropout (0.2)
      other torchvision:   passed as keyword arguments to torchvision.models.get_model
    """
    if not isinstance(name, str) or not name:
        raise ModelError(f"model name must be a non-empty string, got {name!r}")
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelError(f"model {name!r}: {key} must be a positive integer, got {value!r}")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ModelError(f"model {name!r}: options must be a mapping, got {type(options).__name__}")
    options = dict(options)
    sizes = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}

    spec = MODELS.get(name)
    if spec is not None:
        model = spec.build(**sizes, **spec.checked_options(name, options))
    else:
        torchvision_names = torchvision_classification_models()
        if name not in torchvision_names:
            close = difflib.get_close_matches(name, list(dict.fromkeys([*MODELS, *torchvision_names])), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ModelError(
                f"unknown model {name!r}; available: {', '.join(MODELS)}, or {TORCHVISION_NOTE}.{hint}"
            )
        model = build_torchvision(name, **sizes, options=options)
    setattr(model, MODEL_NAME_ATTRIBUTE, name)
    return model


def _model_label(model: nn.Module) -> str:
    name = getattr(model, MODEL_NAME_ATTRIBUTE, None)
    return f"model {name!r}" if isinstance(name, str) else f"model of type {type(model).__name__}"


def _head_from_structure(model: nn.Module) -> tuple[str, nn.Module]:
    """The last Linear/Conv2d of the model, provided it sits in its one top-level head module.

    True of every torchvision classification model (their heads are fc, classifier[-1], heads.head or head);
    anything else is refused rather than guessed.
    """
    label = _model_label(model)
    containers = [child for child, _ in model.named_children() if child in HEAD_MODULE_NAMES]
    if len(containers) != 1:
        found = f"found {', '.join(containers)}" if containers else "found none"
        raise ModelError(
            f"{label}: cannot identify its classifier head: expected one top-level module named "
            f"{', '.join(sorted(HEAD_MODULE_NAMES))}, {found}"
        )
    layers = [path for path, module in model.named_modules() if isinstance(module, _HEAD_LAYER_TYPES)]
    container = containers[0]
    if not layers or not (layers[-1] == container or layers[-1].startswith(container + ".")):
        last = f"its last Linear/Conv2d is {layers[-1]!r}" if layers else "it has no Linear/Conv2d layer"
        raise ModelError(f"{label}: cannot identify its classifier head: {last}, not inside {container!r}")
    return layers[-1], model.get_submodule(layers[-1])


def classifier_head(model: nn.Module) -> tuple[str, nn.Module]:
    """(module path, module) of the model's final classifier layer, as its registry entry declares it.

    Models built by name outside ``MODELS`` (other torchvision models) and models not built by ``build_model``
    have their head found from their module structure. A ModelError naming the model when there is none.
    """
    spec = MODELS.get(getattr(model, MODEL_NAME_ATTRIBUTE, None))
    if spec is None:
        return _head_from_structure(model)
    try:
        head = model.get_submodule(spec.head)
    except AttributeError:
        raise ModelError(f"{_model_label(model)}: its classifier head {spec.head!r} is missing") from None
    if not isinstance(head, _HEAD_LAYER_TYPES):
        raise ModelError(
            f"{_model_label(model)}: its classifier head {spec.head!r} is a {type(head).__name__}, "
            "not a Linear or Conv2d layer"
        )
    return spec.head, head


def head_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the classifier head (its weight and bias); a ModelError when there is no head."""
    path, head = classifier_head(model)
    return [f"{path}.{key}" for key in head.state_dict()]


def batchnorm_keys(model: nn.Module) -> list[str]:
    """State-dict keys of every BatchNorm layer: weight, bias, running statistics and batch counter.

    Empty for a model without BatchNorm (the MLP); callers that need some decide whether that is an error.
    """
    keys: list[str] = []
    for path, module in model.named_modules():
        if isinstance(module, _BATCHNORM_TYPES):
            keys.extend(f"{path}.{key}" if path else key for key in module.state_dict())
    return keys
