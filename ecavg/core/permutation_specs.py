"""Permutation specs: which axes of which state-dict tensors move together when hidden units are reordered.

Permuting the hidden units of a network (output channels of one layer together with the matching input
channels of the next, and the BatchNorm between them) leaves its function unchanged. A
:class:`PermutationSpec` records, for every state-dict key, which permutation group (if any) acts on each
axis. :func:`permutation_spec` derives it from a *built model instance*: the walk follows module types and
the names ``named_modules`` gives, so it does not depend on how the model files are laid out.

Supported (``MATCHABLE_MODELS``): ``mlp``, ``cnn`` (plain chains: every hidden layer's outputs are one
group), ``resnet18`` / ``resnet50`` (the residual stream of a stage is one group shared by the stem or the
stage's downsample conv and every block's last conv; block-internal channels are groups of their own) and
``mobilenet_v2`` (a depthwise conv shares the group of its input, i.e. the expand conv's outputs and the
project conv's inputs; residual blocks share their stage's stream group). Inputs and class logits are
never permuted. BatchNorm ``num_batches_tracked`` is a scalar and is never permuted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from ecavg.errors import AggregationError

__all__ = ["MATCHABLE_MODELS", "PermutationSpec", "permutation_spec"]

MATCHABLE_MODELS: tuple[str, ...] = ("mlp", "cnn", "resnet18", "resnet50", "mobilenet_v2")

Axes = tuple[str | None, ...]


@dataclass(frozen=True)
class PermutationSpec:
    """Per state-dict key, the permutation group acting on each axis (None: axis not permuted).

    ``axes`` lists every key of the model's state dict, in state-dict order; ``sizes`` gives each group's
    number of units. ``members`` (derived) lists, per group, the (key, axis) pairs it permutes.
    """

    model_name: str
    axes: Mapping[str, Axes]
    sizes: Mapping[str, int]
    # Keys that are measured statistics (BatchNorm running mean and variance), not learned weights: permuted with
    # their channels, but no evidence of which units correspond (see ecavg.core.matching).
    statistics: frozenset[str] = frozenset()
    members: Mapping[str, tuple[tuple[str, int], ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        members: dict[str, list[tuple[str, int]]] = {group: [] for group in self.sizes}
        for key, axes in self.axes.items():
            for axis, group in enumerate(axes):
                if group is None:
                    continue
                if group not in members:
                    raise AggregationError(f"permutation spec of {self.model_name!r}: key {key!r} uses unknown "
                                           f"group {group!r}")
                members[group].append((key, axis))
        object.__setattr__(self, "members", {group: tuple(pairs) for group, pairs in members.items()})

    def check_state_dict(self, state_dict: Mapping[str, Tensor], what: str) -> None:
        """Raise AggregationError unless `state_dict` has exactly this spec's keys with fitting shapes."""
        if not isinstance(state_dict, Mapping):
            raise AggregationError(f"{what}: expected a mapping of tensors, got {type(state_dict).__name__}")
        missing = [key for key in self.axes if key not in state_dict]
        if missing:
            raise AggregationError(f"{what}: missing tensor(s) for model {self.model_name!r}: {_first_few(missing)}")
        unexpected = [key for key in state_dict if key not in self.axes]
        if unexpected:
            raise AggregationError(f"{what}: tensor(s) not in model {self.model_name!r}: {_first_few(unexpected)}")
        for key, axes in self.axes.items():
            tensor = state_dict[key]
            if not isinstance(tensor, Tensor):
                raise AggregationError(f"{what}: {key!r} is a {type(tensor).__name__}, not a torch.Tensor")
            if tensor.dim() != len(axes):
                raise AggregationError(
                    f"{what}: tensor {key!r} has {tensor.dim()} dimensions, model {self.model_name!r} has {len(axes)}"
                )
            for axis, group in enumerate(axes):
                if group is not None and tensor.shape[axis] != self.sizes[group]:
                    raise AggregationError(
                        f"{what}: tensor {key!r} has shape {tuple(tensor.shape)}; axis {axis} should have "
                        f"{self.sizes[group]} units (group {group!r})"
                    )


