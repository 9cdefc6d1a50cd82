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
* other dtypes (float8, complex, quantized) and tensors without values (the meta device) are refused.

Range: no sum may overflow. Each floating tensor's running sum carries an upper bound on its magnitude (from
the per-tensor max-abs probe that the NaN/Inf check computes anyway). Ordinary values and weights stay far below
the dtype's range, so nothing changes for them and results are bit-identical to plain float32 accumulation; a
float32 sum that could come near float32's range is widened to float64 before the add, and float64 sums are
scaled down by a power of two (exact). Weights are taken relative to the first edge's; a weight more than 2**64
times that unit becomes the new unit (the earlier sums are scaled down), so no relative weight is ever infinite.
Integer means are clamped to their dtype's range, and :meth:`StreamingAverager.result` checks that every
returned value is finite.

``StreamingAverager.state`` / ``from_state`` save and restore the running sums exactly, so that an interrupted
run resumes from one model's worth of checkpoint instead of every edge's weights (this is why the module is a
little over 450 lines: the state belongs with the sums it describes).

Every state dict is validated completely before anything is accumulated, so a rejected edge leaves the
running sums untouched and the caller may carry on without it. Rejections raise :class:`AggregationError`
with the edge name and the tensor key in the message.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ecavg.errors import AggregationError

__all__ = ["AggregationError", "StreamingAverager", "average_state_dicts"]

# Key lists in error messages are cut to this many names so a wholly wrong model stays readable.
_MAX_KEYS_IN_MESSAGE = 8

# torch._foreach_* (what torch.optim uses) processes a list of tensors with few kernel launches; a
# ResNet50 state dict has ~320 tensors, so on a GPU one launch per tensor would dominate the runtime.
_HAS_FOREACH = all(hasattr(torch, op) for op in ("_foreach_add_", "_foreach_norm", "_foreach_mul_", "_foreach_div"))

_AVERAGED_DTYPES = frozenset({
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64,
})
# A new edge whose weight is more than this many times the current unit becomes the unit (see the module notes).
_MAX_RELATIVE_WEIGHT = 2.0**64



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
    return dtype == torch.bool or dtype in _AVERAGED_DTYPES


def _sum_limit(dtype: torch.dtype) -> float:
    """Largest magnitude a running sum of `dtype` is allowed to reach (a margin below the range for rounding)."""
    return torch.finfo(dtype).max / 4


def _log2_bound(bound: float, maxabs: float, step: float) -> float:
    """An upper bound on log2(bound + maxabs * step), computed without overflowing."""
    terms = [math.log2(bound)] if bound > 0 else []
    if maxabs > 0 and step > 0:
        terms.append(math.log2(maxabs) + math.log2(step))
    return max(terms) + 1 if terms else -math.inf


