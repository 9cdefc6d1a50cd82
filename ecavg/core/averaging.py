"""Weighted averaging of model state dicts (the "Avg" in ECAvg).

The server receives one state dict per edge and averages them weighted by each edge's sample count.
:class:`StreamingAverager` does this one state dict at a time, so memory stays at one running weighted
sum per tensor however many edges report; :func:`average_state_dicts` is the one-call convenience.

Numerics, per tensor dtype:

* floating tensors: the running sum is kept in float32 for float32/float16/bfloat16 tensors and in
  float64 for float64 tensors; the result is cast back to the tensor's own dtype.
* integer tensors (in practice BatchNorm's int64 ``num_batches_tracked``): the weighted mean is accumulated
  in float64, rounded to the nearest integer (ties to even, ``torch.round``) and cast back. This is a
  deliberate choice: the value is only a step counter, and BatchNorm reads it only when ``momentum=None``
  (cumulative moving average), where a weighted mean of the edges' counters is the natural value.
* bool tensors cannot be averaged: they must be identical on every edge.

Every state dict is validated completely before anything is accumulated, so a rejected edge leaves the
running sums untouched and the caller may carry on without it. Rejections raise :class:`AggregationError`
with the edge name and the tensor key in the message.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ecavg.errors import AggregationError

__all__ = ["AggregationError", "StreamingAverager", "average_state_dicts"]

# Key lists in error messages are cut to this many names so a wholly wrong model stays readable.
_MAX_KEYS_IN_MESSAGE = 8

# torch._foreach_* (what torch.optim uses) processes a list of tensors with few kernel launches; a
# ResNet50 state dict has ~320 tensors, so on a GPU one launch per tensor would dominate the runtime.
_HAS_FOREACH = all(hasattr(torch, op) for op in ("_foreach_add_", "_foreach_norm", "_foreach_mul_", "_foreach_div"))



def _format_keys(keys: Iterable[str]) -> str:
    ordered = sorted(keys)
    shown = ", ".join(repr(k) for k in ordered[:_MAX_KEYS_IN_MESSAGE])
    if len(ordered) > _MAX_KEYS_IN_MESSAGE:
        shown += f", ... ({len(ordered) - _MAX_KEYS_IN_MESSAGE} more)"
    return shown


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """dtype of the running sum for a tensor of `dtype`; None for bool (compared, not summed)."""
    if dtype == torch.bool:
        return None
    if dtype == torch.float64:
        return torch.float64
    if dtype.is_floating_point:
        return torch.float32
    # Integer buffers: float64 holds every int up to 2**53 exactly, far beyond any step counter.
    return torch.float64


def _is_supported_dtype(dtype: torch.dtype) -> bool:
    if dtype == torch.bool or dtype.is_floating_point:
        return True
    if dtype.is_complex:
        return False
    # Remaining candidates are integer types; quantized dtypes are not averageable.
    try:
        torch.iinfo(dtype)
    except TypeError:
        return False
    return True


def _finite_probes(tensors: list[Tensor], device: torch.device, acc_dtype: torch.dtype) -> Tensor:
    """One number per tensor that is NaN/Inf whenever the tensor holds a NaN/Inf.

    Sums and norms propagate NaN/Inf (no addition turns them finite again), and they are reductions, so
    no tensor-sized mask is allocated. They may also overflow on huge finite values; callers confirm a
    non-finite probe with an exact check. On CUDA the fused multi-tensor norm avoids one kernel launch
    per tensor; on CPU plain per-tensor sums are the fastest reduction (measured ~4x faster than norms).
    """
    if device.type != "cpu" and _HAS_FOREACH:
        probes = torch._foreach_norm(tensors, 2)
    else:
        probes = [t.sum(dtype=acc_dtype) for t in tensors]
    return torch.stack(probes).to(torch.float64)


@dataclass
class _Group:
    """Averaged tensors sharing one device and dtype, accumulated together.

    Floating groups keep one accumulator per tensor and are added with one multi-tensor ``add_`` (fused
    into a few kernels on CUDA when the accumulator has the tensors' dtype). Integer groups (BatchNorm
    counters: many scalars) keep one flat float64 accumulator: each edge's integers are concatenated and
    added with a single type-promoting ``add_`` rather than one tiny kernel per counter.
    """

    keys: list[str]
    shapes: list[torch.Size]
    device: torch.device
    dtype: torch.dtype  # dtype of the incoming tensors
    acc_dtype: torch.dtype  # dtype of the running sum
    sums: list[Tensor] = field(default_factory=list)  # per-tensor sums (floating groups)
    flat_sum: Tensor | None = None  # one flat sum (integer groups)

    @property
    def floating(self) -> bool:
        return self.dtype.is_floating_point

    def gather(self, tensors: Mapping[str, Tensor]) -> list[Tensor] | Tensor:
        """This group's tensors from one edge, on the group's device (integer groups: concatenated)."""
        sources = [tensors[key] for key in self.keys]
        sources = [t if t.device == self.device else t.to(self.device) for t in sources]
        if not self.floating:
            return torch.cat([t.reshape(-1) for t in sources])
        return sources

    def first_nonfinite(self, staged: list[Tensor]) -> str | None:
        """Exact search for the first key holding NaN/Inf (only run after a probe came out non-finite)."""
        for key, tensor in zip(self.keys, staged):
            if not bool(torch.isfinite(tensor).all()):
                return key
        return None

    def accumulate(self, staged: list[Tensor] | Tensor, weight: float) -> None:
        if isinstance(staged, Tensor):
            if self.flat_sum is None:
                self.flat_sum = staged.to(self.acc_dtype).mul_(weight)
            else:
                self.flat_sum.add_(staged, alpha=weight)
            return
        if not self.sums:
            self.sums = [t.to(dtype=self.acc_dtype, copy=True) for t in staged]
            if weight != 1.0:
                if _HAS_FOREACH:
                    torch._foreach_mul_(self.sums, weight)
                else:
                    for acc in self.sums:
                        acc.mul_(weight)
        elif _HAS_FOREACH:
            torch._foreach_add_(self.sums, staged, alpha=weight)
        else:
            for acc, tensor in zip(self.sums, staged):
                acc.add_(tensor, alpha=weight)

    def means(self, total: float) -> dict[str, Tensor]:
        """The group's averages, each a new tensor in the original dtype."""
        if self.flat_sum is not None:
            flat_mean = torch.div(self.flat_sum, total).round_()
            chunks = torch.split(flat_mean, [shape.numel() for shape in self.shapes])
            # .to() copies (float64 -> integer), so the results do not share one storage.
            return {key: chunk.to(self.dtype).view(shape) for key, chunk, shape in zip(self.keys, chunks, self.shapes)}
        means = torch._foreach_div(self.sums, total) if _HAS_FOREACH else [torch.div(acc, total) for acc in self.sums]
        return {key: mean.to(self.dtype) for key, mean in zip(self.keys, means)}