def _first_few(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


class _SpecBuilder:
    """Assigns groups to the state-dict keys of one model, checking sizes as it goes."""

    def __init__(self, model_name: str, model: nn.Module) -> None:
        self.model_name = model_name
        self.state = model.state_dict()
        self.buffers = frozenset(name for name, _ in model.named_buffers())
        self.axes: dict[str, Axes] = {}
        self.sizes: dict[str, int] = {}

    def fail(self, problem: str) -> AggregationError:
        return AggregationError(f"weight matching: model {self.model_name!r} has an unexpected structure: {problem}")

    def assign(self, key: str, axes: Axes) -> None:
        if key not in self.state:
            raise self.fail(f"no state-dict key {key!r}")
        if key in self.axes:
            raise self.fail(f"state-dict key {key!r} reached twice")
        shape = self.state[key].shape
        if len(shape) != len(axes):
            raise self.fail(f"{key!r} has shape {tuple(shape)}, expected {len(axes)} dimensions")
        for axis, group in enumerate(axes):
            if group is None:
                continue
            size = self.sizes.setdefault(group, shape[axis])
            if size != shape[axis]:
                raise self.fail(f"{key!r} axis {axis} has {shape[axis]} units but group {group!r} has {size}")
        self.axes[key] = axes

    def weight_layer(self, name: str, module: nn.Module, p_in: str | None, p_out: str | None) -> None:
        """A Linear or Conv2d: weight [out, in, ...] (depthwise: [channels, 1, ...]), bias [out]."""
        weight = f"{name}.weight"
        if isinstance(module, nn.Conv2d) and _is_depthwise(module):
            if p_in != p_out:
                raise self.fail(f"depthwise conv {name!r} must keep its input group")
            self.assign(weight, (p_out, None, None, None))
        elif isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise self.fail(f"conv {name!r} is grouped (groups={module.groups}), which is not supported")
            self.assign(weight, (p_out, p_in, None, None))
        else:
            self.assign(weight, (p_out, p_in))
        if module.bias is not None:
            self.assign(f"{name}.bias", (p_out,))

    def norm_layer(self, name: str, module: nn.Module, group: str | None) -> None:
        for local_key in module.state_dict():
            self.assign(f"{name}.{local_key}", () if local_key == "num_batches_tracked" else (group,))

    def chain(self, layers: list[tuple[str, nn.Module]], p_in: str | None, p_last: str | None) -> str | None:
        """Layers applied one after another: every weight layer but the last opens a group named after it
        (a depthwise conv keeps its input's), the last outputs `p_last`; a norm takes its input's group."""
        weight_layers = [name for name, module in layers if isinstance(module, _WEIGHT_LAYERS)]
        if not weight_layers:
            raise self.fail(f"no Linear or Conv2d among {[name for name, _ in layers]}")
        group = p_in
        for name, module in layers:
            if isinstance(module, _WEIGHT_LAYERS):
                if isinstance(module, nn.Conv2d) and _is_depthwise(module):
                    if name == weight_layers[-1]:
                        raise self.fail(f"depthwise conv {name!r} cannot end a block")
                    p_out = group
                else:
                    p_out = p_last if name == weight_layers[-1] else name
                self.weight_layer(name, module, group, p_out)
                group = p_out
            elif isinstance(module, _NORM_LAYERS):
                self.norm_layer(name, module, group)
            elif module.state_dict():
                raise self.fail(f"layer {name!r} ({type(module).__name__}) holds state the matcher does not know")
        return group

    def build(self) -> PermutationSpec:
        uncovered = [key for key in self.state if key not in self.axes]
        if uncovered:
            raise self.fail(f"state-dict keys outside the permutation spec: {_first_few(uncovered)}")
        return PermutationSpec(self.model_name, {key: self.axes[key] for key in self.state}, dict(self.sizes),
                               statistics=frozenset(key for key in self.state if key in self.buffers))


_WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)
_NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _leaves(module: nn.Module, prefix: str, skip: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
    """Leaf modules under `module` in registration order (their forward order in the supported models)."""
    skipped = tuple(f"{name}." for name in skip)
    leaves = []
    for name, child in module.named_modules():
        if not name or next(child.children(), None) is not None or (name + ".").startswith(skipped):
            continue
        leaves.append((f"{prefix}.{name}" if prefix else name, child))
    return leaves


def _plain_chain_spec(builder: _SpecBuilder, model: nn.Module) -> None:
    # mlp and cnn: every layer feeds the next; the head's outputs (logits) stay in place.
    builder.chain(_leaves(model, ""), None, None)


def _resnet_spec(builder: _SpecBuilder, model: nn.Module) -> None:
    from torchvision.models.resnet import ResNet

    if not isinstance(model, ResNet):
        raise builder.fail(f"expected a torchvision ResNet, got {type(model).__name__}")
    stream = builder.chain([("conv1", model.conv1), ("bn1", model.bn1)], None, "conv1")
    for stage_name in ("layer1", "layer2", "layer3", "layer4"):
        for index, block in enumerate(getattr(model, stage_name)):
            prefix = f"{stage_name}.{index}"
            block_out = stream
            if block.downsample is not None:
                # A downsample conv starts the stage's own residual stream.
                block_out = stage_name if stage_name not in builder.sizes else prefix
                builder.chain(_leaves(block.downsample, f"{prefix}.downsample"), stream, block_out)
            builder.chain(_leaves(block, prefix, skip=("downsample",)), stream, block_out)
            stream = block_out
    builder.weight_layer("fc", model.fc, stream, None)


def _mobilenet_v2_spec(builder: _SpecBuilder, model: nn.Module) -> None:
    from torchvision.models.mobilenetv2 import InvertedResidual, MobileNetV2

    if not isinstance(model, MobileNetV2):
        raise builder.fail(f"expected a torchvision MobileNetV2, got {type(model).__name__}")
    stream: str | None = None
    for index, block in enumerate(model.features):
        prefix = f"features.{index}"
        if isinstance(block, InvertedResidual) and block.use_res_connect:
            builder.chain(_leaves(block, prefix), stream, stream)
        else:
            # Stem, a block that changes width or stride, and the final 1x1 conv open a new stream.
            stream = builder.chain(_leaves(block, prefix), stream, prefix)
    builder.chain(_leaves(model.classifier, "classifier"), stream, None)


_SPEC_BUILDERS = {
    "mlp": _plain_chain_spec,
    "cnn": _plain_chain_spec,
    "resnet18": _resnet_spec,
    "resnet50": _resnet_spec,
    "mobilenet_v2": _mobilenet_v2_spec,
}


def permutation_spec(model_name: str, model: nn.Module) -> PermutationSpec:
    """The permutation spec of `model`, a network built by ``ecavg.models.build_model(model_name, ...)``.

    Raises AggregationError naming the model when weight matching does not know it, or when the instance
    does not have the structure expected of that name.
    """
    builder_fn = _SPEC_BUILDERS.get(model_name)
    if builder_fn is None:
        raise AggregationError(
            f"weight matching does not know model {model_name!r}; it supports {', '.join(MATCHABLE_MODELS)}"
        )
    if not isinstance(model, nn.Module):
        raise AggregationError(f"weight matching needs a built {model_name!r} model, got {type(model).__name__}")
    builder = _SpecBuilder(model_name, model)
    builder_fn(builder, model)
    return builder.build()
