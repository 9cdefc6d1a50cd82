"""Model registry: builds the networks ECAvg trains and loads pretrained weights into them.

Our own names (``mlp``, ``cnn``) and the adapted torchvision networks (``mobilenet_v2``, ``resnet18``,
``resnet50``) take validated options; any other torchvision classification model can be built by name.
Weights are never downloaded here: every model starts randomly initialised and ``load_pretrained`` only
reads local files.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ecavg.errors import ModelError

__all__ = [
    "ModelError",
    "build_model",
    "load_pretrained",
    "available_models",
    "uses_channels_last",
    "HEAD_MODULE_NAMES",
]



# Top-level module names that hold a classifier head: torchvision's names plus our `classifier`.
HEAD_MODULE_NAMES: frozenset[str] = frozenset({"fc", "classifier", "heads", "head"})

# Prefixes added by wrappers around a model (DataParallel/DDP, torch.compile) that are not part of its keys.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_TORCHVISION_NOTE = (
    "any torchvision classification model by name, e.g. shufflenet_v2_x0_5, efficientnet_b0 "
    "(see torchvision.models.list_models(module=torchvision.models))"
)


# --------------------------------------------------------------------------------------------------
# Our own small models
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Option validation
# --------------------------------------------------------------------------------------------------


def _check_option_keys(name: str, options: Mapping[str, Any], allowed: Mapping[str, Any]) -> dict[str, Any]:
    """Return `allowed` defaults overridden by `options`; an unknown key is a ModelError."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ModelError(
            f"model {name!r}: unknown option(s) {', '.join(repr(k) for k in unknown)}; "
            f"allowed options are {', '.join(sorted(allowed)) or '(none)'}"
        )
    return {**allowed, **options}


