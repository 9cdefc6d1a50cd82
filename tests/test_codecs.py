"""Tests for ecavg.core.codecs: error bounds per codec, exact tensors, deltas, byte counts, rejected payloads."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import Tensor

from ecavg.core import CODECS, Codec, codec
from ecavg.core.serialization import decode_metadata, decode_state_dict, encode_state_dict
from ecavg.errors import ConfigError, WeightsError
from ecavg.models import build_model

SOURCE = "edge-3"
EPS32 = torch.finfo(torch.float32).eps


def transfer_roundtrip(state_dict: dict[str, Tensor], codec: Codec, base: dict[str, Tensor] | None = None, *,
                       name: str = "local transfer") -> tuple[dict[str, Tensor], int]:
    """What the receiver decodes when ``state_dict`` crosses the wire under ``codec`` alone, and the payload's
    bytes (the runtimes go through ``ecavg.core.transfer.EdgeLinks``, which adds ``transfer.deflate``)."""
    payload = codec.encode(state_dict, base=base)
    return codec.decode(payload, reference=state_dict, base=base, name=name), len(payload)


def sample_state_dict(seed: int = 0) -> dict[str, Tensor]:
    """A small conv net's state dict with every kind of tensor a codec treats differently."""
    gen = torch.Generator().manual_seed(seed)
    conv = torch.randn(8, 3, 3, 3, generator=gen) * torch.logspace(-3, 1, 8).reshape(8, 1, 1, 1)
    conv[5] = 0.0  # an all-zero output channel
    return {
        "conv.weight": conv,
        "bn.weight": torch.rand(8, generator=gen) + 0.5,
        "bn.bias": torch.randn(8, generator=gen) * 0.1,
        "bn.running_mean": torch.randn(8, generator=gen),
        "bn.running_var": torch.rand(8, generator=gen) * 1e-3 + 1e-7,
        "bn.num_batches_tracked": torch.tensor(4321, dtype=torch.int64),
        "fc.weight": torch.randn(10, 72, generator=gen) * 0.05,
        "fc.bias": torch.randn(10, generator=gen),
        "head.weight": (torch.randn(4, 6, generator=gen) * 0.3).to(torch.float16),  # decoded back to float16
        "step": torch.tensor(7, dtype=torch.int32),
    }


COMPRESSED = ("conv.weight", "fc.weight", "head.weight")
KEPT = tuple(key for key in sample_state_dict() if key not in COMPRESSED)


