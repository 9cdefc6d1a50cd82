"""Weight and activation matching (ecavg.core.matching): permutation specs keep the function, both matchings undo a
permutation, unknown models are refused, and on independently initialised MNIST MLPs the matched average beats the
plain one."""

from __future__ import annotations

import pytest
import torch

from ecavg.core import (
    activation_producers,
    align_to_reference,
    average_state_dicts,
    match_activations,
    match_weights,
    permutation_spec,
    permute_state_dict,
    reference_index,
)
from ecavg.errors import AggregationError
from ecavg.models import build_model

# (model name, options, in_channels, image_size): small widths where the model has them, every stem variant
# and greyscale input for each family.
CASES = [
    ("mlp", {"hidden": 24}, 1, 28),
    ("mlp", {"hidden": 16, "dropout": 0.1}, 3, 8),
    ("cnn", {"width": 8}, 3, 32),
    ("cnn", {"width": 4}, 1, 28),
    ("resnet18", {"cifar_stem": True}, 3, 16),
    ("resnet18", {}, 1, 32),
    ("resnet50", {}, 3, 32),
    ("resnet50", {"cifar_stem": True}, 1, 8),
    ("mobilenet_v2", {"width_mult": 0.25, "cifar_stem": True}, 3, 16),
    ("mobilenet_v2", {"width_mult": 0.5}, 1, 32),
    ("mobilenet_v2", {}, 3, 32),
]
# ResNet50's and the larger MobileNetV2s' matching take 5-10 s a case: `make test` runs them, `make test-fast` runs
# the smallest MobileNetV2 and the other models.
MATCH_CASES = [pytest.param(*case, marks=pytest.mark.slow)
               if case[0] == "resnet50" or (case[0] == "mobilenet_v2" and case[1].get("width_mult") != 0.5) else case
               for case in CASES]
BATCH = 8  # random images per batch for activation matching (two batches)
CASE_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in opts.items()) or 'default'}-{ch}ch"
            for name, opts, ch, _ in CASES]


