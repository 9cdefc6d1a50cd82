"""Weight matching: permute an edge's hidden units to line up with a reference edge before averaging.

Two networks trained from different initialisations can compute the same function with their hidden units
in a different order, and averaging unit i of one with unit i of the other then mixes unrelated features
(the average lands at chance). Weight matching (Ainsworth et al., "Git Re-Basin", arXiv 2209.04836, section
3.2) looks for the permutation of each hidden layer that maximises the inner product between the two
networks' weights. The joint problem is NP-hard; it is solved one permutation group at a time (a linear
assignment, ``scipy.optimize.linear_sum_assignment``, with the other groups held fixed), visiting the groups
in a seeded random order, until a whole sweep changes no group.

Activation matching (the same paper, section 3.1; REPAIR, Jordan et al., arXiv 2211.08403, matches ResNets
this way) compares what the units compute instead: both networks run on the same server images, and each group's
assignment maximises the summed correlation of paired units' outputs. A network's activations do not depend on
how the other groups are ordered, so every group is solved once, independently, with no sweeps.

Which axes a group permutes comes from :mod:`ecavg.core.permutation_specs`. The usual flow on the server::

    spec = permutation_spec(model_name, build_model(model_name, ...))
    aligned = align_to_reference(state_dicts, sample_counts, spec)      # or match=... for activations
    averaged = average_state_dicts(aligned, sample_counts)

BatchNorm running statistics are permuted with their channels, but after averaging they no longer describe
the averaged network; the caller recomputes them on server data (REPAIR, Jordan et al., arXiv 2211.08403).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ecavg.core.permutation_specs import PermutationSpec
from ecavg.errors import AggregationError

__all__ = ["activation_producers", "align_to_reference", "match_activations", "match_weights", "permute_state_dict",
           "reference_index"]

Permutations = dict[str, Tensor]
# How a matcher is called: (reference state dict, other state dict) -> permutations for the other.
Matcher = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Permutations]


def _check_permutations(spec: PermutationSpec, perms: Mapping[str, Tensor]) -> None:
    missing = [group for group in spec.sizes if group not in perms]
    if missing:
        raise AggregationError(f"permutations missing for group(s) {', '.join(repr(g) for g in missing[:5])}")
    unknown = [group for group in perms if group not in spec.sizes]
    if unknown:
        raise AggregationError(
            f"permutation(s) for group(s) not in model {spec.model_name!r}: {', '.join(repr(g) for g in unknown[:5])}"
        )
    for group, size in spec.sizes.items():
        perm = perms[group]
        if not isinstance(perm, Tensor) or perm.dtype != torch.int64 or perm.shape != (size,):
            raise AggregationError(f"permutation of group {group!r} must be an int64 tensor of shape ({size},)")
        if not torch.equal(torch.sort(perm.cpu()).values, torch.arange(size)):
            raise AggregationError(f"permutation of group {group!r} is not a permutation of 0..{size - 1}")


def _permute(tensor: Tensor, axes: tuple[str | None, ...], perms: Mapping[str, Tensor], skip_axis: int = -1) -> Tensor:
    """`tensor` with every permuted axis but `skip_axis` reordered: new index i holds old index perm[i]."""
    for axis, group in enumerate(axes):
        if group is not None and axis != skip_axis:
            tensor = tensor.index_select(axis, perms[group].to(tensor.device))
    return tensor


def permute_state_dict(
    spec: PermutationSpec, state_dict: Mapping[str, Tensor], perms: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """A new state dict with each group's units reordered by ``perms[group]`` (new unit i = old unit perm[i]).

    The network it describes computes the same function as `state_dict` (up to float rounding of nothing:
    values are only moved). Tensors with no permuted axis are the input's own tensor objects, not copies.
    """
    spec.check_state_dict(state_dict, "state dict to permute")
    _check_permutations(spec, perms)
    with torch.no_grad():
        return {key: _permute(state_dict[key], axes, perms) for key, axes in spec.axes.items()}


def _assignment_score(
    spec: PermutationSpec,
    group: str,
    reference: Mapping[str, Tensor],
    other: Mapping[str, Tensor],
    perms: Mapping[str, Tensor],
    members: tuple[tuple[str, int], ...] | None = None,
) -> np.ndarray:
    """score[i, j]: inner product of the reference's unit i with the other model's unit j, summed over every
    weight tensor the group permutes (or only `members`), with the other model's remaining axes already permuted by
    `perms`. BatchNorm running statistics are left out: they are measured, not learned, and their scale (a variance
    can be in the hundreds where weights are around 0.1) would make the assignment sort units by activation size."""
    size = spec.sizes[group]
    ref_columns: list[Tensor] = []
    other_columns: list[Tensor] = []
    for key, axis in spec.members[group] if members is None else members:
        ref_tensor = reference[key]
        if not ref_tensor.is_floating_point() or key in spec.statistics:
            continue
        other_tensor = _permute(other[key], spec.axes[key], perms, skip_axis=axis)
        ref_columns.append(ref_tensor.movedim(axis, 0).reshape(size, -1).float())
        other_columns.append(other_tensor.to(ref_tensor.device).movedim(axis, 0).reshape(size, -1).float())
    if not ref_columns:
        return np.zeros((size, size))
    # One matrix product over all tensors side by side: many small rank-1 products (norm vectors) would
    # each allocate a size x size matrix.
    score = torch.cat(ref_columns, dim=1) @ torch.cat(other_columns, dim=1).T
    return score.cpu().double().numpy()


def _best_assignment(score: np.ndarray) -> np.ndarray:
    """The permutation p maximising sum_i score[i, p[i]] (int64)."""
    # Imported here so that plain averaging does not need scipy.
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(score, maximize=True)
    best = np.empty(len(rows), dtype=np.int64)
    best[rows] = cols
    return best


def _groups_in_forward_order(spec: PermutationSpec) -> list[str]:
    """Groups by first appearance in the state dict, which lists a layer's weight before the next layer's."""
    order: dict[str, None] = {}
    for axes in spec.axes.values():
        for group in axes:
            if group is not None:
                order.setdefault(group)
    return list(order)


def _forward_initialisation(
    spec: PermutationSpec,
    reference: Mapping[str, Tensor],
    other: Mapping[str, Tensor],
    perms: Permutations,
) -> None:
    """Solve each group once, input to output, from only the tensors whose other axes are already solved.

    Starting the coordinate ascent from identity permutations, every group's score is dominated by its
    still-unaligned neighbours, and the ascent can settle in a poor fixed point (measured: on a randomly
    initialised MobileNetV2 it failed to find even an exact permuted copy). Solving the groups in forward
    order with only already-aligned evidence (the layer producing the units, whose inputs are aligned, and
    the norm layer after it) recovers such a copy in one pass and gives the ascent a good start.
    """
    solved: set[str] = set()
    for group in _groups_in_forward_order(spec):
        trusted = tuple(
            (key, axis)
            for key, axis in spec.members[group]
            if all(other_group is None or other_group in solved or index == axis
                   for index, other_group in enumerate(spec.axes[key]))
        )
        if trusted:
            score = _assignment_score(spec, group, reference, other, perms, members=trusted)
            perms[group] = torch.from_numpy(_best_assignment(score))
        solved.add(group)


def match_weights(
    spec: PermutationSpec,
    reference_sd: Mapping[str, Tensor],
    other_sd: Mapping[str, Tensor],
    *,
    max_iter: int = 100,
    seed: int = 0,
    forward_init: bool = True,
) -> Permutations:
    """Permutations that line `other_sd`'s hidden units up with `reference_sd`'s (Git Re-Basin weight matching).

    ``permute_state_dict(spec, other_sd, perms)`` is then the other network, reordered to be close to the
    reference. Groups are solved one at a time in a random order drawn from `seed`, for at most `max_iter`
    sweeps over all groups; it stops earlier once a sweep improves no group. With `forward_init` (default)
    the sweeps start from one input-to-output pass that solves each group from already-aligned evidence
    only (see ``_forward_initialisation``); without it they start from identity permutations, as in the paper.
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise AggregationError(f"max_iter must be a positive integer, got {max_iter!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise AggregationError(f"seed must be an integer, got {seed!r}")
    spec.check_state_dict(reference_sd, "reference state dict")
    spec.check_state_dict(other_sd, "state dict to match")
    perms: Permutations = {group: torch.arange(size) for group, size in spec.sizes.items()}
    with torch.no_grad():
        if forward_init:
            _forward_initialisation(spec, reference_sd, other_sd, perms)
        order = sorted(spec.sizes)
        rng = random.Random(seed)
        for _ in range(max_iter):
            rng.shuffle(order)
            changed = False
            for group in order:
                score = _assignment_score(spec, group, reference_sd, other_sd, perms)
                best = _best_assignment(score)
                current = perms[group].numpy()
                units = np.arange(len(current))
                best_total = float(score[units, best].sum())
                current_total = float(score[units, current].sum())
                # Only a real gain counts: ties and rounding must not make the sweep go on forever.
                if best_total - current_total > 1e-12 * max(abs(current_total), math.ulp(1.0)):
                    perms[group] = torch.from_numpy(best.astype(np.int64))
                    changed = True
            if not changed:
                break
    return perms


def reference_index(weights: Sequence[float]) -> int:
    """Index of the reference edge: the one with the largest weight (sample count); ties go to the first."""
    if not weights:
        raise AggregationError("no edges given: nothing to align")
    values = []
    for index, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise AggregationError(f"edge {index}: weight must be a finite number, got {weight!r}")
        values.append(float(weight))
    return max(range(len(values)), key=lambda index: values[index])


def activation_producers(spec: PermutationSpec, model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Per permutation group, the modules whose outputs are that group's units.

    A group's BatchNorm layers where it has any (the normalised outputs of every layer writing to it: for a
    residual stream, the stem's and each block's last norm and the downsample's), otherwise its Linear and Conv
    layers whose output axis it permutes (the MLP's hidden layer). Raises AggregationError for a group with none.
    """
    norms: dict[str, list[str]] = {group: [] for group in spec.sizes}
    layers: dict[str, list[str]] = {group: [] for group in spec.sizes}
    for name, module in model.named_modules():
        axes = spec.axes.get(f"{name}.weight")
        if not axes or axes[0] is None:
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            norms[axes[0]].append(name)
        elif isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            layers[axes[0]].append(name)
    producers = {group: tuple(norms[group] or layers[group]) for group in spec.sizes}
    missing = [group for group, names in producers.items() if not names]
    if missing:
        raise AggregationError(f"activation matching: no layer of model {spec.model_name!r} outputs the units of "
                               f"group(s) {', '.join(repr(g) for g in missing[:5])}")
    return producers


class _CrossMoments:
    """Running sums over rows (samples x positions) of two layers' outputs, for their channels' correlations."""

    def __init__(self) -> None:
        self.rows = 0
        self.sums: list[Tensor] = []  # sum a, sum b, sum a^2, sum b^2 (per channel), sum a b^T (channel x channel)

    def add(self, a: Tensor, b: Tensor) -> None:
        # (N, C, ...) -> (rows, C); float64: sums over hundreds of thousands of rows, then differences of them.
        a = a.detach().movedim(1, -1).reshape(-1, a.shape[1]).double()
        b = b.detach().movedim(1, -1).reshape(-1, b.shape[1]).double()
        batch = [a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), a.T @ b]
        self.sums = batch if not self.sums else [s + t for s, t in zip(self.sums, batch)]
        self.rows += a.shape[0]

    def correlation(self) -> Tensor:
        """corr[i, j]: Pearson correlation of the first layer's channel i with the second's channel j (0 where a
        channel is constant, e.g. a unit that never fires)."""
        sum_a, sum_b, sum_aa, sum_bb, sum_ab = (s / self.rows for s in self.sums)
        std_a = (sum_aa - sum_a * sum_a).clamp_min(0).sqrt()
        std_b = (sum_bb - sum_b * sum_b).clamp_min(0).sqrt()
        covariance = sum_ab - sum_a[:, None] * sum_b[None, :]
        scale = std_a[:, None] * std_b[None, :]
        return torch.where(scale > 1e-12, covariance / scale.clamp_min(1e-12), torch.zeros_like(covariance))


def match_activations(
    spec: PermutationSpec, reference: nn.Module, other: nn.Module, batches: Iterable[Tensor]
) -> Permutations:
    """Permutations that line `other`'s hidden units up with `reference`'s by what they compute on `batches`.

    Both models run in eval mode on each batch of inputs (already normalised, on the models' device); per group,
    the assignment maximises the correlation between paired units, summed over the group's producer layers
    (``activation_producers``). ``permute_state_dict(spec, other.state_dict(), perms)`` is then `other`, reordered.
    """
    producers = activation_producers(spec, reference)
    names = {name for group_names in producers.values() for name in group_names}
    reference_modules = dict(reference.named_modules())
    other_modules = dict(other.named_modules())
    missing = sorted(names - other_modules.keys())
    if missing:
        raise AggregationError(f"activation matching: the other model has no module(s) {', '.join(missing[:5])}")
    captured: dict[str, Tensor] = {}
    moments = {name: _CrossMoments() for name in names}

    def keep_reference(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            # A copy: the next layer may be an in-place ReLU, which would change this output before it is compared.
            captured[name] = output.detach().clone()
        return hook

    def compare_other(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            moments[name].add(captured.pop(name), output)
        return hook

    handles = [reference_modules[n].register_forward_hook(keep_reference(n)) for n in names]
    handles += [other_modules[n].register_forward_hook(compare_other(n)) for n in names]
    modes = (reference.training, other.training)
    try:
        reference.eval()
        other.eval()
        with torch.no_grad():
            for inputs in batches:
                reference(inputs)
                other(inputs)
    finally:
        for handle in handles:
            handle.remove()
        reference.train(modes[0])
        other.train(modes[1])
    if any(m.rows == 0 for m in moments.values()):
        raise AggregationError("activation matching needs at least one batch of inputs, got none")
    correlations = {group: sum(moments[name].correlation() for name in group_names).cpu().numpy()
                    for group, group_names in producers.items()}
    perms: Permutations = {group: torch.from_numpy(_best_assignment(score)) for group, score in correlations.items()}
    # Activations can leave units indistinguishable: one constant over the images (dead, or saturated) correlates
    # with nothing, and units that fire on the same few images correlate perfectly with each other. The weights
    # break such ties: correlations are compared to 1e-6 (closer is float noise over the rows), and a term below
    # that, scored as weight matching does with the other groups in the order their activations gave, decides
    # between equals.
    reference_sd, other_sd = reference.state_dict(), other.state_dict()
    tie_broken: Permutations = {}
    for group, score in correlations.items():
        weights = _assignment_score(spec, group, reference_sd, other_sd, perms)
        scale = np.abs(weights).max()
        score = np.round(score, 6) + (1e-7 * weights / scale if scale > 0 else 0.0)
        tie_broken[group] = torch.from_numpy(_best_assignment(score))
    return tie_broken


def align_to_reference(
    state_dicts: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    spec: PermutationSpec,
    *,
    match: Matcher | None = None,
) -> list[dict[str, Tensor]]:
    """Every edge's state dict permuted to match the reference edge (most samples; ties: the first).

    ``match(reference, other)`` finds each edge's permutations (default: weight matching, ``match_weights`` with
    seed 0). Returns one state dict per input, in the input order, ready for ``average_state_dicts(aligned,
    weights)``; the reference comes back unchanged (as a new dict holding the same tensors).
    """
    state_dicts = list(state_dicts)
    weights = list(weights)
    if len(state_dicts) != len(weights):
        raise AggregationError(f"got {len(state_dicts)} state dicts but {len(weights)} weights")
    if match is None:
        def match(reference: Mapping[str, Tensor], other: Mapping[str, Tensor]) -> Permutations:
            return match_weights(spec, reference, other)
    ref = reference_index(weights)
    reference = state_dicts[ref]
    spec.check_state_dict(reference, f"edge {ref} (reference)")
    aligned = []
    for index, state_dict in enumerate(state_dicts):
        if index == ref:
            aligned.append(dict(reference))
            continue
        spec.check_state_dict(state_dict, f"edge {index}")
        perms = match(reference, state_dict)
        aligned.append(permute_state_dict(spec, state_dict, perms))
    return aligned