def per_channel_scale(value: Tensor) -> Tensor:
    """The scale the int8 codec uses, reshaped to broadcast over ``value`` (float32)."""
    absmax = value.float().reshape(value.shape[0], -1).abs().amax(dim=1)
    scale = (absmax / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return scale.reshape((-1,) + (1,) * (value.dim() - 1))


def assert_exact(decoded: Tensor, original: Tensor, key: str) -> None:
    assert decoded.dtype == original.dtype, key
    assert decoded.shape == original.shape, key
    assert decoded.reshape(-1).view(torch.uint8).equal(original.reshape(-1).view(torch.uint8)), key


def assert_within_codec_bound(name: str, decoded: Tensor, target: Tensor, slack: Tensor | float = 0.0) -> None:
    """|decoded - target| within the codec's bound for ``target`` (plus ``slack`` for float32 rounding elsewhere)."""
    target = target.double()
    error = (decoded.double() - target).abs()
    if name == "fp32":
        bound = target.abs() * EPS32 / 2
    elif name == "fp16":
        bound = target.abs() * 2.0**-11
        # Below float16's normal range the spacing is fixed at 2^-24: half of it is the bound there.
        bound = torch.where(target.abs() < 2.0**-14, torch.full_like(bound, 2.0**-25), bound)
    elif name == "bf16":
        bound = target.abs() * 2.0**-8
    else:
        # Half a quantisation step, plus the float32 rounding of value / scale before rounding to an integer.
        bound = per_channel_scale(target).double() * (0.5 + 128 * EPS32)
    excess = error - bound - slack
    assert float(excess.max()) <= 0, f"{name}: error {float(error.max())} exceeds the bound"


# --- round trips ---


def test_codec_names_and_lookup():
    assert CODECS == ("fp32", "fp16", "bf16", "int8")
    for name in CODECS:
        plain, with_delta = codec(name), codec(name, delta=True)
        assert isinstance(plain, Codec) and plain.name == name and not plain.delta
        assert with_delta.delta and with_delta.label == f"{name}+delta" and plain.label == name
        assert plain == codec(name) and plain != with_delta
    with pytest.raises(ConfigError, match="unknown transfer codec 'int4'.*fp32, fp16, bf16, int8"):
        codec("int4")
    with pytest.raises(ConfigError, match="delta must be true or false"):
        codec("fp16", delta="yes")  # type: ignore[arg-type]


def test_fp32_round_trip_is_bit_exact():
    original = sample_state_dict()
    decoded, nbytes = transfer_roundtrip(original, codec("fp32"))
    assert list(decoded) == list(original)
    for key, tensor in original.items():
        assert_exact(decoded[key], tensor, key)
    assert nbytes == len(codec("fp32").encode(original))


@pytest.mark.parametrize("name", CODECS)
def test_kept_tensors_are_exact_and_compressed_ones_within_bound(name):
    original = sample_state_dict()
    decoded, _ = transfer_roundtrip(original, codec(name), name=SOURCE)
    assert list(decoded) == list(original)
    for key in KEPT:  # 1-D tensors, BatchNorm statistics, integers: exactly as they were
        assert_exact(decoded[key], original[key], key)
    for key in COMPRESSED:
        assert decoded[key].dtype == original[key].dtype, key  # the reference's dtype, float16 included
        assert decoded[key].shape == original[key].shape, key
        # head.weight is float16 on both ends: the cast back to float16 adds at most half its spacing.
        slack = original[key].double().abs() * 2.0**-11 if original[key].dtype == torch.float16 else 0.0
        assert_within_codec_bound(name, decoded[key].float(), original[key].float(), slack)
    if name == "int8":
        assert decoded["conv.weight"][5].abs().max() == 0  # a zero channel comes back exactly zero


def test_batchnorm_statistics_stay_exact_whatever_their_shape():
    # Always 1-D in torch's BatchNorm, but the rule is by name too: running statistics never go through 8 bits.
    state = {"bn.running_var": torch.rand(4, 4) * 1e-6 + 1e-9, "bn.running_mean": torch.randn(3, 2)}
    for name in CODECS:
        decoded, _ = transfer_roundtrip(state, codec(name))
        for key, tensor in state.items():
            assert_exact(decoded[key], tensor, f"{name} {key}")


def test_float_codecs_meet_their_relative_error_bound_in_the_normal_range():
    gen = torch.Generator().manual_seed(1)
    # Magnitudes from 1e-4 to 1e4, inside float16's normal range [2^-14, 65504].
    weight = torch.randn(64, 256, generator=gen) * torch.logspace(-4, 4, 64).reshape(64, 1)
    weight = torch.where(weight.abs() < 2.0**-14, torch.full_like(weight, 2.0**-14), weight)
    for name, bound in (("fp16", 2.0**-11), ("bf16", 2.0**-8)):
        decoded, _ = transfer_roundtrip({"w": weight}, codec(name))
        relative = ((decoded["w"].double() - weight.double()) / weight.double()).abs()
        assert float(relative.max()) <= bound, name
        assert float(relative.max()) > bound / 8, name  # the cast really happened


def test_int8_error_is_at_most_half_a_step_per_channel():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(32, 16, 3, 3, generator=gen) * torch.logspace(-6, 2, 32).reshape(32, 1, 1, 1)
    decoded, _ = transfer_roundtrip({"w": weight}, codec("int8"))
    error = (decoded["w"] - weight).abs().reshape(32, -1).amax(dim=1)
    scale = weight.abs().reshape(32, -1).amax(dim=1) / 127
    assert bool((error <= scale * (0.5 + 1e-5)).all())
    assert bool((error > scale * 0.3).all())  # each channel has its own scale, and it is used


def test_int8_survives_tiny_and_huge_channels():
    weight = torch.tensor([[1e-45, -1e-45, 0.0], [3e38, -3e38, 1.0], [0.0, 0.0, 0.0]])
    decoded, _ = transfer_roundtrip({"w": weight}, codec("int8"))
    assert bool(torch.isfinite(decoded["w"]).all())
    assert_within_codec_bound("int8", decoded["w"], weight)


@pytest.mark.parametrize("name", CODECS)
def test_delta_round_trip_applies_the_codec_bound_to_the_difference(name):
    base = sample_state_dict(seed=0)
    gen = torch.Generator().manual_seed(5)
    trained = {
        key: (t + 1e-3 * torch.randn(t.shape, generator=gen).to(t.dtype)) if t.is_floating_point() else t + 1
        for key, t in base.items()
    }
    delta_codec = codec(name, delta=True)
    decoded, nbytes = transfer_roundtrip(trained, delta_codec, base, name=SOURCE)
    assert nbytes == len(delta_codec.encode(trained, base=base))
    for key in KEPT:
        assert_exact(decoded[key], trained[key], key)  # never sent as a difference
    for key in ("conv.weight", "fc.weight"):
        difference = trained[key] - base[key]
        # float32 rounding of the subtraction and of adding the base back: one ulp of the weights each.
        slack = trained[key].double().abs() * EPS32 * 2
        assert_within_codec_bound(name, decoded[key] - base[key], difference, slack)
    if name != "fp32":
        plain, _ = transfer_roundtrip(trained, codec(name))
        error_delta = (decoded["fc.weight"] - trained["fc.weight"]).abs().max()
        error_plain = (plain["fc.weight"] - trained["fc.weight"]).abs().max()
        assert error_delta < error_plain / 4  # the point of deltas: error scales with the change


def test_payload_records_codec_and_per_tensor_encoding():
    payload = codec("int8", delta=True).encode(sample_state_dict(1), base=sample_state_dict(0))
    metadata = decode_metadata(payload)
    assert metadata["ecavg.codec"] == "int8" and metadata["ecavg.delta"] == "true"
    assert '"conv.weight":"int8"' in metadata["ecavg.encodings"]
    assert '"bn.running_var":"raw"' in metadata["ecavg.encodings"]
    wire = decode_state_dict(payload, name=SOURCE)
    assert wire["conv.weight"].dtype == torch.int8 and wire["conv.weight:scale"].shape == (8,)
    assert wire["bn.running_var"].dtype == torch.float32


# --- bytes ---


@functools.cache
def conv_net_state(model: str) -> dict[str, Tensor]:
    torch.manual_seed(0)
    return build_model(model, num_classes=10, in_channels=3, image_size=32).state_dict()


@pytest.mark.parametrize(
    ("model", "int8_range"),
    [
        ("cnn", (0.25, 0.27)),
        # MobileNetV2's 52 BatchNorms keep 3.0% of its bytes in float32, and its depthwise filters (9 weights per
        # scale) pay more for scales: int8 lands at 28.4%.
        ("mobilenet_v2", (0.27, 0.29)),
    ],
)
def test_byte_counts_against_fp32(model, int8_range):
    state = conv_net_state(model)
    fp32 = len(codec("fp32").encode(state))
    raw = len(encode_state_dict(state))
    assert raw <= fp32 <= raw * 1.01  # today's payload plus the codec's metadata
    for name in ("fp16", "bf16"):
        assert 0.50 <= len(codec(name).encode(state)) / fp32 <= 0.52, name
    int8 = len(codec("int8").encode(state)) / fp32
    assert int8_range[0] <= int8 <= int8_range[1]
    base = {key: torch.zeros_like(t) for key, t in state.items()}
    assert len(codec("int8", delta=True).encode(state, base=base)) / fp32 == pytest.approx(int8, abs=1e-3)


# --- rejection of bad payloads ---


def tampered(payload: bytes, *, set_: dict[str, Tensor] | None = None, drop: tuple[str, ...] = (),
             metadata: dict[str, str] | None = None) -> bytes:
    """``payload`` re-encoded with tensors replaced/added, removed, or metadata entries changed."""
    wire = decode_state_dict(payload, name="test")
    meta = decode_metadata(payload)
    wire.update(set_ or {})
    for key in drop:
        wire.pop(key)
    meta.update(metadata or {})
    return encode_state_dict(wire, metadata=meta)


def decode_int8(payload: bytes, **kwargs) -> dict[str, Tensor]:
    return codec("int8").decode(payload, reference=sample_state_dict(), name=SOURCE, **kwargs)


@pytest.fixture
def int8_payload() -> bytes:
    return codec("int8").encode(sample_state_dict())


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0.0, r"'conv\.weight' has an int8 scale <= 0"),
        (-0.5, r"'conv\.weight' has an int8 scale <= 0"),
        (math.nan, r"'conv\.weight:scale' contains NaN or Inf"),
        (math.inf, r"'conv\.weight:scale' contains NaN or Inf"),
        (-math.inf, r"'conv\.weight:scale' contains NaN or Inf"),
    ],
)
def test_bad_int8_scales_are_rejected(int8_payload, value, message):
    scale = decode_state_dict(int8_payload, name="test")["conv.weight:scale"].clone()
    scale[2] = value
    with pytest.raises(WeightsError, match=rf"weights from '{SOURCE}'.*{message}"):
        decode_int8(tampered(int8_payload, set_={"conv.weight:scale": scale}))