def _model_with_distinct_norms(name: str, options: dict, in_channels: int, image_size: int, seed: int):
    """A model in eval mode whose BatchNorm tensors differ per channel (a fresh model has all ones and zeros
    there, which would hide a BatchNorm tensor left unpermuted): random affine parameters, then running
    statistics measured on random inputs (random statistics would saturate MobileNetV2's ReLU6 layers and make
    its output constant)."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=10, in_channels=in_channels, image_size=image_size, options=options)
    norms = [module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0.0, 0.1)
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average: one batch sets the statistics to that batch's
        if norms:
            model.train()(torch.randn(4, in_channels, image_size, image_size))
    return model.eval()


def _random_permutations(spec, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {group: torch.randperm(size, generator=generator) for group, size in spec.sizes.items()}


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # state_dict() shares storage with the parameters; load_state_dict would overwrite it in place.
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize(("name", "options", "in_channels", "image_size"), CASES, ids=CASE_IDS)
def test_permuting_hidden_units_preserves_the_function(name, options, in_channels, image_size):
    # float64: permuting only moves values, so any difference left is summation order, far below 1e-9.
    model = _model_with_distinct_norms(name, options, in_channels, image_size, seed=0).double()
    spec = permutation_spec(name, model)
    original = _snapshot(model)
    inputs = torch.randn(
        2, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    with torch.no_grad():
        expected = model(inputs)

    perms = _random_permutations(spec, seed=2)
    assert any(not torch.equal(perm, torch.arange(len(perm))) for perm in perms.values())
    permuted = permute_state_dict(spec, original, perms)
    assert any(not torch.equal(permuted[key], original[key]) for key in original)
    # Every tensor of a permuted group really moved: its units now differ from the original's.
    for group, pairs in spec.members.items():
        if spec.sizes[group] > 1:
            assert any(not torch.equal(permuted[key], original[key]) for key, _ in pairs), group
    model.load_state_dict(permuted)
    with torch.no_grad():
        got = model(inputs)
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * max(scale, 1.0))

    # The check can fail: leaving one permuted tensor (the first layer's weight) in place breaks the function.
    first_permuted = next(key for key, axes in spec.axes.items() if any(g is not None for g in axes))
    model.load_state_dict({**permuted, first_permuted: original[first_permuted]})
    with torch.no_grad():
        broken = model(inputs)
    assert not torch.allclose(broken, expected, rtol=1e-4, atol=1e-4 * max(scale, 1.0))


@pytest.mark.parametrize("matcher", ["weights", "activations"])
@pytest.mark.parametrize(("name", "options", "in_channels", "image_size"), MATCH_CASES, ids=CASE_IDS)
def test_matching_recovers_a_permuted_copy_exactly(name, options, in_channels, image_size, matcher):
    model = _model_with_distinct_norms(name, options, in_channels, image_size, seed=3)
    spec = permutation_spec(name, model)
    original = _snapshot(model)
    permuted = permute_state_dict(spec, original, _random_permutations(spec, seed=4))

    if matcher == "weights":
        perms = match_weights(spec, original, permuted, seed=5)
    else:
        other = _model_with_distinct_norms(name, options, in_channels, image_size, seed=9)
        other.load_state_dict(permuted)
        generator = torch.Generator().manual_seed(6)
        batches = [torch.randn(BATCH, in_channels, image_size, image_size, generator=generator) for _ in range(2)]
        perms = match_activations(spec, model, other, batches)
        assert not model.training and not other.training  # modes restored (both were in eval mode)
        assert not model._forward_hooks and all(not m._forward_hooks for m in other.modules())  # hooks removed
    recovered = permute_state_dict(spec, permuted, perms)
    assert recovered.keys() == original.keys()
    for key in original:
        assert torch.equal(recovered[key], original[key]), key


@pytest.mark.parametrize(("name", "options", "in_channels", "image_size"),
                         [CASES[2], CASES[4], CASES[8]], ids=[CASE_IDS[2], CASE_IDS[4], CASE_IDS[8]])
def test_batchnorm_statistics_are_permuted_but_not_matched_on(name, options, in_channels, image_size):
    """Two networks with the same weights up to a permutation but unrelated BatchNorm statistics (two edges'
    statistics never correspond): the weights alone decide the matching. Scored on the statistics too, a variance
    in the thousands outweighs every weight and the matching sorts units by it instead."""
    model = _model_with_distinct_norms(name, options, in_channels, image_size, seed=3)
    spec = permutation_spec(name, model)
    assert spec.statistics and all(key.endswith(("running_mean", "running_var", "num_batches_tracked"))
                                   for key in spec.statistics)
    original = _snapshot(model)
    permuted = permute_state_dict(spec, original, _random_permutations(spec, seed=4))
    generator = torch.Generator().manual_seed(6)
    for key in spec.statistics:
        if permuted[key].is_floating_point():
            permuted[key] = torch.rand(permuted[key].shape, generator=generator) * 1e4

    recovered = permute_state_dict(spec, permuted, match_weights(spec, original, permuted, seed=5))
    for key in original:
        if key not in spec.statistics:
            assert torch.equal(recovered[key], original[key]), key


def test_unknown_model_is_refused_by_name():
    model = build_model("cnn", num_classes=10, in_channels=1, image_size=28, options={"width": 4})
    with pytest.raises(AggregationError, match="'vgg11'"):
        permutation_spec("vgg11", model)
    with pytest.raises(AggregationError, match="'shufflenet_v2_x0_5'"):
        permutation_spec(
            "shufflenet_v2_x0_5",
            build_model("shufflenet_v2_x0_5", num_classes=10, in_channels=3, image_size=32),
        )


def test_a_model_not_built_as_its_name_is_refused():
    cnn = build_model("cnn", num_classes=10, in_channels=1, image_size=28, options={"width": 4})
    with pytest.raises(AggregationError, match="'resnet18'.*ResNet"):
        permutation_spec("resnet18", cnn)
    with pytest.raises(AggregationError, match="'mobilenet_v2'.*MobileNetV2"):
        permutation_spec("mobilenet_v2", cnn)


def test_state_dict_of_another_shape_is_refused_naming_the_tensor():
    spec = permutation_spec("mlp", build_model("mlp", num_classes=10, in_channels=1, image_size=28))
    other = build_model("mlp", num_classes=10, in_channels=1, image_size=28, options={"hidden": 50}).state_dict()
    with pytest.raises(AggregationError, match="'hidden.weight'"):
        match_weights(spec, other, other)
    with pytest.raises(AggregationError, match="missing tensor.*'classifier.bias'"):
        permute_state_dict(spec, {k: v for k, v in other.items() if k != "classifier.bias"}, {})


def test_bad_permutations_are_refused():
    model = build_model("mlp", num_classes=10, in_channels=1, image_size=4, options={"hidden": 3})
    spec = permutation_spec("mlp", model)
    state = model.state_dict()
    with pytest.raises(AggregationError, match="missing for group.*'hidden'"):
        permute_state_dict(spec, state, {})
    with pytest.raises(AggregationError, match="not a permutation"):
        permute_state_dict(spec, state, {"hidden": torch.tensor([0, 0, 1])})


def test_activation_matching_places_units_that_never_vary_by_their_weights():
    # Three hidden units with zero input weights output their bias whatever the image: their correlation with every
    # unit is 0, so only their weights (bias, next layer's column) say which is which.
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10, in_channels=1, image_size=4, options={"hidden": 12}).eval()
    spec = permutation_spec("mlp", model)
    hidden = next(name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear))
    with torch.no_grad():
        dict(model.named_modules())[hidden].weight[:3] = 0.0
    original = _snapshot(model)
    permuted = permute_state_dict(spec, original, _random_permutations(spec, seed=1))
    other = build_model("mlp", num_classes=10, in_channels=1, image_size=4, options={"hidden": 12}).eval()
    other.load_state_dict(permuted)
    images = torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    perms = match_activations(spec, model, other, [images])
    recovered = permute_state_dict(spec, permuted, perms)
    for key in original:
        assert torch.equal(recovered[key], original[key]), key


def test_activation_producers_are_a_groups_norm_layers_or_else_its_layers():
    resnet = build_model("resnet18", num_classes=10, in_channels=3, image_size=32, options={"cifar_stem": True})
    producers = activation_producers(permutation_spec("resnet18", resnet), resnet)
    stream = next(names for names in producers.values() if "bn1" in names)
    # The first stage's stream: the stem's norm and each of its two blocks' last norm (no downsample there).
    assert stream == ("bn1", "layer1.0.bn2", "layer1.1.bn2")
    assert any(names == ("layer2.0.bn2", "layer2.0.downsample.1", "layer2.1.bn2") for names in producers.values())
    mlp = build_model("mlp", num_classes=10, in_channels=1, image_size=28, options={"hidden": 8})
    mlp_producers = activation_producers(permutation_spec("mlp", mlp), mlp)
    assert len(mlp_producers) == 1 and all(isinstance(dict(mlp.named_modules())[n], torch.nn.Linear)
                                           for names in mlp_producers.values() for n in names)


def test_activation_matching_needs_inputs():
    model = build_model("mlp", num_classes=10, in_channels=1, image_size=28, options={"hidden": 8})
    with pytest.raises(AggregationError, match="at least one batch"):
        match_activations(permutation_spec("mlp", model), model, model, [])


def test_reference_is_the_edge_with_most_samples_ties_to_the_first():
    assert reference_index([10, 30, 30]) == 1
    assert reference_index([30, 10, 30]) == 0
    assert reference_index([5]) == 0
    with pytest.raises(AggregationError):
        reference_index([])


def test_align_to_reference_lines_every_edge_up_with_the_reference():
    model = _model_with_distinct_norms("cnn", {"width": 4}, 1, 28, seed=6)
    spec = permutation_spec("cnn", model)
    reference = _snapshot(model)
    edges = [
        permute_state_dict(spec, reference, _random_permutations(spec, seed=7)),
        reference,
        permute_state_dict(spec, reference, _random_permutations(spec, seed=8)),
    ]
    aligned = align_to_reference(edges, [100, 300, 300], spec)
    assert len(aligned) == 3
    assert all(aligned[1][key] is reference[key] for key in reference)  # the reference is not touched
    for state in aligned:
        for key in reference:
            assert torch.equal(state[key], reference[key]), key
    # Edge 0 as reference (ties go to the first): everything lines up with edge 0 instead.
    aligned = align_to_reference(edges, [300, 100, 300], spec)
    for state in aligned:
        for key in reference:
            assert torch.equal(state[key], edges[0][key]), key
    with pytest.raises(AggregationError, match="2 state dicts but 3 weights"):
        align_to_reference(edges[:2], [1, 2, 3], spec)


# -- sanity check on real data: two MNIST MLPs from independent initialisations ---------------------------


def _train_mlp(images: torch.Tensor, labels: torch.Tensor, seed: int, steps: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("mlp", num_classes=10, in_channels=1, image_size=28)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(images), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _accuracy(state: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor) -> float:
    model = build_model("mlp", num_classes=10, in_channels=1, image_size=28)
    model.load_state_dict(state)
    with torch.no_grad():
        return (model.eval()(images).argmax(dim=1) == labels).float().mean().item()


@pytest.fixture
def one_thread():
    # A tiny MLP's steps are dominated by thread hand-offs, which on a shared machine cost ~8x the compute.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_matched_average_of_independent_mnist_mlps_stays_near_the_edges(tmp_path, one_thread):
    from ecavg.data import load_dataset

    splits = load_dataset("mnist-sample", cache_dir=tmp_path)

    def normalise(images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - splits.mean[0]) / splits.std[0]

    train_x, train_y = normalise(splits.train.images), splits.train.labels
    test_x, test_y = normalise(splits.test.images), splits.test.labels
    # Two edges, each with its own half of the training data and its own initialisation (as in ECAvg).
    half = len(train_x) // 2
    edges = [
        _train_mlp(train_x[:half], train_y[:half], seed=10, steps=400),
        _train_mlp(train_x[half:], train_y[half:], seed=11, steps=400),
    ]
    states = [_snapshot(edge) for edge in edges]
    weights = [half, len(train_x) - half]
    edge_accuracies = [_accuracy(state, test_x, test_y) for state in states]
    edge_mean = sum(edge_accuracies) / len(edge_accuracies)

    plain = _accuracy(average_state_dicts(states, weights), test_x, test_y)
    spec = permutation_spec("mlp", edges[0])
    matched = _accuracy(average_state_dicts(align_to_reference(states, weights, spec), weights), test_x, test_y)
    print(
        f"\nMNIST-sample MLPs from independent inits: edges {[round(100 * a, 2) for a in edge_accuracies]} "
        f"(mean {100 * edge_mean:.2f}%), plain average {100 * plain:.2f}%, matched average {100 * matched:.2f}%"
    )
    assert edge_mean > 0.8  # the edges did learn
    assert edge_mean - plain > 0.02  # the plain average loses clearly, so the comparison below means something
    assert edge_mean - matched < 0.5 * (edge_mean - plain)
