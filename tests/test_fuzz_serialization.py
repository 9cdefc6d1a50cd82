"""Property-based fuzzing of the safetensors decoder (ecavg.core.serialization) and of an edge's reply (wire.py).

The promise under test: whatever the bytes, decoding either returns a state dict of finite CPU tensors or raises
WeightsError; nothing else escapes (KeyError, RecursionError, NotImplementedError, ...). The payloads are mutated
encodings of real state dicts (byte flips, truncation, insertion, a wrong header length), headers written from
scratch (known and unknown dtypes, odd shapes and offsets, metadata), deeply nested JSON and raw bytes. Budget and
seed come from the hypothesis profile (tests/conftest.py); `make fuzz` runs the long profile.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import threading
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given
from hypothesis import strategies as st

from ecavg.core.serialization import (
    byte_planes,
    decode_metadata,
    decode_state_dict,
    encode_state_dict,
    load_state_dict,
)
from ecavg.errors import WeightsError

ENCODABLE_DTYPES = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64,
]
HEADER_DTYPES = [
    "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "C64",
    "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
    # not accepted: formats torch or this decoder cannot load, and nonsense
    "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C128", "I128", "f32", "", "F32 ", "__metadata__",
]
# Bits per element, so that synthesised entries have the byte counts the safetensors library expects.
ITEM_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
             "U16": 16, "U32": 32, "U64": 64, "BOOL": 8, "C64": 64, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E4M3FNUZ": 8,
             "F8_E5M2FNUZ": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}

finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=64)


@st.composite
def state_dicts(draw, max_tensors: int = 4) -> dict[str, torch.Tensor]:
    names = draw(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=max_tensors, unique=True))
    result = {}
    for name in names:
        dtype = draw(st.sampled_from(ENCODABLE_DTYPES))
        shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
        numel = 1
        for n in shape:
            numel *= n
        values = draw(st.lists(st.one_of(st.floats(-1e3, 1e3), finite_or_not), min_size=numel, max_size=numel))
        tensor = torch.tensor(values, dtype=torch.float64).reshape(shape)
        if dtype == torch.bool:
            tensor = tensor > 0
        elif not (dtype.is_floating_point or dtype.is_complex):
            tensor = torch.nan_to_num(tensor, nan=0.0, posinf=0.0, neginf=0.0).clamp(-100, 100)
        result[name] = tensor.to(dtype)
    return result


def mutate(payload: bytes, data) -> bytes:
    """One to three byte-level mutations of `payload`, chosen by hypothesis."""
    out = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete", "header_length", "overwrite"]))
        position = data.draw(st.integers(0, max(len(out) - 1, 0)), label="position")
        if kind == "flip" and out:
            out[position] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "truncate":
            del out[position:]
        elif kind == "insert":
            out[position:position] = data.draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete" and out:
            del out[position : position + data.draw(st.integers(1, 16))]
        elif kind == "header_length" and len(out) >= 8:
            out[:8] = struct.pack("<Q", data.draw(st.one_of(st.integers(0, len(out) + 8), st.integers(0, 2**64 - 1))))
        elif kind == "overwrite" and out:
            chunk = data.draw(st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b"\xff", b"1e999", b"-1",
                                               b"9" * 40]))
            out[position : position + len(chunk)] = chunk
    return bytes(out)


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def check_decoded(tensors: dict[str, torch.Tensor], payload: bytearray) -> None:
    """What a successful decode promises: CPU tensors, no NaN/Inf, and no aliasing of the caller's buffer."""
    snapshot = {key: tensor.clone() for key, tensor in tensors.items()}
    for key, tensor in tensors.items():
        assert isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu", key
        if (tensor.is_floating_point() or tensor.is_complex()) and tensor.numel():
            values = torch.view_as_real(tensor) if tensor.is_complex() else tensor
            assert bool(torch.isfinite(values.float()).all()), key
    for i in range(len(payload)):  # the caller may reuse its buffer: the tensors must not change with it
        payload[i] ^= 0xFF
    for key, tensor in tensors.items():
        assert torch.equal(raw_bytes(tensor), raw_bytes(snapshot[key])), key


def decode(fuzz_tally, payload: bytes, **kwargs) -> dict[str, torch.Tensor] | None:
    undo_byte_planes(fuzz_tally, payload)
    buffer = bytearray(payload)
    try:
        tensors = fuzz_tally.run("decoder", lambda: decode_state_dict(buffer, name="edge-f", **kwargs), WeightsError)
    except WeightsError as error:
        assert "edge-f" in str(error) and "\n" not in str(error)
        return None
    check_decoded(tensors, buffer)
    return tensors


def undo_byte_planes(fuzz_tally, payload: bytes) -> None:
    """transfer.deflate's receiver undoes the byte planes of the bytes it inflated before it decodes them: any bytes
    give bytes of the same length or the documented error."""
    try:
        out = fuzz_tally.run("byte_planes", lambda: byte_planes(payload, name="edge-f", inverse=True), WeightsError)
    except WeightsError as error:
        assert "edge-f" in str(error) and "\n" not in str(error)
        return
    assert isinstance(out, bytes) and len(out) == len(payload)