@pytest.mark.parametrize("bad_scale", [torch.ones(9), torch.ones(1), torch.ones(8, 1), torch.ones(8).double()])
def test_int8_scale_of_wrong_shape_or_dtype_is_rejected(int8_payload, bad_scale):
    with pytest.raises(WeightsError, match=r"'conv\.weight:scale' has (shape|dtype)"):
        decode_int8(tampered(int8_payload, set_={"conv.weight:scale": bad_scale}))


@pytest.mark.parametrize(
    ("key", "bad", "message"),
    [
        ("conv.weight", torch.zeros(8, 3, 3, 2, dtype=torch.int8), "has shape"),
        ("conv.weight", torch.zeros(8, 3, 3, 3, dtype=torch.int16), "has dtype"),
        ("conv.weight", torch.zeros(8, 3, 3, 3), "has dtype"),
        ("bn.running_var", torch.ones(8, dtype=torch.float16), "has dtype"),
        ("bn.bias", torch.ones(9), "has shape"),
        ("bn.num_batches_tracked", torch.tensor(1, dtype=torch.int32), "has dtype"),
    ],
)
def test_wrong_tensor_shape_or_dtype_is_rejected(int8_payload, key, bad, message):
    with pytest.raises(WeightsError, match=rf"'{SOURCE}'.*'{key}' {message}"):
        decode_int8(tampered(int8_payload, set_={key: bad}))


