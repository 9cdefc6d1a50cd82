"""Property-based fuzzing of the averager (ecavg.core.averaging).

The promise under test: for any state dicts and weights, averaging either returns finite tensors, each value
within the range of the edges' values (a weighted mean cannot leave it), or raises AggregationError; and it
raises only when an input is wrong (a bad weight, a NaN/Inf, an unsupported dtype, a meta tensor, mismatched
structure, differing bool tensors). Values span the whole range of each dtype, weights span 1e-300 to 1e300.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import given
from hypothesis import strategies as st

from ecavg.core.averaging import StreamingAverager, average_state_dicts
from ecavg.errors import AggregationError

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
REFUSED_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64, torch.qint8, torch.quint8]
ALL_DTYPES = FLOAT_DTYPES + INT_DTYPES + [torch.bool] + REFUSED_DTYPES
# Drawn more often than the refused ones, so that most federations are valid and get averaged.
LIKELY_DTYPES = FLOAT_DTYPES * 4 + INT_DTYPES + [torch.bool] * 2 + REFUSED_DTYPES

good_weights = st.one_of(
    st.floats(min_value=5e-324, max_value=1.7e308, allow_subnormal=True),
    st.sampled_from([1e-300, 1e300, 1.0, 3.0, 60000.0]),
    st.integers(1, 10**18),
    st.fractions(min_value=Fraction(1, 10**6), max_value=10**6).filter(lambda f: f > 0),
)
bad_weights = st.one_of(
    st.sampled_from([0, 0.0, -1.0, math.nan, math.inf, -math.inf, True, False, None, "2", b"2", [1.0]]),
    st.integers(max_value=0), st.just(10**400), st.text(max_size=4), st.just(torch.tensor(2.0)),
)


def value_strategy(dtype: torch.dtype):
    if dtype in INT_DTYPES:
        info = torch.iinfo(dtype)
        return st.one_of(st.integers(info.min, info.max), st.sampled_from([info.min, info.max, 0]))
    if dtype == torch.bool:
        return st.booleans()
    top = torch.finfo(dtype).max if dtype in FLOAT_DTYPES else 448.0
    return st.one_of(st.floats(-top, top), st.sampled_from([top, -top, 3e38, -3e38, 1e-300, 1e-45, 0.0]))


def make_tensor(values: list, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype in (torch.qint8, torch.quint8):
        return torch.quantize_per_tensor(torch.tensor(values, dtype=torch.float32).reshape(shape), 0.1, 0, dtype)
    if dtype in INT_DTYPES:
        return torch.tensor(values, dtype=dtype).reshape(shape)
    if dtype == torch.bool:
        return torch.tensor(values, dtype=torch.bool).reshape(shape)
    # Values beyond a small dtype's range become +-inf when cast: inputs the averager must refuse.
    return torch.tensor(values, dtype=torch.float64).reshape(shape).to(dtype)


@st.composite
def federations(draw):
    """(state dicts, weights, device): edges that share a structure, with values anywhere in each dtype."""
    num_edges = draw(st.integers(1, 4))
    structure = {}
    for key in draw(st.lists(st.sampled_from(["w", "b", "n", "flag", "x.y"]), min_size=1, max_size=3, unique=True)):
        structure[key] = (draw(st.sampled_from(LIKELY_DTYPES)), tuple(draw(st.lists(st.integers(0, 3), max_size=2))))
    device = draw(st.sampled_from(["cpu"] * 7 + ["meta"]))
    state_dicts = []
    for _ in range(num_edges):
        state_dict = {}
        for key, (dtype, shape) in structure.items():
            if draw(st.integers(0, 19)) == 0:  # now and then one edge disagrees in dtype or shape
                dtype, shape = draw(st.sampled_from(ALL_DTYPES)), (draw(st.integers(0, 3)),)
            numel = math.prod(shape)
            values = draw(st.lists(value_strategy(dtype), min_size=numel, max_size=numel))
            if numel and (dtype.is_floating_point or dtype.is_complex) and draw(st.integers(0, 9)) == 0:
                values[draw(st.integers(0, numel - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            tensor = make_tensor(values, dtype, shape)
            state_dict[key] = tensor if tensor.is_quantized else tensor.to(device)  # no quantized meta tensors
        state_dicts.append(state_dict)
    weights = [draw(good_weights) if draw(st.integers(0, 9)) else draw(bad_weights) for _ in range(num_edges)]
    return state_dicts, weights, device


def is_good_weight(weight) -> bool:
    if isinstance(weight, bool) or not isinstance(weight, (int, float, Fraction)):
        return False
    try:
        return math.isfinite(float(weight)) and float(weight) > 0
    except OverflowError:
        return False


def should_average(state_dicts, weights, device) -> bool:
    """Whether every input is acceptable, so that the averager must return a result."""
    if not all(is_good_weight(w) for w in weights):
        return False
    first = state_dicts[0]
    for state_dict in state_dicts:
        for key, tensor in state_dict.items():
            if tensor.device.type != "cpu" or tensor.dtype != first[key].dtype or tensor.shape != first[key].shape:
                return False
            if tensor.dtype not in FLOAT_DTYPES + INT_DTYPES + [torch.bool]:
                return False
            if tensor.dtype in FLOAT_DTYPES and not bool(torch.isfinite(tensor).all()):
                return False
            if tensor.dtype == torch.bool and not torch.equal(tensor, first[key]):
                return False
    return True


def check_result(result, state_dicts) -> None:
    """Finite, the right dtype and shape, and within the edges' range of values (up to rounding)."""
    for key, mean in result.items():
        stacked = torch.stack([sd[key].to(torch.float64) for sd in state_dicts])
        assert mean.dtype == state_dicts[0][key].dtype and mean.shape == state_dicts[0][key].shape, key
        if mean.dtype == torch.bool or not mean.numel():
            continue
        as_float = mean.to(torch.float64)
        assert bool(torch.isfinite(as_float).all()), key
        low, high = stacked.min(dim=0).values, stacked.max(dim=0).values
        if mean.dtype in FLOAT_DTYPES:
            eps = torch.finfo(torch.float32 if mean.dtype != torch.float64 else torch.float64).eps
            slack = 8 * len(state_dicts) * eps * torch.maximum(low.abs(), high.abs()) + 1e-300
            slack = slack + torch.finfo(mean.dtype).eps * torch.maximum(low.abs(), high.abs())
        else:
            slack = 1 + torch.maximum(low.abs(), high.abs()) * 2.0**-50
        assert bool(((as_float >= low - slack) & (as_float <= high + slack)).all()), (key, mean, low, high)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