# -- encodings of real state dicts --------------------------------------------------------------------------


@given(state_dict=state_dicts())
def test_valid_payloads_round_trip_unless_they_hold_nan(fuzz_tally, state_dict):
    payload = encode_state_dict(state_dict)
    nonfinite = any(
        (t.is_floating_point() or t.is_complex()) and t.numel()
        and not bool(torch.isfinite(torch.view_as_real(t) if t.is_complex() else t.float()).all())
        for t in state_dict.values()
    )
    decoded = decode(fuzz_tally, payload, reference=state_dict if not nonfinite else None)
    if nonfinite:
        assert decoded is None
        return
    assert decoded is not None and list(decoded) == list(state_dict)
    for key, tensor in state_dict.items():
        assert decoded[key].dtype == tensor.dtype and torch.equal(raw_bytes(decoded[key]), raw_bytes(tensor)), key


@given(state_dict=state_dicts(), data=st.data(), use_reference=st.booleans(), limit=st.none() | st.integers(0, 4096))
def test_mutated_payloads_decode_or_raise_weights_error(fuzz_tally, state_dict, data, use_reference, limit):
    payload = mutate(encode_state_dict(state_dict, metadata={"round": "1"}), data)
    decode(fuzz_tally, payload, reference=state_dict if use_reference else None, max_bytes=limit)
    try:
        fuzz_tally.run("decoder", lambda: decode_metadata(payload, name="edge-f"), WeightsError)
    except WeightsError:
        pass


# -- headers written from scratch -----------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), finite_or_not, st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


@st.composite
def header_entries(draw) -> tuple[dict, int]:
    """A tensor entry that is usually well-formed (with any dtype name) but may be wrong in any field."""
    wrong = draw(st.sets(st.sampled_from(["dtype", "shape", "data_offsets"]), max_size=3)) \
        if draw(st.integers(0, 3)) == 0 else set()
    dtype = draw(json_values) if "dtype" in wrong else draw(st.sampled_from(HEADER_DTYPES))
    shape = draw(st.one_of(st.lists(st.one_of(st.integers(-3, 2**64), st.booleans(), st.floats(0, 4)), max_size=3),
                           json_values)) if "shape" in wrong else draw(st.lists(st.integers(0, 5), max_size=3))
    numel = 1
    if isinstance(shape, list) and all(isinstance(n, int) for n in shape):
        for n in shape:
            numel *= max(int(n), 0)
    bits = ITEM_BITS.get(dtype, 8) if isinstance(dtype, str) else 8
    nbytes = numel * bits // 8 if numel < 4096 else draw(st.integers(0, 64))
    offsets = draw(st.one_of(st.lists(st.integers(-2, 2**64), max_size=3), json_values)) if "data_offsets" in wrong \
        else "auto"
    entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    for key in draw(st.lists(st.sampled_from(["dtype", "shape", "data_offsets"]), max_size=1)):
        del entry[key]
    return entry, nbytes


@given(entries=st.lists(st.tuples(st.text(max_size=8), header_entries()), max_size=4),
       metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=2),
                          json_values).filter(lambda m: m is None or isinstance(m, dict)) | json_values,
       extra_body=st.sampled_from([0, 0, 0, -1, 1, -8, 8]), fill=st.binary(min_size=1, max_size=1),
       limit=st.sampled_from([None, None, None, 16, 2048]))
def test_synthesised_headers_decode_or_raise_weights_error(fuzz_tally, entries, metadata, extra_body, fill, limit):
    header: dict = {}
    offset = 0
    for name, (entry, nbytes) in entries:
        if entry.get("data_offsets") == "auto":
            entry["data_offsets"] = [offset, offset + nbytes]
        offset += nbytes
        header[name] = entry
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    body = fill * max(offset + extra_body, 0)
    decode(fuzz_tally, struct.pack("<Q", len(raw)) + raw + body, max_bytes=limit)


@given(depth=st.integers(1, 200_000), opener=st.sampled_from(["[", '{"a":', '{"a":{"dtype":']),
       balanced=st.booleans())
def test_deeply_nested_headers_raise_weights_error(fuzz_tally, depth, opener, balanced):
    closer = {"[": "]", '{"a":': "}", '{"a":{"dtype":': "}}"}[opener]
    raw = (opener * depth + "1" + (closer * depth if balanced else "")).encode()
    payload = struct.pack("<Q", len(raw)) + raw
    assert decode(fuzz_tally, payload) is None or depth <= 1


@given(raw=st.binary(max_size=256))
def test_raw_bytes_decode_or_raise_weights_error(fuzz_tally, raw):
    decode(fuzz_tally, raw)
    decode(fuzz_tally, struct.pack("<Q", len(raw)) + raw)


# -- files ------------------------------------------------------------------------------------------------


