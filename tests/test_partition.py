"""Edge partitions of the training set and matching test partitions."""

from __future__ import annotations

import pytest
import torch

from ecavg.data import partition_indices, partition_test_like


def balanced_labels(per_class: int = 100, num_classes: int = 10, seed: int = 0) -> torch.Tensor:
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def uneven_labels() -> torch.Tensor:
    counts = [123, 98, 101, 87, 140, 77, 105, 99, 110, 60]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]


def assert_disjoint_cover(parts: list[torch.Tensor], total: int) -> None:
    everything = torch.cat(parts)
    assert all(p.dtype == torch.int64 for p in parts)
    assert everything.numel() == total, "not every sample assigned exactly once"
    assert torch.equal(everything.sort().values, torch.arange(total)), "partitions overlap or miss samples"


def label_mix(labels: torch.Tensor, part: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    return torch.bincount(labels[part], minlength=num_classes).double() / len(part)


@pytest.mark.parametrize(
    "scheme, options",
    [
        ("iid", {}),
        ("ratio", {"ratios": [0.5, 0.2, 0.2, 0.1]}),
        ("dirichlet", {"alpha": 0.3}),
        ("shards", {"labels_per_edge": 2}),
    ],
)
def test_disjoint_cover_and_deterministic(scheme, options):
    labels = uneven_labels()
    parts = partition_indices(labels, 4, scheme, seed=7, **options)
    assert len(parts) == 4 and all(len(p) > 0 for p in parts)
    assert_disjoint_cover(parts, len(labels))
    again = partition_indices(labels, 4, scheme, seed=7, **options)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(labels, 4, scheme, seed=8, **options)
    assert not all(torch.equal(a, b) for a, b in zip(parts, other))


def test_iid_equal_sizes_and_mixed_labels():
    labels = balanced_labels()
    parts = partition_indices(labels, 3, "iid", seed=0)
    assert sorted(len(p) for p in parts) == [333, 333, 334]
    for part in parts:
        assert label_mix(labels, part).min() > 0.05  # every class present in roughly its share


def test_ratio_sizes_and_same_label_mix():
    labels = uneven_labels()
    parts = partition_indices(labels, 2, "ratio", seed=0, ratios=[0.7, 0.3])
    total = len(labels)
    assert abs(len(parts[0]) - 0.7 * total) <= 1 and abs(len(parts[1]) - 0.3 * total) <= 1
    counts = [torch.bincount(labels[p], minlength=10) for p in parts]
    class_totals = torch.bincount(labels, minlength=10)
    # Stratified: each class is split 70/30 up to rounding.
    assert ((counts[0] - 0.7 * class_totals).abs() <= 1).all()
    assert torch.equal(counts[0] + counts[1], class_totals)
    balanced = balanced_labels(per_class=1000)
    parts = partition_indices(balanced, 2, "ratio", seed=3, ratios=[0.7, 0.3])
    assert [len(p) for p in parts] == [7000, 3000]


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = balanced_labels(per_class=200)

    def mean_distance_from_global(alpha: float) -> float:
        distances = []
        for seed in range(3):
            parts = partition_indices(labels, 5, "dirichlet", seed=seed, alpha=alpha)
            distances += [(label_mix(labels, p) - 0.1).abs().sum().item() for p in parts]
        return sum(distances) / len(distances)

    skew = [mean_distance_from_global(alpha) for alpha in (100.0, 1.0, 0.05)]
    assert skew[0] < skew[1] < skew[2]
    assert skew[0] < 0.2 and skew[2] > 1.0


def test_dirichlet_every_edge_gets_a_sample_even_with_tiny_alpha():
    labels = balanced_labels(per_class=3, num_classes=4)  # 12 samples, 10 edges, very skewed draws
    parts = partition_indices(labels, 10, "dirichlet", seed=0, alpha=0.01)
    assert all(len(p) >= 1 for p in parts)
    assert_disjoint_cover(parts, len(labels))


def test_shards_give_each_edge_labels_per_edge_labels():
    labels = balanced_labels(per_class=60)  # 600 samples -> 20 pure shards of 30 for 10 edges x 2
    for seed in range(5):
        parts = partition_indices(labels, 10, "shards", seed=seed, labels_per_edge=2)
        assert [labels[p].unique().numel() for p in parts] == [2] * 10
        assert [len(p) for p in parts] == [60] * 10
        assert_disjoint_cover(parts, len(labels))
    parts = partition_indices(labels, 5, "shards", seed=0, labels_per_edge=1)
    assert [labels[p].unique().numel() for p in parts] == [2] * 5  # 5 shards of 120 over 10 classes of 60


def test_single_edge_gets_everything():
    labels = balanced_labels(per_class=5)
    for scheme, options in [("iid", {}), ("ratio", {"ratios": [1.0]}), ("dirichlet", {"alpha": 1.0}),
                            ("shards", {"labels_per_edge": 1})]:
        (part,) = partition_indices(labels, 1, scheme, seed=0, **options)
        assert torch.equal(part, torch.arange(50))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_edges": 2, "scheme": "random"}, "scheme"),
        ({"num_edges": 0, "scheme": "iid"}, "num_edges"),
        ({"num_edges": 101, "scheme": "iid"}, "num_edges=101 is more than the 100 samples"),
        ({"num_edges": 2, "scheme": "ratio"}, "ratios is required"),
        ({"num_edges": 2, "scheme": "ratio", "ratios": [0.5, 0.4]}, "ratios must sum to 1"),
        ({"num_edges": 2, "scheme": "ratio", "ratios": [0.5, 0.25, 0.25]}, "ratios must have one entry per edge"),
        ({"num_edges": 2, "scheme": "ratio", "ratios": [1.2, -0.2]}, "ratios must all be positive"),
        ({"num_edges": 2, "scheme": "dirichlet", "alpha": 0.0}, "alpha must be"),
        ({"num_edges": 2, "scheme": "dirichlet", "alpha": -1.0}, "alpha must be"),
        ({"num_edges": 2, "scheme": "dirichlet"}, "alpha is required"),
        ({"num_edges": 2, "scheme": "shards", "labels_per_edge": 0}, "labels_per_edge"),
        ({"num_edges": 2, "scheme": "shards", "labels_per_edge": 11}, "labels_per_edge=11 exceeds"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        partition_indices(balanced_labels(per_class=10), seed=0, **kwargs)


def test_ratio_too_small_for_an_edge():
    with pytest.raises(ValueError, match="without samples"):
        partition_indices(balanced_labels(per_class=1, num_classes=3), 2, "ratio", seed=0, ratios=[0.999, 0.001])


def test_unused_options_are_ignored():
    labels = balanced_labels()
    plain = partition_indices(labels, 2, "iid", seed=0)
    with_extras = partition_indices(labels, 2, "iid", seed=0, alpha=0.5, labels_per_edge=2, ratios=None)
    assert all(torch.equal(a, b) for a, b in zip(plain, with_extras))


# ------------------------------------------------------------------ test partitions


def test_partition_test_like_iid_cifar10_shape():
    train_labels = torch.arange(10).repeat_interleave(5000)
    test_labels = torch.arange(10).repeat_interleave(1000)
    parts = partition_indices(train_labels, 2, "ratio", seed=0, ratios=[0.5, 0.5])
    tests = partition_test_like([train_labels[p] for p in parts], test_labels, 10, seed=0)
    assert [len(t) for t in tests] == [5000, 5000]
    assert_disjoint_cover(tests, 10000)
    iid = partition_indices(train_labels, 2, "iid", seed=0)
    tests = partition_test_like([train_labels[p] for p in iid], test_labels, 10, seed=0)
    assert all(abs(len(t) - 5000) <= 100 for t in tests)
    assert_disjoint_cover(tests, 10000)


def test_partition_test_like_follows_training_proportions():
    train_labels = uneven_labels()
    test_labels = balanced_labels(per_class=50)
    parts = partition_indices(train_labels, 4, "dirichlet", seed=2, alpha=0.5)
    edge_labels = [train_labels[p] for p in parts]
    tests = partition_test_like(edge_labels, test_labels, 10, seed=0)
    assert_disjoint_cover(tests, len(test_labels))
    # [edge, class]
    train_counts = torch.stack([torch.bincount(labels, minlength=10) for labels in edge_labels]).double()
    share = train_counts / train_counts.sum(0, keepdim=True)
    test_counts = torch.stack([torch.bincount(test_labels[t], minlength=10) for t in tests]).double()
    # Each edge's count of class c is its training share of class c times 50, rounded (+-1).
    assert ((test_counts - share * 50).abs() < 1.0 + 1e-9).all()
    # Edge totals stay within one sample of their exact share.
    assert ((test_counts.sum(1) - (share * 50).sum(1)).abs() < 1.0 + 1e-9).all()
    assert all(torch.equal(a, b) for a, b in zip(tests, partition_test_like(edge_labels, test_labels, 10, seed=0)))


def test_partition_test_like_skips_classes_no_edge_has():
    edge_labels = [torch.tensor([0, 0, 1]), torch.tensor([1, 1])]
    test_labels = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    tests = partition_test_like(edge_labels, test_labels, 3, seed=0)
    assigned = torch.cat(tests)
    assert sorted(test_labels[assigned].tolist()) == [0, 0, 1, 1, 1]
    assert test_labels[tests[0]].tolist().count(0) == 2  # only edge 0 trains on class 0
    with pytest.raises(ValueError, match="num_classes=3"):
        partition_test_like(edge_labels, torch.tensor([3]), 3, seed=0)