def test_wrong_dtype_in_a_float_codec_is_rejected():
    payload = codec("fp16").encode(sample_state_dict())
    as_bf16 = decode_state_dict(payload, name="test")["fc.weight"].to(torch.bfloat16)
    with pytest.raises(WeightsError, match=r"'fc\.weight' has dtype torch\.bfloat16, expected torch\.float16"):
        codec("fp16").decode(tampered(payload, set_={"fc.weight": as_bf16}), reference=sample_state_dict(),
                             name=SOURCE)


def test_missing_and_extra_tensors_are_rejected(int8_payload):
    with pytest.raises(WeightsError, match=r"missing tensor.*'fc\.bias'"):
        decode_int8(tampered(int8_payload, drop=("fc.bias",)))
    with pytest.raises(WeightsError, match=r"missing tensor.*'fc\.weight:scale'"):
        decode_int8(tampered(int8_payload, drop=("fc.weight:scale",)))
    with pytest.raises(WeightsError, match=r"unexpected tensor.*'spy'"):
        decode_int8(tampered(int8_payload, set_={"spy": torch.zeros(3)}))
    # The same, with the encoding table in the metadata edited to match.
    without = codec("int8").encode({k: v for k, v in sample_state_dict().items() if k != "fc.bias"})
    with pytest.raises(WeightsError, match=r"missing tensor 'fc\.bias'"):
        decode_int8(without)
    extra = codec("int8").encode({**sample_state_dict(), "spy": torch.zeros(3)})
    with pytest.raises(WeightsError, match=r"unexpected tensor\(s\) 'spy'"):
        decode_int8(extra)


def test_wrong_codec_delta_flag_or_encoding_table_is_rejected():
    state = sample_state_dict()
    fp16 = codec("fp16").encode(state)
    with pytest.raises(WeightsError, match=rf"'{SOURCE}'.*encoded with codec 'fp16', expected 'bf16'"):
        codec("bf16").decode(fp16, reference=state, name=SOURCE)
    with pytest.raises(WeightsError, match="encoded with codec None, expected 'fp32'"):
        codec("fp32").decode(encode_state_dict(state), reference=state, name=SOURCE)  # a plain, codec-less payload
    with pytest.raises(WeightsError, match="delta='false', expected 'true'"):
        codec("fp16", delta=True).decode(fp16, reference=state, base=state, name=SOURCE)
    table = decode_metadata(fp16)["ecavg.encodings"].replace('"fc.weight":"fp16"', '"fc.weight":"raw"')
    with pytest.raises(WeightsError, match=r"'fc\.weight' was encoded as 'raw', expected 'fp16'"):
        codec("fp16").decode(tampered(fp16, metadata={"ecavg.encodings": table}), reference=state, name=SOURCE)
    with pytest.raises(WeightsError, match="per-tensor encoding table"):
        codec("fp16").decode(tampered(fp16, metadata={"ecavg.encodings": "[1"}), reference=state, name=SOURCE)


