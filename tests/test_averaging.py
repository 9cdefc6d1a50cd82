"""Tests for ecavg.core.averaging: weighted averaging of state dicts against an independent float64 reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ecavg.core.averaging import AggregationError, StreamingAverager, average_state_dicts

# Tolerances on |result - reference| relative to max(|reference|, 1), per dtype.
TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-3,  # one fp16 rounding of the result (eps 2**-10)
    torch.bfloat16: 8e-3,  # one bf16 rounding of the result (eps 2**-7)
}


def random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A state dict shaped like a small CNN with BatchNorm, plus tensors of every supported float dtype."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=gen),
        "conv.bias": torch.randn(8, generator=gen),
        "bn.weight": torch.rand(8, generator=gen) + 0.5,
        "bn.bias": torch.randn(8, generator=gen),
        "bn.running_mean": torch.randn(8, generator=gen),
        "bn.running_var": torch.rand(8, generator=gen) + 0.1,
        "bn.num_batches_tracked": torch.randint(0, 10_000, (), generator=gen, dtype=torch.int64),
        "bn2.num_batches_tracked": torch.randint(0, 10_000, (), generator=gen, dtype=torch.int64),
        "counts": torch.randint(-500, 500, (3, 4), generator=gen, dtype=torch.int32),
        "fc.weight": torch.randn(10, 72, generator=gen),
        "fc.bias": torch.randn(10, generator=gen),
        "half.weight": torch.randn(16, 4, generator=gen).to(torch.float16),
        "bf16.weight": torch.randn(5, 7, generator=gen).to(torch.bfloat16),
        "double.weight": torch.randn(6, generator=gen, dtype=torch.float64),
        "scalar": torch.randn((), generator=gen),
        "mask": torch.tensor([True, False, True]),
    }


def reference_average(state_dicts, weights) -> dict[str, torch.Tensor]:
    """Weighted mean in float64 computed element by element, independently of the implementation."""
    total = float(sum(weights))
    reference = {}
    for key in state_dicts[0]:
        if state_dicts[0][key].dtype == torch.bool:
            reference[key] = state_dicts[0][key].clone()
            continue
        acc = torch.zeros(state_dicts[0][key].shape, dtype=torch.float64)
        for state_dict, weight in zip(state_dicts, weights):
            acc = acc + float(weight) * state_dict[key].to(torch.float64)
        reference[key] = acc / total
    return reference


def assert_matches_reference(result, reference, originals) -> None:
    assert list(result) == list(originals)
    for key, value in result.items():
        original = originals[key]
        assert value.dtype == original.dtype, key
        assert value.shape == original.shape, key
        expected = reference[key]
        if value.dtype == torch.bool:
            assert torch.equal(value, expected), key
        elif not value.dtype.is_floating_point:
            assert torch.equal(value, expected.round().to(value.dtype)), key
        else:
            scale = max(float(expected.abs().max()), 1.0) if expected.numel() else 1.0
            error = float((value.to(torch.float64) - expected).abs().max()) if expected.numel() else 0.0
            assert error <= TOLERANCE[value.dtype] * scale, (key, error)


@pytest.mark.parametrize("num_edges", [2, 3, 7])
def test_unequal_weights_match_float64_reference(num_edges):
    state_dicts = [random_state_dict(seed) for seed in range(num_edges)]
    weights = [137 * (i + 1) ** 2 + 11 for i in range(num_edges)]  # unequal sample counts
    result = average_state_dicts(state_dicts, weights)
    assert_matches_reference(result, reference_average(state_dicts, weights), state_dicts[0])


def test_streaming_equals_one_shot_and_tracks_properties():
    state_dicts = [random_state_dict(seed) for seed in range(3)]
    weights = [5.0, 1.5, 3]
    averager = StreamingAverager()
    for i, (state_dict, weight) in enumerate(zip(state_dicts, weights)):
        averager.add(state_dict, weight, name=f"e{i}")
    assert averager.count == 3
    assert averager.total_weight == pytest.approx(9.5)
    assert averager.names == ("e0", "e1", "e2")
    streamed = averager.result()
    one_shot = average_state_dicts(state_dicts, weights)
    for key in streamed:
        assert torch.equal(streamed[key], one_shot[key]), key


def test_equal_weights_give_the_plain_mean():
    state_dicts = [random_state_dict(seed) for seed in range(4)]
    for result in (average_state_dicts(state_dicts), average_state_dicts(state_dicts, [7, 7, 7, 7])):
        for key, value in result.items():
            if value.dtype == torch.bool:
                continue
            stacked = torch.stack([sd[key].to(torch.float64) for sd in state_dicts])
            mean = stacked.mean(dim=0)
            if not value.dtype.is_floating_point:
                assert torch.equal(value, mean.round().to(value.dtype)), key
            else:
                tolerance = TOLERANCE[value.dtype] * max(float(mean.abs().max()), 1.0)
                assert float((value.to(torch.float64) - mean).abs().max()) <= tolerance, key


@pytest.mark.parametrize("weight", [1.0, 37.0, 0.3])
def test_single_edge_returns_its_own_values(weight):
    state_dict = random_state_dict(0)
    result = average_state_dicts([state_dict], [weight])
    for key, value in state_dict.items():
        assert result[key].dtype == value.dtype
        assert torch.equal(result[key], value), key  # first edge's weight is the unit: bit-exact


def test_integer_buffer_is_rounded_weighted_mean():
    a = {"n": torch.tensor(10, dtype=torch.int64), "w": torch.zeros(2)}
    b = {"n": torch.tensor(21, dtype=torch.int64), "w": torch.ones(2)}
    result = average_state_dicts([a, b], [1, 2])
    assert result["n"].dtype == torch.int64
    assert int(result["n"]) == round((10 + 2 * 21) / 3)  # 17.33 -> 17
    assert torch.allclose(result["w"], torch.full((2,), 2 / 3))


def test_result_is_independent_of_the_running_sums():
    averager = StreamingAverager()
    averager.add(random_state_dict(0), 1, name="a")
    first = averager.result()
    first["fc.weight"].add_(100.0)  # mutating the result must not touch the averager
    again = averager.result()
    assert torch.equal(again["fc.weight"], random_state_dict(0)["fc.weight"])
    averager.add(random_state_dict(1), 1, name="b")  # adding after result() keeps working
    expected = reference_average([random_state_dict(0), random_state_dict(1)], [1, 1])
    assert_matches_reference(averager.result(), expected, random_state_dict(0))


def test_inputs_are_not_retained():
    import gc
    import weakref

    averager = StreamingAverager()
    averager.add(random_state_dict(0), 1, name="a")
    state_dict = random_state_dict(1)
    watched = weakref.ref(state_dict["fc.weight"])
    averager.add(state_dict, 2, name="b")
    del state_dict
    gc.collect()
    assert watched() is None  # memory is one running sum per tensor, not one copy per edge


def test_large_finite_values_are_not_mistaken_for_overflow():
    big = {"w": torch.full((4,), 1e38)}
    result = average_state_dicts([big, big], [1e5, 1e5])
    assert torch.allclose(result["w"], big["w"], rtol=1e-6)


def test_non_contiguous_and_channels_last_inputs():
    base = random_state_dict(0)
    other = random_state_dict(1)
    other["conv.weight"] = other["conv.weight"].contiguous(memory_format=torch.channels_last)
    other["fc.weight"] = other["fc.weight"].t().contiguous().t()  # same shape, transposed strides
    result = average_state_dicts([base, other], [2, 1])
    assert_matches_reference(result, reference_average([base, other], [2, 1]), base)


# -- rejections --------------------------------------------------------------------------------------


def _drop(sd):
    del sd["bn.running_var"]
    return "bn.running_var"


def _extra(sd):
    sd["head.extra"] = torch.zeros(3)
    return "head.extra"


def _shape(sd):
    sd["fc.weight"] = torch.zeros(10, 73)
    return "fc.weight"


def _dtype(sd):
    sd["conv.bias"] = sd["conv.bias"].double()
    return "conv.bias"


def _nan(sd):
    sd["fc.bias"][3] = float("nan")
    return "fc.bias"


def _inf(sd):
    sd["bn.running_mean"][0] = float("inf")
    return "bn.running_mean"


def _half_neg_inf(sd):
    sd["half.weight"][2, 1] = float("-inf")
    return "half.weight"


def _bool_mismatch(sd):
    sd["mask"] = torch.tensor([True, True, True])
    return "mask"


def _not_a_tensor(sd):
    sd["scalar"] = 1.5
    return "scalar"


@pytest.mark.parametrize(
    "corrupt", [_drop, _extra, _shape, _dtype, _nan, _inf, _half_neg_inf, _bool_mismatch, _not_a_tensor]
)
def test_rejection_names_edge_and_key_and_leaves_sums_unchanged(corrupt):
    good = [random_state_dict(seed) for seed in range(3)]
    averager = StreamingAverager()
    averager.add(good[0], 3, name="edge-good")
    bad = random_state_dict(1)
    key = corrupt(bad)
    with pytest.raises(AggregationError) as info:
        averager.add(bad, 2, name="edge-bad")
    message = str(info.value)
    assert "edge-bad" in message and key in message
    # Nothing of the rejected edge was accumulated: counters and sums are as before.
    assert averager.count == 1 and averager.names == ("edge-good",) and averager.total_weight == 3
    for k, v in averager.result().items():
        assert torch.equal(v, good[0][k]), k
    # The averager is still usable, and the rejected edge may retry under the same name.
    averager.add(good[1], 2, name="edge-bad")
    averager.add(good[2], 1, name="edge-3")
    assert_matches_reference(averager.result(), reference_average(good, [3, 2, 1]), good[0])


def test_nonfinite_key_is_identified_inside_a_large_group():
    state_dicts = [{f"layer{i}.weight": torch.randn(64) for i in range(40)} for _ in range(2)]
    state_dicts[1]["layer27.weight"][5] = float("nan")
    with pytest.raises(AggregationError, match=r"edge-1.*'layer27\.weight'.*NaN"):
        average_state_dicts(state_dicts)


@pytest.mark.parametrize("weight", [0, -1.0, float("nan"), float("inf"), "many", None, True])
def test_bad_weight_is_rejected(weight):
    averager = StreamingAverager()
    averager.add(random_state_dict(0), 1, name="edge-a")
    with pytest.raises(AggregationError, match="edge-w"):
        averager.add(random_state_dict(1), weight, name="edge-w")
    assert averager.count == 1 and averager.total_weight == 1


def test_empty_inputs_are_rejected():
    with pytest.raises(AggregationError, match="nothing"):
        StreamingAverager().result()
    with pytest.raises(AggregationError, match="nothing"):
        average_state_dicts([])
    with pytest.raises(AggregationError, match="edge-e"):
        StreamingAverager().add({}, 1, name="edge-e")
    with pytest.raises(AggregationError, match="weights"):
        average_state_dicts([random_state_dict(0)], [1, 2])


def test_duplicate_edge_name_is_rejected():
    averager = StreamingAverager()
    averager.add(random_state_dict(0), 1, name="edge-a")
    with pytest.raises(AggregationError, match="edge-a.*already"):
        averager.add(random_state_dict(1), 1, name="edge-a")


def test_reference_fixes_the_expected_structure():
    reference = random_state_dict(0)
    averager = StreamingAverager(reference)
    wrong = random_state_dict(1)
    wrong["fc.weight"] = torch.zeros(3)
    with pytest.raises(AggregationError, match=r"first-edge.*'fc\.weight'.*shape"):
        averager.add(wrong, 1, name="first-edge")
    with pytest.raises(AggregationError, match="nothing"):
        averager.result()
    averager.add(random_state_dict(1), 1, name="first-edge")
    assert averager.count == 1


def test_unsupported_dtype_is_rejected():
    with pytest.raises(AggregationError, match=r"edge-0.*'z'"):
        average_state_dicts([{"z": torch.zeros(2, dtype=torch.complex64)}])


# -- real models -------------------------------------------------------------------------------------


def _small_bn_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def test_small_batchnorm_model_average_loads_and_runs():
    models, state_dicts = [], []
    for seed, steps in zip(range(3), (1, 4, 9)):
        torch.manual_seed(seed)
        model = _small_bn_model().train()
        with torch.no_grad():
            for _ in range(steps):  # different running stats and num_batches_tracked per edge
                model(torch.randn(4, 3, 8, 8))
        models.append(model)
        state_dicts.append({k: v.clone() for k, v in model.state_dict().items()})
    weights = [600, 300, 100]
    result = average_state_dicts(state_dicts, weights)
    assert_matches_reference(result, reference_average(state_dicts, weights), state_dicts[0])
    assert int(result["1.num_batches_tracked"]) == round((600 * 1 + 300 * 4 + 100 * 9) / 1000)
    target = _small_bn_model().eval()
    target.load_state_dict(result, strict=True)
    assert torch.isfinite(target(torch.randn(2, 3, 8, 8))).all()


@pytest.mark.slow
def test_torchvision_mobilenet_average_matches_reference():
    # A real architecture with many BatchNorm layers (~50 counters), kept narrow so the test stays fast.
    torchvision = pytest.importorskip("torchvision")

    def build():
        return torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25)

    state_dicts = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = build()
        for index, module in enumerate(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            module.num_batches_tracked.fill_(seed * 7 + index)
            module.running_mean.normal_()
        state_dicts.append(model.state_dict())
    weights = [1000, 3000, 250]
    result = average_state_dicts(state_dicts, weights, names=["cifar-edge-a", "cifar-edge-b", "cifar-edge-c"])
    assert_matches_reference(result, reference_average(state_dicts, weights), state_dicts[0])
    fresh = build()
    fresh.load_state_dict(result, strict=True)
    assert torch.isfinite(fresh.eval()(torch.randn(1, 3, 32, 32))).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_accumulate_on_the_first_device():
    cpu_dicts = [random_state_dict(seed) for seed in range(3)]
    cuda_first = {k: v.cuda() for k, v in cpu_dicts[0].items()}
    averager = StreamingAverager()
    averager.add(cuda_first, 2, name="gpu-edge")
    averager.add(cpu_dicts[1], 1, name="cpu-edge")  # copied to the accumulators' device
    averager.add({k: v.cuda() for k, v in cpu_dicts[2].items()}, 5, name="gpu-edge-2")
    result = averager.result()
    assert all(v.device.type == "cuda" for v in result.values())
    cpu_result = {k: v.cpu() for k, v in result.items()}
    assert_matches_reference(cpu_result, reference_average(cpu_dicts, [2, 1, 5]), cpu_dicts[0])
    bad = {k: v.cuda() for k, v in random_state_dict(4).items()}
    bad["half.weight"][0, 0] = float("nan")
    with pytest.raises(AggregationError, match=r"gpu-bad.*'half\.weight'"):
        averager.add(bad, 1, name="gpu-bad")
    assert averager.count == 3