@given(state_dict=state_dicts(max_tensors=2), data=st.data(), limit=st.none() | st.integers(0, 2048))
def test_files_load_or_raise_weights_error(fuzz_tally, state_dict, data, limit):
    payload = mutate(encode_state_dict(state_dict), data) if data.draw(st.booleans()) else encode_state_dict(state_dict)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "w.safetensors"
        path.write_bytes(payload)
        try:
            fuzz_tally.run("decoder", lambda: load_state_dict(path, max_bytes=limit), WeightsError)
        except WeightsError as error:
            assert str(path) in str(error)
        else:
            assert limit is None or len(payload) <= limit


def test_a_device_file_is_refused_not_read():
    with pytest.raises(WeightsError, match="not a regular file"):
        load_state_dict("/dev/zero", max_bytes=1 << 20)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX named pipes")
def test_a_pipe_is_read_only_up_to_max_bytes(tmp_path):
    fifo = tmp_path / "weights.fifo"
    os.mkfifo(fifo)
    written: list[int] = []

    def endless_writer() -> None:
        try:
            with open(fifo, "wb") as handle:
                while sum(written) < 64 << 20:  # far more than the limit; stops when the reader closes
                    handle.write(b"\0" * 65536)
                    written.append(65536)
        except BrokenPipeError:
            pass

    writer = threading.Thread(target=endless_writer, daemon=True)
    writer.start()
    with pytest.raises(WeightsError, match="exceeds the limit of 100000 bytes"):
        load_state_dict(fifo, max_bytes=100_000)
    writer.join(timeout=10)
    assert sum(written) < 64 << 20


def test_known_escapes_now_raise_weights_error():
    """The payloads issue 11 found escaping (KeyError, RecursionError, NotImplementedError)."""
    def payload(header: dict | bytes, body: bytes = b"") -> bytes:
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + body

    for dtype in ("F8_E8M0", "F4"):
        with pytest.raises(WeightsError, match=f"tensor 'a' has dtype '{dtype}'"):
            decode_state_dict(payload({"a": {"dtype": dtype, "shape": [2], "data_offsets": [0, 1]}}, b"\0"), name="e")
    with pytest.raises(WeightsError, match="nested deeper"):
        decode_state_dict(payload(b"[" * 100_000 + b"]" * 100_000), name="e")
    with pytest.raises(WeightsError, match="bad header"):
        decode_state_dict(payload(b'{"a": ' + b"9" * 5000 + b"}"), name="e")
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        nan = torch.tensor([0.0, float("nan")]).to(dtype)
        with pytest.raises(WeightsError, match="'w' contains NaN"):
            decode_state_dict(encode_state_dict({"w": nan}), name="e")
        assert decode_state_dict(encode_state_dict({"w": torch.ones(3).to(dtype)}), name="e")["w"].dtype == dtype
    flag = bytearray(encode_state_dict({"flag": torch.tensor([True, False])}))
    flag[-2] = 2  # a bool byte that is neither 0 nor 1 (found by the long fuzz run)
    with pytest.raises(WeightsError, match="bool tensor 'flag' holds bytes other than 0 and 1"):
        decode_state_dict(bytes(flag), name="e")
    with pytest.raises(WeightsError, match="'c' contains NaN"):
        decode_state_dict(encode_state_dict({"c": torch.tensor([complex(0, float("inf"))])}), name="e")


# -- an edge's reply, as the Flower server parses it ------------------------------------------------------------


@given(state_dict=state_dicts(max_tensors=2), data=st.data(),
       history=st.one_of(st.just("[]"), st.text(max_size=40), st.integers(1, 100_000).map(lambda n: "[" * n + "]" * n),
                         st.just("[" + "9" * 5000 + "]"), json_values.map(json.dumps)),
       num_samples=st.one_of(st.integers(-3, 2**62), finite_or_not), accuracy=finite_or_not)
def test_a_malformed_edge_reply_is_an_edge_reply_error(fuzz_tally, state_dict, data, history, num_samples, accuracy):
    flwr_app = pytest.importorskip("flwr.app")
    from ecavg.runtime.flower import wire

    payload = encode_state_dict(state_dict)
    if data.draw(st.booleans(), label="mutate payload"):
        payload = mutate(payload, data)
    content = flwr_app.RecordDict({
        wire.WEIGHTS: wire.payload_record(payload),
        wire.METRICS: flwr_app.MetricRecord({"num-samples": num_samples, "accuracy": accuracy, "test-samples": 1}),
        wire.REPORT: flwr_app.ConfigRecord({"history": history}),
    })
    metadata = flwr_app.Metadata(run_id=1, message_id="", src_node_id=7, dst_node_id=0, reply_to_message_id="m",
                                 group_id="pretrain", created_at=0.0, ttl=60.0, message_type=wire.PRETRAIN)
    reply = flwr_app.Message(metadata=metadata, content=content)
    try:
        fuzz_tally.run("edge reply", lambda: wire.parse_fit_reply(reply, source="edge-3", node_id=7,
                                                                  reference=state_dict, max_bytes=1 << 20),
                       wire.EdgeReplyError)
    except wire.EdgeReplyError as error:
        assert "edge-3" in str(error)