def _magnitude_probes(tensors: list[Tensor], device: torch.device) -> Tensor:
    """One float64 number per tensor: NaN/Inf whenever the tensor holds a NaN/Inf, else >= its largest |value|.

    They are reductions, so no tensor-sized mask is allocated. On CPU, aminmax gives the exact max-abs in one
    pass (as fast as a sum for float32, faster for 16-bit types). On CUDA the fused multi-tensor 2-norm avoids
    one kernel launch per tensor; it bounds the max-abs from above but may overflow on huge finite values, so
    callers confirm a non-finite probe with an exact check.
    """
    if device.type != "cpu" and _HAS_FOREACH:
        return torch.stack(torch._foreach_norm(tensors, 2)).to(torch.float64)
    probes = [
        torch.stack(torch.aminmax(t.reshape(-1))).abs().amax() if t.numel() else torch.zeros((), dtype=t.dtype)
        for t in tensors
    ]
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
    bounds: list[float] = field(default_factory=list)  # per tensor, >= |its sum| (floating groups)
    scale: float = 1.0  # power of two the sums carry; below 1 only for float64 sums that neared overflow

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

    def rescale(self, factor: float) -> None:
        """Multiply the running sums (and their bounds) by `factor`."""
        if self.flat_sum is not None:
            self.flat_sum.mul_(factor)
        for acc in self.sums:
            acc.mul_(factor)
        self.bounds = [bound * factor for bound in self.bounds]

    def make_room(self, maxabs: list[float], weight: float) -> None:
        """Widen or scale the sums so that adding `weight` times tensors with these max-abs cannot overflow."""
        bounds = self.bounds or [0.0] * len(maxabs)

        def fits() -> bool:
            step, limit = weight * self.scale, _sum_limit(self.acc_dtype)
            return all(bound + m * step < limit for bound, m in zip(bounds, maxabs))

        if fits():
            return
        if self.acc_dtype != torch.float64:
            self.acc_dtype = torch.float64  # exact: float64 holds every float32 sum
            self.sums = [acc.to(torch.float64) for acc in self.sums]
            if fits():
                return
        step = weight * self.scale
        needed = max(_log2_bound(bound, m, step) for bound, m in zip(bounds, maxabs))
        shift = max(1, math.ceil(needed - math.log2(_sum_limit(torch.float64))) + 1)
        factor = math.ldexp(1.0, -shift)
        self.rescale(factor)
        self.scale *= factor

    def accumulate(self, staged: list[Tensor] | Tensor, weight: float, maxabs: list[float] | None) -> None:
        if maxabs is not None:
            step = weight * self.scale
            previous = self.bounds or [0.0] * len(maxabs)
            self.bounds = [bound + m * step for bound, m in zip(previous, maxabs)]
            weight = step
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
        total = total * self.scale  # exact (a power of two), and a no-op unless the sums were scaled
        if self.flat_sum is not None:
            info = torch.iinfo(self.dtype)
            # Rounding can carry a mean of huge int64 values to 2**63; the cast would wrap it to -2**63.
            high = float(info.max) if int(float(info.max)) <= info.max else math.nextafter(float(info.max), 0.0)
            flat_mean = torch.div(self.flat_sum, total).round_().clamp_(float(info.min), high)
            chunks = torch.split(flat_mean, [shape.numel() for shape in self.shapes])
            # .to() copies (float64 -> integer), so the results do not share one storage.
            return {key: chunk.to(self.dtype).view(shape) for key, chunk, shape in zip(self.keys, chunks, self.shapes)}
        means = torch._foreach_div(self.sums, total) if _HAS_FOREACH else [torch.div(acc, total) for acc in self.sums]
        if self.scale != 1.0:
            # Sums scaled down because they neared float64's range: the mean of such values may round one ulp past
            # the largest float64. The true mean lies within the inputs' range, so clamping to it is exact enough.
            top = torch.finfo(torch.float64).max
            means = [mean.clamp_(-top, top) for mean in means]
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
        groups = self._groups if self._groups is not None else self._plan(
            template, {key: t.device for key, t in tensors.items()})

        with torch.no_grad():
            staged = [group.gather(tensors) for group in groups]
            maxabs = self._check_finite(groups, staged, name)
            self._check_bools(tensors, name)
            # Validation passed: from here on nothing may fail half-way.
            weight_unit = weight_value if self._weight_unit is None else self._weight_unit
            relative_weight = weight_value / weight_unit
            if relative_weight > _MAX_RELATIVE_WEIGHT:  # also catches inf: this weight becomes the unit
                factor = weight_unit / weight_value
                for group in groups:
                    group.rescale(factor)
                self._relative_total *= factor
                weight_unit, relative_weight = weight_value, 1.0
            for group, group_staged, group_maxabs in zip(groups, staged, maxabs):
                if group_maxabs is not None:
                    group.make_room(group_maxabs, relative_weight)
                group.accumulate(group_staged, relative_weight, group_maxabs)
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
                means = group.means(self._relative_total)
                if group.floating:
                    self._check_result_finite(group, [means[key] for key in group.keys])
                averaged.update(means)
            for key, value in self._bools.items():
                averaged[key] = value.clone()
        return {key: averaged[key] for key in self._template}

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The running sums and what they hold, for a checkpoint: (a JSON-able description, tensors).

        The tensors are the sums themselves (in their accumulator dtype), not copies; ``from_state`` rebuilds an
        averager that continues bit for bit (the weights are exact Python floats, which JSON keeps exactly).
        """
        if self._template is None or self._groups is None or not self._names:
            raise AggregationError("no state dict has been added: there is no running sum to save")
        tensors: dict[str, Tensor] = {}
        for index, group in enumerate(self._groups):
            if group.flat_sum is not None:
                tensors[f"flat/{index}"] = group.flat_sum
            tensors.update({f"sum/{key}": acc for key, acc in zip(group.keys, group.sums)})
        tensors.update({f"bool/{key}": value for key, value in self._bools.items()})
        description = {
            "template": [[key, list(shape), str(dtype).removeprefix("torch.")]
                         for key, (shape, dtype) in self._template.items()],
            "names": list(self._names), "total_weight": self._total_weight, "weight_unit": self._weight_unit,
            "relative_total": self._relative_total,
        }
        return description, tensors

    @classmethod
    def from_state(cls, description: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> StreamingAverager:
        """The averager ``state`` described (sums on the tensors' device; AggregationError if they disagree)."""
        try:
            template = {key: (torch.Size(shape), getattr(torch, dtype))
                        for key, shape, dtype in description["template"]}
            names, unit = [str(n) for n in description["names"]], float(description["weight_unit"])
            total, relative_total = float(description["total_weight"]), float(description["relative_total"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise AggregationError(f"a saved running sum has an unreadable description ({error!r})") from None
        if not template or not names or not all(isinstance(d, torch.dtype) for _, d in template.values()):
            raise AggregationError("a saved running sum describes no tensors or no edges")
        averager = cls()
        averager._groups = cls._plan(template, {key: t.device for key, t in tensors.items()}, prefix="sum/")
        for index, group in enumerate(averager._groups):
            wanted = ({f"flat/{index}": (torch.Size([sum(s.numel() for s in group.shapes)]), group.acc_dtype)}
                      if not group.floating else
                      {f"sum/{key}": (shape, group.acc_dtype) for key, shape in zip(group.keys, group.shapes)})
            for name, (shape, dtype) in wanted.items():
                saved = tensors.get(name)
                if saved is None or saved.shape != shape or saved.dtype != dtype:
                    raise AggregationError(f"a saved running sum has no {dtype} tensor {name!r} of shape "
                                           f"{tuple(shape)}")
            # Clones: the loaded tensors may share a read-only buffer, and the sums are added to in place.
            if group.floating:
                group.sums = [tensors[f"sum/{key}"].clone() for key in group.keys]
            else:
                group.flat_sum = tensors[f"flat/{index}"].clone()
        for key, (shape, dtype) in template.items():
            if dtype == torch.bool:
                saved = tensors.get(f"bool/{key}")
                if saved is None or saved.shape != shape or saved.dtype != torch.bool:
                    raise AggregationError(f"a saved running sum has no bool tensor {key!r} of shape {tuple(shape)}")
                averager._bools[key] = saved.clone()
        averager._template, averager._names, averager._weight_unit = template, names, unit
        averager._total_weight, averager._relative_total = total, relative_total
        return averager

    # -- validation ---------------------------------------------------------------------------------

    @staticmethod
    def _check_result_finite(group: _Group, means: list[Tensor]) -> None:
        # The range handling in add() keeps every sum finite; this is the guarantee, not the mechanism.
        probes = _magnitude_probes(means, group.device)
        if bool(torch.isfinite(probes).all()):
            return
        for key, mean in zip(group.keys, means):
            if not bool(torch.isfinite(mean).all()):
                raise AggregationError(f"tensor {key!r}: the weighted average is not representable in {group.dtype}")

    @staticmethod
    def _check_weight(weight: float, name: str) -> float:
        # A real number only: float("2") would turn a string into a weight, float(True) a flag.
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise AggregationError(f"edge {name!r}: weight must be a real number, "
                                   f"got {type(weight).__name__} {weight!r}")
        try:
            value = float(weight)
        except (TypeError, ValueError, OverflowError):
            raise AggregationError(f"edge {name!r}: weight must be a finite number, got {weight!r}") from None
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
                raise AggregationError(f"edge {name!r}: tensor {key!r} has dtype {tensor.dtype}, "
                                       "which cannot be averaged")
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
                raise AggregationError(f"edge {name!r}: tensor {key!r} has dtype {tensor.dtype}, "
                                       f"expected {expected_dtype}")
            if tensor.layout != torch.strided:
                raise AggregationError(
                    f"edge {name!r}: tensor {key!r} has layout {tensor.layout}; only dense tensors are supported"
                )
            if tensor.device.type == "meta":
                raise AggregationError(f"edge {name!r}: tensor {key!r} is on the meta device, which holds no values")
            tensors[key] = tensor
        return tensors

    @staticmethod
    def _plan(template: Mapping[str, tuple[torch.Size, torch.dtype]], devices: Mapping[str, torch.device],
              prefix: str = "") -> list[_Group]:
        """Group the averaged (non-bool) tensors by (device, dtype) of the first state dict (``devices``: where
        each key's tensor is, under ``prefix + key``; CPU for keys it lacks)."""
        groups: dict[tuple[torch.device, torch.dtype], _Group] = {}
        for key, (shape, dtype) in template.items():
            acc_dtype = _accumulator_dtype(dtype)
            if acc_dtype is None:
                continue
            device = devices.get(prefix + key, torch.device("cpu"))
            group = groups.get((device, dtype))
            if group is None:
                group = groups[(device, dtype)] = _Group([], [], device, dtype, acc_dtype)
            group.keys.append(key)
            group.shapes.append(shape)
        return list(groups.values())

    @staticmethod
    def _check_finite(groups: list[_Group], staged: list[list[Tensor] | Tensor], name: str) -> list[list[float] | None]:
        """Refuse NaN/Inf; return, per group, an upper bound on each tensor's |value| (None for integer groups)."""
        # One probe per tensor, gathered per device, and one host synchronisation per device.
        probes_by_device: dict[torch.device, list[Tensor]] = {}
        for group, group_staged in zip(groups, staged):
            if group.floating:
                probes_by_device.setdefault(group.device, []).append(_magnitude_probes(group_staged, group.device))
        values_by_device = {device: iter(torch.cat(probes).tolist()) for device, probes in probes_by_device.items()}
        maxabs: list[list[float] | None] = []
        for group, group_staged in zip(groups, staged):
            if not group.floating:
                maxabs.append(None)
                continue
            values = [next(values_by_device[group.device]) for _ in group.keys]
            if not all(math.isfinite(v) for v in values):
                bad_key = group.first_nonfinite(group_staged)
                if bad_key is not None:
                    raise AggregationError(f"edge {name!r}: tensor {bad_key!r} contains NaN or Inf values")
                # Every value is finite; the probe overflowed (a 2-norm of huge values): take the exact max-abs.
                values = [v if math.isfinite(v) else float(t.abs().max()) for v, t in zip(values, group_staged)]
            maxabs.append(values)
        return maxabs

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