def _positive_int(name: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelError(f"model {name!r}: option {key!r} must be a positive integer, got {value!r}")
    return value


def _positive_float(name: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ModelError(f"model {name!r}: option {key!r} must be a positive number, got {value!r}")
    return float(value)


def _probability(name: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ModelError(f"model {name!r}: option {key!r} must be a number in [0, 1), got {value!r}")
    return float(value)


def _boolean(name: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ModelError(f"model {name!r}: option {key!r} must be true or false, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------------
# Helpers for adapting torchvision networks
# --------------------------------------------------------------------------------------------------


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first Conv2d in registration order, which for torchvision classifiers is the one applied first."""
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return module_name, module
    return None


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
    found = _first_conv(model)
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


def _build_resnet(
    name: str, factory: Callable[..., nn.Module], num_classes: int, in_channels: int, options: Mapping[str, Any]
) -> nn.Module:
    opts = _check_option_keys(name, options, {"cifar_stem": False})
    cifar_stem = _boolean(name, "cifar_stem", opts["cifar_stem"])
    model = factory(weights=None, num_classes=num_classes)
    if cifar_stem:
        # A 7x7/2 conv plus 3x3/2 max-pool shrinks 32x32 images to 8x8 before the first block; small inputs
        # keep their resolution with a 3x3/1 conv and no pooling (the usual CIFAR ResNet stem).
        model.conv1 = _new_conv_like(model.conv1, in_channels=in_channels, kernel_size=3, stride=1, padding=1)
        model.maxpool = nn.Identity()
    else:
        _adapt_input_channels(model, name, in_channels)
    return model


def _tv_models():
    """torchvision.models, imported on first use: the import costs seconds per process (every Flower ClientApp
    process pays it), and the MLP and CNN do not need it."""
    import torchvision.models

    return torchvision.models


def _build_mobilenet_v2(name: str, num_classes: int, in_channels: int, options: Mapping[str, Any]) -> nn.Module:
    opts = _check_option_keys(name, options, {"cifar_stem": False, "width_mult": 1.0, "dropout": 0.2})
    cifar_stem = _boolean(name, "cifar_stem", opts["cifar_stem"])
    model = _tv_models().mobilenet_v2(
        weights=None,
        num_classes=num_classes,
        width_mult=_positive_float(name, "width_mult", opts["width_mult"]),
        dropout=_probability(name, "dropout", opts["dropout"]),
    )
    if cifar_stem:
        # Stride 1 in the stem keeps 32x32 inputs at 32x32 into the first inverted residual block.
        stem_conv = model.features[0][0]
        _replace_module(model, "features.0.0", _new_conv_like(stem_conv, in_channels=in_channels, stride=1))
    else:
        _adapt_input_channels(model, name, in_channels)
    return model


def _build_torchvision(name: str, num_classes: int, in_channels: int, options: Mapping[str, Any]) -> nn.Module:
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
        raise ModelError(f"torchvision model {name!r} could not be built with options {dict(options)!r}: {err}") from err
    _adapt_input_channels(model, name, in_channels)
    return model


def _torchvision_classification_models() -> list[str]:
    return list(_tv_models().list_models(module=_tv_models()))


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------

_OWN_MODELS = ("mlp", "cnn", "mobilenet_v2", "resnet18", "resnet50")


def available_models() -> list[str]:
    """Our registered names, then a note (last entry) that any torchvision classification model works."""
    return [*_OWN_MODELS, _TORCHVISION_NOTE]


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build a randomly initialised classifier for images of shape [in_channels, image_size, image_size].

    Options per model:
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

    if name == "mlp":
        opts = _check_option_keys(name, options, {"hidden": 200, "dropout": 0.0})
        return MLP(
            in_features=in_channels * image_size * image_size,
            hidden=_positive_int(name, "hidden", opts["hidden"]),
            num_classes=num_classes,
            dropout=_probability(name, "dropout", opts["dropout"]),
        )
    if name == "cnn":
        opts = _check_option_keys(name, options, {"width": 32})
        return SmallCNN(in_channels, num_classes, width=_positive_int(name, "width", opts["width"]))
    # Torchvision networks on small images end at 2x2 / 1x1 maps, where CPU convolution backward is very slow;
    # SmallMapConv2d computes those layers another way (same parameters and state-dict keys).
    if name == "resnet18":
        return _small_maps(_build_resnet(name, _tv_models().resnet18, num_classes, in_channels, options))
    if name == "resnet50":
        return _small_maps(_build_resnet(name, _tv_models().resnet50, num_classes, in_channels, options))
    if name == "mobilenet_v2":
        return _small_maps(_build_mobilenet_v2(name, num_classes, in_channels, options))

    torchvision_names = _torchvision_classification_models()
    if name in torchvision_names:
        return _small_maps(_build_torchvision(name, num_classes, in_channels, options))

    close = difflib.get_close_matches(name, list(dict.fromkeys([*_OWN_MODELS, *torchvision_names])), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ModelError(f"unknown model {name!r}; available: {', '.join(_OWN_MODELS)}, or {_TORCHVISION_NOTE}.{hint}")


def _small_maps(model: nn.Module) -> nn.Module:
    from ecavg.models.small_map import use_small_map_convs

    use_small_map_convs(model)
    return model


def uses_channels_last(model: nn.Module) -> bool:
    """True when the model has Conv2d layers, where channels_last memory format pays off (also on CPU)."""
    return any(isinstance(module, nn.Conv2d) for module in model.modules())


def _is_head_key(key: str) -> bool:
    return key.split(".", 1)[0] in HEAD_MODULE_NAMES


def _strip_wrapper_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                stripped = True
    return key


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"pretrained weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            loaded: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise ModelError(f"cannot read safetensors weights {path}: {err}") from err
    else:
        try:
            # weights_only=True: a checkpoint must not be able to run code when it is loaded.
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
            raise ModelError(
                f"cannot read weights {path} with torch.load(weights_only=True): {type(err).__name__}: {err}"
            ) from err

    if isinstance(loaded, Mapping):
        for container_key in ("state_dict", "model"):
            if isinstance(loaded.get(container_key), Mapping):
                loaded = loaded[container_key]
                break
    if not isinstance(loaded, Mapping):
        raise ModelError(f"weights file {path} holds a {type(loaded).__name__}, not a state dict")

    state: dict[str, torch.Tensor] = {}
    not_tensors: list[str] = []
    for raw_key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            not_tensors.append(str(raw_key))
            continue
        key = _strip_wrapper_prefixes(str(raw_key))
        if key in state:
            raise ModelError(f"weights file {path}: key {key!r} appears twice once wrapper prefixes are stripped")
        state[key] = value
    if not_tensors:
        raise ModelError(f"weights file {path}: entries that are not tensors: {_first_few(not_tensors)}")
    if not state:
        raise ModelError(f"weights file {path} holds no tensors")
    return state


def _first_few(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Load weights from a local `.safetensors` or torch.save file into `model` in place.

    The classifier head (modules named fc, classifier, heads, head) is loaded when its shapes match and
    otherwise left freshly initialised ("head replaced"), one head submodule at a time so that a head layer
    never mixes loaded and fresh tensors. Every other key must match in name and shape. Returns the model
    keys of the head that were not loaded.
    """
    path = Path(path)
    source = _read_state_dict(path)
    target = model.state_dict()

    # Group head tensors by the module that owns them (e.g. "classifier.1"): a module is loaded whole or skipped.
    head_modules: dict[str, list[str]] = {}
    for key in target:
        if _is_head_key(key):
            head_modules.setdefault(key.rpartition(".")[0], []).append(key)
    skipped_head: list[str] = []
    for keys in head_modules.values():
        if not all(k in source and source[k].shape == target[k].shape for k in keys):
            skipped_head.extend(keys)
    skipped_set = set(skipped_head)

    # Checkpoints written before BatchNorm tracked its batch count lack num_batches_tracked; the count
    # only matters for momentum=None, so keeping the model's own value is harmless.
    missing = [
        k for k in target
        if k not in source and k not in skipped_set and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in source if k not in target]
    mismatched = [
        k for k in target
        if k in source and k not in skipped_set and source[k].shape != target[k].shape
    ]

    first_conv = _first_conv(model)
    if first_conv is not None:
        conv_key = f"{first_conv[0]}.weight" if first_conv[0] else "weight"
        if conv_key in mismatched and source[conv_key].dim() == 4:
            src_in, model_in = source[conv_key].shape[1], target[conv_key].shape[1]
            if src_in != model_in and source[conv_key].shape[2:] == target[conv_key].shape[2:]:
                raise ModelError(
                    f"weights {path}: first conv {conv_key!r} was trained on {src_in}-channel input but the model "
                    f"takes {model_in} channels; build the model with in_channels={src_in} or use "
                    f"weights trained on {model_in}-channel data"
                )

    problems = []
    if mismatched:
        problems.append(
            "shape mismatch: "
            + _first_few([f"{k} (file {tuple(source[k].shape)}, model {tuple(target[k].shape)})" for k in mismatched])
        )
    if missing:
        problems.append("missing from file: " + _first_few(missing))
    if unexpected:
        problems.append("not in model: " + _first_few(unexpected))
    if problems:
        raise ModelError(
            f"weights {path} do not fit the {type(model).__name__} model; " + "; ".join(problems)
        )

    to_load = {k: v for k, v in source.items() if k not in skipped_set}
    # strict=False because skipped head keys (and old-style missing BN counters) are absent on purpose;
    # everything else was checked above.
    model.load_state_dict(to_load, strict=False)
    return skipped_head
