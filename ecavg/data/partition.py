"""Splitting a training set across edges, and a test set to match.

All partitioners are deterministic for a given seed (numpy PCG64 generator) and return one sorted
int64 index tensor per edge; the index sets are disjoint.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["PARTITION_SCHEMES", "partition_indices", "partition_test_like", "stratified_share"]

PARTITION_SCHEMES = ("iid", "ratio", "dirichlet", "shards")

# How often a Dirichlet draw that leaves an edge empty is repeated before falling back to a repair.
_DIRICHLET_MAX_DRAWS = 100


def stratified_share(labels: torch.Tensor, num_classes: int, fraction: float, generator: torch.Generator
                     ) -> torch.Tensor:
    """Positions of a seeded, class-stratified random share: round(n_c * fraction) samples of each class c,
    class by class in draw order (callers sort if they need order). Used for data.train_fraction, the server's
    share (server_data_fraction) and the guarded update's validation slice."""
    keep = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        keep.append(idx[torch.randperm(len(idx), generator=generator)[: int(round(len(idx) * fraction))]])
    return torch.cat(keep) if keep else torch.empty(0, dtype=torch.int64)


def partition_indices(
    labels: torch.Tensor,
    num_edges: int,
    scheme: str,
    *,
    seed: int,
    ratios: Sequence[float] | None = None,
    alpha: float | None = None,
    labels_per_edge: int | None = None,
) -> list[torch.Tensor]:
    """Split sample indices 0..N-1 among `num_edges` edges.

    * ``iid``: shuffle, then equal parts (sizes differ by at most one).
    * ``ratio``: edge k gets ``ratios[k]`` of every class (stratified, so all edges share one label mix).
    * ``dirichlet``: for every class, the edges' shares are drawn from Dir(alpha); smaller alpha means
      more label skew. Every edge is guaranteed at least one sample.
    * ``shards``: samples sorted by label are cut into ``num_edges * labels_per_edge`` shards and each
      edge receives ``labels_per_edge`` shards, preferring shards of different labels.

    Arguments that the chosen scheme does not use are ignored. Every sample is assigned to exactly
    one edge in all schemes.
    """
    label_array = _labels_to_numpy(labels, "labels")
    if isinstance(num_edges, bool) or not isinstance(num_edges, (int, np.integer)) or num_edges < 1:
        raise ValueError(f"num_edges must be an integer >= 1, got {num_edges!r}")
    num_edges = int(num_edges)
    num_samples = label_array.shape[0]
    if num_edges > num_samples:
        raise ValueError(f"num_edges={num_edges} is more than the {num_samples} samples to split")
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(PARTITION_SCHEMES)}; got {scheme!r}")
    rng = np.random.default_rng(_check_seed(seed))

    if scheme == "iid":
        parts = np.array_split(rng.permutation(num_samples), num_edges)
    elif scheme == "ratio":
        parts = _ratio_partition(label_array, num_edges, _check_ratios(ratios, num_edges), rng)
    elif scheme == "dirichlet":
        parts = _dirichlet_partition(label_array, num_edges, _check_alpha(alpha), rng)
    else:
        parts = _shard_partition(label_array, num_edges, _check_labels_per_edge(labels_per_edge, label_array,
                                                                                num_edges), rng)
    return [torch.from_numpy(np.sort(np.asarray(part, dtype=np.int64))) for part in parts]


def partition_test_like(
    edge_train_labels: list[torch.Tensor],
    test_labels: torch.Tensor,
    num_classes: int,
    *,
    seed: int,
) -> list[torch.Tensor]:
    """Disjoint test partitions that follow each edge's training label distribution.

    Of the test samples of class c, edge k receives the share n_kc / n_c, where n_kc counts class c
    in edge k's training labels and n_c sums it over edges. Counts are rounded with the largest
    remainder method, where each edge's remainder also carries its rounding debt from the classes
    before, so per-edge totals stay within one sample of their exact share. Test samples of a class
    that no edge trains on are left out.
    """
    if not isinstance(edge_train_labels, (list, tuple)) or not edge_train_labels:
        raise ValueError("edge_train_labels must be a non-empty list of label tensors, one per edge")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    test_array = _labels_to_numpy(test_labels, "test_labels")
    counts = np.zeros((num_classes, len(edge_train_labels)), dtype=np.int64)
    for edge, edge_labels in enumerate(edge_train_labels):
        edge_array = _labels_to_numpy(edge_labels, f"edge_train_labels[{edge}]")
        _check_label_range(edge_array, num_classes, f"edge_train_labels[{edge}]")
        counts[:, edge] = np.bincount(edge_array, minlength=num_classes)
    _check_label_range(test_array, num_classes, "test_labels")
    rng = np.random.default_rng(_check_seed(seed))

    class_totals = counts.sum(axis=1)
    shares = np.divide(counts, class_totals[:, None], out=np.zeros(counts.shape, dtype=np.float64),
                       where=class_totals[:, None] > 0)
    by_class = [rng.permutation(np.flatnonzero(test_array == c)) for c in range(num_classes)]
    test_class_sizes = np.array([len(idx) for idx in by_class], dtype=np.int64)
    # Classes no edge trains on get no allocation (their row of shares is zero).
    sizes = np.where(class_totals > 0, test_class_sizes, 0)
    allocation = _allocate(sizes, shares)
    return [torch.from_numpy(np.sort(part).astype(np.int64)) for part in _cut_classes(by_class, allocation)]