class StreamingAverager:
    """Running weighted average of state dicts, one state dict at a time.

    ``reference`` (optional) fixes the expected keys, shapes and dtypes; otherwise the first state dict
    added does. Accumulators live on the devices of the first state dict's tensors; tensors from other
    devices are copied there before being added.

    >>> avg = StreamingAverager()
    >>> avg.add({"w": torch.tensor([0.0, 2.0])}, weight=1, name="edge-a")
    >>> avg.add({"w": torch.tensor([4.0, 6.0])}, weight=3, name="edge-b")
    >>> avg.result()["w"]
    tensor([3., 5.])
    """

    def __init__(self, reference: Mapping[str, Tensor] | None = None) -> None:
        # key -> (shape, dtype) every added state dict must match
        self._template: dict[str, tuple[torch.Size, torch.dtype]] | None = None
        self._groups: list[_Group] | None = None  # fixed by the first state dict added
        self._bools: dict[str, Tensor] = {}  # bool tensors, which must agree on every edge
        self._total_weight = 0.0
        # Sums are accumulated with weights relative to the first edge's weight: a single edge then comes
        # back bit-exact, and large sample counts (weights of 1e5) do not inflate the sums' magnitude.
        self._weight_unit: float | None = None
        self._relative_total = 0.0
        self._names: list[str] = []
        if reference is not None:
            self._template = self._template_from(reference, "reference")

    # -- public API ---------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Number of state dicts accepted so far."""
        return len(self._names)

    @property
    def total_weight(self) -> float:
        """Sum of the weights of the accepted state dicts."""
        return self._total_weight

    @property
    def names(self) -> tuple[str, ...]:
        """Edge names of the accepted state dicts, in the order they were added."""
        return tuple(self._names)

    def add(self, state_dict: Mapping[str, Tensor], weight: float, *, name: str) -> None:
        """Validate `state_dict` completely, then add ``weight * state_dict`` to the running sums.

        Raises AggregationError (leaving the sums unchanged) on: a duplicate edge name, a weight that is
        not a finite number > 0, missing or unexpected keys, a shape or dtype different from the
        reference, NaN/Inf in a floating tensor, or a bool tensor differing from earlier edges.
        """
        weight_value = self._check_weight(weight, name)
        if name in self._names:
            raise AggregationError(f"edge {name!r}: a state dict from this edge was already added")
        template = self._template if self._template is not None else self._template_from(state_dict, name)
        tensors = self._check_state_dict(state_dict, template, name)
        groups = self._groups if self._groups is not None else self._plan(template, tensors)

        with torch.no_grad():
            staged = [group.gather(tensors) for group in groups]
            self._check_finite(groups, staged, name)
            self._check_bools(tensors, name)
            # Validation passed: from here on nothing may fail half-way.
            weight_unit = weight_value if self._weight_unit is None else self._weight_unit
            relative_weight = weight_value / weight_unit
            for group, group_staged in zip(groups, staged):
                group.accumulate(group_staged, relative_weight)
            for key, (_, dtype) in template.items():
                if dtype == torch.bool and key not in self._bools:
                    self._bools[key] = tensors[key].clone()
        self._template = template
        self._groups = groups
        self._weight_unit = weight_unit
        self._relative_total += relative_weight
        self._total_weight += weight_value
        self._names.append(name)

    def result(self) -> dict[str, Tensor]:
        """The weighted average so far: new tensors, each in its original dtype (keys in reference order)."""
        if self._template is None or self._groups is None or not self._names:
            raise AggregationError("no state dict has been added: nothing to average")
        averaged: dict[str, Tensor] = {}
        with torch.no_grad():
            for group in self._groups:
                averaged.update(group.means(self._relative_total))
            for key, value in self._bools.items():
                averaged[key] = value.clone()
        return {key: averaged[key] for key in self._template}

    # -- validation ---------------------------------------------------------------------------------

    @staticmethod
    def _check_weight(weight: float, name: str) -> float:
        if isinstance(weight, bool):
            raise AggregationError(f"edge {name!r}: weight must be a number, got bool {weight!r}")
        try:
            value = float(weight)
        except (TypeError, ValueError):
            raise AggregationError(f"edge {name!r}: weight must be a number, got {weight!r}") from None
        if not math.isfinite(value) or value <= 0.0:
            raise AggregationError(f"edge {name!r}: weight must be finite and > 0, got {weight!r}")
        return value

    @staticmethod
    def _template_from(state_dict: Mapping[str, Tensor], name: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
        if not isinstance(state_dict, Mapping):
            raise AggregationError(f"edge {name!r}: expected a mapping of tensors, got {type(state_dict).__name__}")
        if not state_dict:
            raise AggregationError(f"edge {name!r}: the state dict is empty")
        template: dict[str, tuple[torch.Size, torch.dtype]] = {}
        for key, tensor in state_dict.items():
            if not isinstance(tensor, Tensor):
                raise AggregationError(
                    f"edge {name!r}: tensor {key!r} is a {type(tensor).__name__}, not a torch.Tensor"
                )
            if not _is_supported_dtype(tensor.dtype):
                raise AggregationError(f"edge {name!r}: tensor {key!r} has dtype {tensor.dtype}, which cannot be averaged")
            template[key] = (tensor.shape, tensor.dtype)
        return template

    @staticmethod
    def _check_state_dict(
        state_dict: Mapping[str, Tensor],
        template: Mapping[str, tuple[torch.Size, torch.dtype]],
        name: str,
    ) -> dict[str, Tensor]:
        if not isinstance(state_dict, Mapping):
            raise AggregationError(f"edge {name!r}: expected a mapping of tensors, got {type(state_dict).__name__}")
        missing = template.keys() - state_dict.keys()
        if missing:
            raise AggregationError(f"edge {name!r}: missing tensor(s) {_format_keys(missing)}")
        unexpected = state_dict.keys() - template.keys()
        if unexpected:
            raise AggregationError(f"edge {name!r}: unexpected tensor(s) {_format_keys(unexpected)}")

        tensors: dict[str, Tensor] = {}
        for key, (expected_shape, expected_dtype) in template.items():
            tensor = state_dict[key]
            if not isinstance(tensor, Tensor):
                raise AggregationError(
                    f"edge {name!r}: tensor {key!r} is a {type(tensor).__name__}, not a torch.Tensor"
                )
            if tensor.shape != expected_shape:
                raise AggregationError(
                    f"edge {name!r}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(expected_shape)}"
                )
            if tensor.dtype != expected_dtype:
                raise AggregationError(f"edge {name!r}: tensor {key!r} has dtype {tensor.dtype}, expected {expected_dtype}")
            if tensor.layout != torch.strided:
                raise AggregationError(
                    f"edge {name!r}: tensor {key!r} has layout {tensor.layout}; only dense tensors are supported"
                )
            tensors[key] = tensor
        return tensors

    @staticmethod
    def _plan(template: Mapping[str, tuple[torch.Size, torch.dtype]], tensors: Mapping[str, Tensor]) -> list[_Group]:
        """Group the averaged (non-bool) tensors by (device, dtype) of the first state dict."""
        groups: dict[tuple[torch.device, torch.dtype], _Group] = {}
        for key, (shape, dtype) in template.items():
            acc_dtype = _accumulator_dtype(dtype)
            if acc_dtype is None:
                continue
            device = tensors[key].device
            group = groups.get((device, dtype))
            if group is None:
                group = groups[(device, dtype)] = _Group([], [], device, dtype, acc_dtype)
            group.keys.append(key)
            group.shapes.append(shape)
        return list(groups.values())

    @staticmethod
    def _check_finite(groups: list[_Group], staged: list[list[Tensor] | Tensor], name: str) -> None:
        # One probe per tensor, gathered per device, and one host synchronisation per device.
        probes_by_device: dict[torch.device, list[Tensor]] = {}
        for group, group_staged in zip(groups, staged):
            if group.floating:
                probes = _finite_probes(group_staged, group.device, group.acc_dtype)
                probes_by_device.setdefault(group.device, []).append(probes)
        if all(bool(torch.isfinite(torch.cat(probes)).all()) for probes in probes_by_device.values()):
            return
        for group, group_staged in zip(groups, staged):
            if group.floating:
                bad_key = group.first_nonfinite(group_staged)
                if bad_key is not None:
                    raise AggregationError(f"edge {name!r}: tensor {bad_key!r} contains NaN or Inf values")

    def _check_bools(self, tensors: Mapping[str, Tensor], name: str) -> None:
        for key, stored in self._bools.items():
            if not torch.equal(stored, tensors[key].to(stored.device)):
                raise AggregationError(
                    f"edge {name!r}: bool tensor {key!r} differs from the edges added before; "
                    "bool tensors cannot be averaged and must be identical"
                )


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    names: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Weighted average of several state dicts (ECAvg's server-side aggregation).

    Args:
        state_dicts: one state dict per edge, all with the same keys, shapes and dtypes.
        weights: one positive weight per edge, typically its number of training samples; equal weights
            when omitted.
        names: one name per edge, used in error messages; ``edge-0``, ``edge-1``, ... when omitted.

    Returns:
        A new dict with the weighted mean of every tensor, each in its original dtype (integer buffers
        such as BatchNorm's ``num_batches_tracked`` are rounded to the nearest integer).

    Raises:
        AggregationError: naming the edge and the tensor, when the inputs disagree in keys, shapes or
            dtypes, contain NaN/Inf, a weight is not finite and > 0, or nothing is given.

    Example:
        >>> import torch
        >>> from ecavg import average_state_dicts
        >>> edge_a = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(10)}
        >>> edge_b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(20)}
        >>> avg = average_state_dicts([edge_a, edge_b], weights=[100, 300])  # 100 and 300 samples
        >>> avg["w"], avg["n"]
        (tensor([2.5000, 4.0000]), tensor(18))
    """
    state_dicts = list(state_dicts)
    if not state_dicts:
        raise AggregationError("no state dicts given: nothing to average")
    if weights is None:
        weights = [1.0] * len(state_dicts)
    if names is None:
        names = [f"edge-{i}" for i in range(len(state_dicts))]
    if len(weights) != len(state_dicts):
        raise AggregationError(f"got {len(state_dicts)} state dicts but {len(weights)} weights")
    if len(names) != len(state_dicts):
        raise AggregationError(f"got {len(state_dicts)} state dicts but {len(names)} names")
    averager = StreamingAverager()
    for state_dict, weight, name in zip(state_dicts, weights, names):
        averager.add(state_dict, weight, name=name)
    return averager.result()