@given(federation=federations())
def test_averaging_returns_finite_means_or_raises_aggregation_error(fuzz_tally, federation):
    state_dicts, weights, device = federation
    expected_ok = should_average(state_dicts, weights, device)
    try:
        result = fuzz_tally.run("averager", lambda: average_state_dicts(state_dicts, weights), AggregationError)
    except AggregationError as error:
        assert not expected_ok, f"valid inputs refused: {error}"
        assert "\n" not in str(error)
        return
    assert expected_ok, "invalid inputs were averaged"
    check_result(result, state_dicts)


@given(values=st.lists(st.floats(-3.4e38, 3.4e38), min_size=1, max_size=4),
       weights=st.lists(st.sampled_from([1e-300, 1e-30, 1.0, 7.0, 1e30, 1e300]), min_size=4, max_size=4),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_extreme_values_and_weights_give_the_exact_weighted_mean(fuzz_tally, values, weights, dtype):
    state_dicts = [{"w": torch.tensor([v], dtype=dtype), "n": torch.tensor([i - 2**62], dtype=torch.int64)}
                   for i, v in enumerate(values)]
    weights = weights[: len(values)]
    result = fuzz_tally.run("averager", lambda: average_state_dicts(state_dicts, weights), AggregationError)
    values = [float(state_dict["w"][0]) for state_dict in state_dicts]  # as the dtype holds them
    exact = sum(Fraction(w) * Fraction(v) for w, v in zip(weights, values)) / sum(Fraction(w) for w in weights)
    got = float(result["w"][0])
    assert math.isfinite(got)
    smallest = Fraction(1e-44 if dtype == torch.float32 else 1e-300)
    assert abs(Fraction(got) - exact) <= Fraction(1e-5) * max(abs(Fraction(v)) for v in values) + smallest
    assert -(2**62) <= int(result["n"][0]) <= 2 - 2**62 + len(values)


def test_known_escapes_now_raise_aggregation_error_or_average():
    """The inputs issue 11 found: sums that overflowed, NaN weights, RuntimeErrors, a string weight."""
    big = average_state_dicts([{"w": torch.tensor([3e38])}, {"w": torch.tensor([3e38])}])
    assert torch.equal(big["w"], torch.tensor([3e38]))
    top = torch.finfo(torch.float64).max  # found by the long fuzz run: the scaled mean rounded one ulp past the top
    edge = {"n": torch.tensor([0.0, top], dtype=torch.float64)}
    assert torch.equal(average_state_dicts([edge, edge], [3.0, 1.0])["n"], edge["n"])
    mixed = average_state_dicts([{"w": torch.tensor([1.0]), "n": torch.tensor(5)},
                                 {"w": torch.tensor([2.0]), "n": torch.tensor(7)}], [1e-300, 1e300])
    assert torch.equal(mixed["w"], torch.tensor([2.0])) and int(mixed["n"]) == 7
    for tensor in (torch.zeros(2, dtype=torch.float8_e4m3fn), torch.zeros(2, device="meta"),
                   torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.qint8)):
        with pytest.raises(AggregationError, match=r"edge 'edge-0': tensor 'w'"):
            average_state_dicts([{"w": tensor}, {"w": tensor}])
    with pytest.raises(AggregationError, match="edge 'edge-0': weight must be a real number, got str '2'"):
        average_state_dicts([{"w": torch.zeros(2)}], ["2"])


def test_ordinary_float32_sums_are_not_widened():
    """Widening is kept for sums near the range, so ordinary results are plain float32 accumulation."""
    generator = torch.Generator().manual_seed(0)
    state_dicts = [{"w": torch.randn(1000, generator=generator) * 1e3} for _ in range(5)]
    weights = [3.0, 1.0, 7.0, 2.0, 5.0]
    averager = StreamingAverager()
    for i, (state_dict, weight) in enumerate(zip(state_dicts, weights)):
        averager.add(state_dict, weight, name=f"edge-{i}")
    expected = state_dicts[0]["w"].clone()
    for state_dict, weight in zip(state_dicts[1:], weights[1:]):
        expected.add_(state_dict["w"], alpha=weight / weights[0])
    expected = expected / sum(w / weights[0] for w in weights)
    assert torch.equal(averager.result()["w"], expected)