# --------------------------------------------------------------------------------------------
# Schemes
# --------------------------------------------------------------------------------------------


def _ratio_partition(labels: np.ndarray, num_edges: int, ratios: np.ndarray,
                     rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    sizes = np.array([len(idx) for idx in by_class], dtype=np.int64)
    allocation = _allocate(sizes, np.broadcast_to(ratios, (len(classes), num_edges)))
    parts = _cut_classes(by_class, allocation)
    empty = [k for k, part in enumerate(parts) if len(part) == 0]
    if empty:
        raise ValueError(
            f"ratios={ratios.tolist()} leave edge(s) {empty} without samples out of {len(labels)}; use larger ratios"
        )
    return parts


def _dirichlet_partition(labels: np.ndarray, num_edges: int, alpha: float,
                         rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    sizes = np.array([len(idx) for idx in by_class], dtype=np.int64)
    for _ in range(_DIRICHLET_MAX_DRAWS):
        shuffled = [rng.permutation(idx) for idx in by_class]
        proportions = rng.dirichlet(np.full(num_edges, alpha), size=len(classes))
        allocation = _allocate(sizes, proportions)
        if (allocation.sum(axis=0) > 0).all():
            return _cut_classes(shuffled, allocation)
    # Tiny alpha with many edges can leave an edge empty draw after draw. Keep the last draw and
    # give each empty edge one sample from the edge that holds the most of that sample's class.
    allocation = allocation.copy()
    for edge in np.flatnonzero(allocation.sum(axis=0) == 0):
        donors = allocation.sum(axis=0)
        donor_edge = int(np.argmax(donors))
        donor_class = int(np.argmax(allocation[:, donor_edge]))
        allocation[donor_class, donor_edge] -= 1
        allocation[donor_class, edge] += 1
    return _cut_classes(shuffled, allocation)


def _shard_partition(labels: np.ndarray, num_edges: int, labels_per_edge: int,
                     rng: np.random.Generator) -> list[np.ndarray]:
    num_shards = num_edges * labels_per_edge
    # Sort by label, random order within a label, so a shard is a random sample of its label(s).
    order = np.lexsort((rng.random(len(labels)), labels))
    shards = np.array_split(order, num_shards)
    shard_label = np.array([np.bincount(labels[s]).argmax() for s in shards])
    assignment = rng.permutation(num_shards).reshape(num_edges, labels_per_edge)
    _spread_shard_labels(assignment, shard_label, rng)
    return [np.concatenate([shards[s] for s in row]) for row in assignment]


def _spread_shard_labels(assignment: np.ndarray, shard_label: np.ndarray, rng: np.random.Generator) -> None:
    """Swap shards between edges (in place) until no edge holds two shards of one label, if possible.

    A random deal often gives some edge two shards of the same label (then it sees fewer labels
    than asked for); random improving swaps fix that in a few passes. Bounded, deterministic.
    """
    num_edges, per_edge = assignment.shape
    if per_edge == 1 or num_edges == 1:
        return

    def duplicates_per_edge() -> np.ndarray:
        row_labels = np.sort(shard_label[assignment], axis=1)
        return (row_labels[:, 1:] == row_labels[:, :-1]).sum(axis=1)

    duplicates = duplicates_per_edge()
    for _ in range(50 * assignment.size):
        bad_edges = np.flatnonzero(duplicates)
        if bad_edges.size == 0:
            return
        edge = int(bad_edges[rng.integers(bad_edges.size)])
        row_labels = shard_label[assignment[edge]]
        _, first_seen = np.unique(row_labels, return_index=True)
        duplicate_slots = np.setdiff1d(np.arange(per_edge), first_seen)
        slot = int(duplicate_slots[rng.integers(duplicate_slots.size)])
        other = int(rng.integers(num_edges - 1))
        other += other >= edge
        other_slot = int(rng.integers(per_edge))
        assignment[edge, slot], assignment[other, other_slot] = assignment[other, other_slot], assignment[edge, slot]
        swapped = duplicates_per_edge()
        if swapped.sum() > duplicates.sum():  # undo swaps that make things worse; keep neutral ones
            assignment[edge, slot], assignment[other, other_slot] = (
                assignment[other, other_slot], assignment[edge, slot])
        else:
            duplicates = swapped


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _allocate(class_sizes: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Integer counts [classes, edges]: row c sums to class_sizes[c], close to class_sizes[c] * shares[c].

    Largest remainder per class, where an edge's remainder includes what earlier classes' rounding
    already gave it too much or too little, so the edge totals also come out right.
    """
    num_classes, num_edges = shares.shape
    allocation = np.zeros((num_classes, num_edges), dtype=np.int64)
    debt = np.zeros(num_edges, dtype=np.float64)  # exact share minus allocated, accumulated
    for c in range(num_classes):
        size = int(class_sizes[c])
        row_shares = shares[c]
        if size == 0 or row_shares.sum() <= 0:
            continue
        exact = size * row_shares / row_shares.sum()
        base = np.floor(exact).astype(np.int64)
        leftover = size - int(base.sum())
        if leftover > 0:
            remainder = exact - base + debt
            remainder[row_shares <= 0] = -np.inf  # never hand a class to an edge with zero share
            # Stable argsort on the negated remainder: ties go to the lower edge index.
            winners = np.argsort(-remainder, kind="stable")[:leftover]
            base[winners] += 1
        allocation[c] = base
        debt += exact - base
    return allocation


def _cut_classes(by_class: list[np.ndarray], allocation: np.ndarray) -> list[np.ndarray]:
    num_edges = allocation.shape[1]
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_edges)]
    for indices, counts in zip(by_class, allocation):
        bounds = np.cumsum(counts)[:-1]
        for edge, piece in enumerate(np.split(indices[: int(counts.sum())], bounds)):
            pieces[edge].append(piece)
    return [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in pieces]


def _labels_to_numpy(labels: torch.Tensor, what: str) -> np.ndarray:
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise ValueError(f"{what} must be a 1-D tensor of class indices, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{what} must hold integer class indices, got dtype {labels.dtype}")
    array = labels.detach().cpu().to(torch.int64).numpy()
    if array.size and array.min() < 0:
        raise ValueError(f"{what} holds a negative class index ({int(array.min())})")
    return array


def _check_label_range(labels: np.ndarray, num_classes: int, what: str) -> None:
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"{what} holds class {int(labels.max())} but num_classes={num_classes}")


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_ratios(ratios: Sequence[float] | None, num_edges: int) -> np.ndarray:
    if ratios is None:
        raise ValueError("ratios is required for scheme='ratio' (one share per edge, summing to 1)")
    values = np.asarray(list(ratios), dtype=np.float64)
    if values.ndim != 1 or len(values) != num_edges:
        raise ValueError(f"ratios must have one entry per edge ({num_edges}), got {len(values)}: {list(ratios)}")
    if not np.isfinite(values).all() or (values <= 0).any():
        raise ValueError(f"ratios must all be positive, got {values.tolist()}")
    if not math.isclose(float(values.sum()), 1.0, abs_tol=1e-6):
        raise ValueError(f"ratios must sum to 1, got {values.tolist()} (sum {values.sum():.6g})")
    return values / values.sum()


def _check_alpha(alpha: float | None) -> float:
    if alpha is None:
        raise ValueError("alpha is required for scheme='dirichlet' (e.g. 0.5; smaller means more label skew)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not math.isfinite(alpha) \
            or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    return float(alpha)


def _check_labels_per_edge(labels_per_edge: int | None, labels: np.ndarray, num_edges: int) -> int:
    if labels_per_edge is None:
        raise ValueError("labels_per_edge is required for scheme='shards' (e.g. 2)")
    if isinstance(labels_per_edge, bool) or not isinstance(labels_per_edge, (int, np.integer)) \
            or labels_per_edge < 1:
        raise ValueError(f"labels_per_edge must be an integer >= 1, got {labels_per_edge!r}")
    present = len(np.unique(labels))
    if labels_per_edge > present:
        raise ValueError(f"labels_per_edge={labels_per_edge} exceeds the {present} labels present")
    if num_edges * labels_per_edge > len(labels):
        raise ValueError(
            f"labels_per_edge={labels_per_edge} with num_edges={num_edges} needs "
            f"{num_edges * labels_per_edge} shards but there are only {len(labels)} samples"
        )
    return int(labels_per_edge)