def test_non_finite_values_are_rejected_on_the_wire_and_after_decoding(int8_payload):
    fp16 = codec("fp16").encode(sample_state_dict())
    weight = decode_state_dict(fp16, name="test")["fc.weight"].clone()
    weight[3, 4] = math.nan
    with pytest.raises(WeightsError, match=r"'fc\.weight' contains NaN or Inf"):
        codec("fp16").decode(tampered(fp16, set_={"fc.weight": weight}), reference=sample_state_dict(), name=SOURCE)
    # A finite, positive but huge scale: every scale check passes, the dequantised tensor overflows.
    huge = torch.full((10,), 3e38)
    with pytest.raises(WeightsError, match=r"'fc\.weight' contains NaN or Inf values once decoded"):
        decode_int8(tampered(int8_payload, set_={"fc.weight:scale": huge}))
    # A delta that is finite on the wire but overflows once the base is added back.
    base = {key: (t.clone().fill_(3e38) if key == "fc.weight" else t) for key, t in sample_state_dict().items()}
    big_delta = codec("bf16", delta=True).encode(base, base={k: t - 0 for k, t in base.items()})
    wire = decode_state_dict(big_delta, name="test")["fc.weight"].clone().fill_(3e38)
    with pytest.raises(WeightsError, match=r"'fc\.weight' contains NaN or Inf values once decoded"):
        codec("bf16", delta=True).decode(
            tampered(big_delta, set_={"fc.weight": wire}), reference=sample_state_dict(), base=base, name=SOURCE
        )


def test_size_limit_is_checked_before_parsing(int8_payload):
    assert decode_int8(int8_payload, max_bytes=len(int8_payload))
    with pytest.raises(WeightsError, match=rf"'{SOURCE}'.*{len(int8_payload)} bytes exceeds the limit"):
        decode_int8(int8_payload, max_bytes=len(int8_payload) - 1)
    with pytest.raises(WeightsError, match="exceeds the limit of 100 bytes"):
        decode_int8(b"\xff" * 1000, max_bytes=100)  # garbage, but too big to even look at
    for garbage in (b"", b"\x00" * 7, b"not safetensors at all", int8_payload[: len(int8_payload) // 2]):
        with pytest.raises(WeightsError, match=f"'{SOURCE}'"):
            decode_int8(garbage)
    with pytest.raises(WeightsError, match="expected bytes, got str"):
        decode_int8("payload")  # type: ignore[arg-type]


# --- encoder and argument errors ---


def test_delta_needs_a_base_and_plain_codecs_take_none():
    state = sample_state_dict()
    with pytest.raises(WeightsError, match="sends deltas: encode needs the base"):
        codec("int8", delta=True).encode(state)
    with pytest.raises(WeightsError, match="sends deltas: decode needs the base"):
        codec("int8", delta=True).decode(b"", reference=state, name=SOURCE)
    with pytest.raises(WeightsError, match="does not send deltas"):
        codec("int8").encode(state, base=state)
    with pytest.raises(WeightsError, match=r"base weights lack tensor 'fc\.weight'"):
        codec("fp16", delta=True).encode(state, base={k: v for k, v in state.items() if k != "fc.weight"})
    payload = codec("fp16", delta=True).encode(state, base=state)
    wrong_base = {**state, "conv.weight": torch.zeros(8, 3, 3, 2)}
    with pytest.raises(WeightsError, match=r"base tensor 'conv\.weight' has shape \(8, 3, 3, 2\)"):
        codec("fp16", delta=True).decode(payload, reference=state, base=wrong_base, name=SOURCE)


def test_encoder_refuses_values_it_cannot_represent():
    with pytest.raises(WeightsError, match=r"'w' is not finite once encoded.*beyond fp16's range"):
        codec("fp16").encode({"w": torch.full((2, 2), 1e6)})
    assert codec("bf16").encode({"w": torch.full((2, 2), 1e6)})  # bfloat16 has float32's range
    with pytest.raises(WeightsError, match="'w' is not finite once encoded"):
        codec("int8").encode({"w": torch.tensor([[1.0, math.nan]])})
    with pytest.raises(WeightsError, match="contains ':scale'"):
        codec("int8").encode({"w:scale": torch.ones(2, 2)})
    with pytest.raises(WeightsError, match="must be str -> Tensor"):
        codec("fp32").encode({"w": [1.0, 2.0]})  # type: ignore[dict-item]
