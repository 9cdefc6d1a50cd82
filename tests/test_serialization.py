"""Tests for ecavg.core.serialization: safetensors round trips, validation of untrusted bytes, atomic files."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from ecavg.core.serialization import (
    WeightsError,
    byte_planes,
    decode_metadata,
    decode_state_dict,
    encode_state_dict,
    load_state_dict,
    save_state_dict,
    state_dict_nbytes,
)


def sample_state_dict() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=gen),
        "half": torch.randn(5, 2, generator=gen).to(torch.float16),
        "bf16": torch.randn(7, generator=gen).to(torch.bfloat16),
        "double": torch.randn(3, 3, generator=gen, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(123456789012, dtype=torch.int64),
        "int32": torch.randint(-1000, 1000, (6,), generator=gen, dtype=torch.int32),
        "uint8": torch.randint(0, 256, (2, 4), generator=gen, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(-0.0),
        "empty": torch.zeros(0, 5),
    }


def assert_bit_exact(decoded, original) -> None:
    assert set(decoded) == set(original)
    for key, value in original.items():
        assert decoded[key].dtype == value.dtype, key
        assert decoded[key].shape == value.shape, key
        # Compare raw bytes so that e.g. -0.0 vs 0.0 would be caught too.
        raw_decoded = decoded[key].reshape(-1).view(torch.uint8)
        assert raw_decoded.equal(value.reshape(-1).view(torch.uint8)), key


def test_round_trip_is_bit_exact_for_every_dtype():
    original = sample_state_dict()
    payload = encode_state_dict(original, metadata={"round": "3", "edge": "edge-1"})
    assert isinstance(payload, bytes)
    decoded = decode_state_dict(payload, name="edge-1", reference=original)
    assert_bit_exact(decoded, original)
    assert list(decoded) == list(original)  # reference order, not the file's order
    assert all(t.device.type == "cpu" for t in decoded.values())
    assert decode_metadata(payload) == {"round": "3", "edge": "edge-1"}
    assert decode_metadata(encode_state_dict(original)) == {}


def test_byte_planes_regroup_each_tensors_bytes_and_undo_it_exactly():
    """transfer.deflate's filter: a tensor of 4-byte elements becomes its first bytes, then its second bytes, ...;
    one-byte tensors and the header stay; the inverse gives the payload back bit for bit."""
    original = sample_state_dict()
    payload = encode_state_dict(original, metadata={"edge": "edge-1"})
    planes = byte_planes(payload, name="edge-1")
    assert len(planes) == len(payload) and planes != payload
    assert byte_planes(planes, name="edge-1", inverse=True) == payload
    header_length = int.from_bytes(payload[:8], "little")
    assert planes[:8 + header_length] == payload[:8 + header_length]
    start = 8 + header_length
    header = json.loads(payload[8:start])
    for key, size in (("conv.weight", 4), ("half", 2), ("uint8", 1), ("mask", 1)):
        begin, end = (start + offset for offset in header[key]["data_offsets"])
        elements = original[key].reshape(-1).view(torch.uint8).reshape(-1, size)
        assert planes[begin:end] == bytes(elements.T.contiguous().reshape(-1).tolist()), key


def test_byte_planes_refuse_a_tensor_that_is_not_whole_elements():
    payload = encode_state_dict({"w": torch.zeros(4)})
    header_length = int.from_bytes(payload[:8], "little")
    header = payload[8 : 8 + header_length].replace(b"[0,16]", b"[0,15]")
    forged = len(header).to_bytes(8, "little") + header + payload[8 + header_length :]
    with pytest.raises(WeightsError, match=r"from 'edge-f': tensor 'w' has data_offsets \[0, 15\], not whole F32"):
        byte_planes(forged, name="edge-f", inverse=True)


def test_shared_and_non_contiguous_tensors_are_encoded():
    weight = torch.randn(6, 4)
    state_dict = {
        "embed.weight": weight,
        "head.weight": weight,  # tied weights: same storage under two keys
        "first_rows": weight[:2],  # a view into the same storage
        "transposed": weight.t(),  # non-contiguous
    }
    decoded = decode_state_dict(encode_state_dict(state_dict), name="tied")
    for key, value in state_dict.items():
        assert torch.equal(decoded[key], value), key
    decoded["embed.weight"].zero_()
    assert not torch.equal(decoded["head.weight"], decoded["embed.weight"])  # independent after decoding


def test_the_same_weights_and_metadata_give_the_same_bytes():
    """safetensors writes metadata in a hash map's order, which changes between processes; the header is rewritten
    sorted (same length, so the tensors stay where they are), or a compressed payload's size would vary by run."""
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    metadata = {name: f"value of {name}" for name in ("f", "c", "a", "e", "b", "d")}
    payload = encode_state_dict(state, metadata=metadata)
    header = payload[8:8 + int.from_bytes(payload[:8], "little")].decode()
    positions = [header.index(f'"{name}":"value') for name in sorted(metadata)]
    assert positions == sorted(positions)
    assert decode_metadata(payload) == metadata
    decoded = decode_state_dict(payload, name="x")
    assert all(torch.equal(decoded[k], state[k]) for k in state)


def test_requires_grad_parameters_are_encoded():
    layer = torch.nn.Linear(3, 2)
    decoded = decode_state_dict(encode_state_dict(dict(layer.named_parameters())), name="params")
    assert torch.equal(decoded["weight"], layer.weight.detach())


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b[:-1],
        lambda b: b[: len(b) // 2],
        lambda b: b[:4],
        lambda b: b"",
        lambda b: random.Random(7).randbytes(len(b)),
        lambda b: b[:8] + b"{not json" + b[17:],
        lambda b: (3).to_bytes(8, "little") + b"[1]",  # header is JSON but not an object
    ],
    ids=["minus-one-byte", "half", "four-bytes", "empty", "random", "bad-json", "json-list"],
)
def test_invalid_bytes_are_rejected_with_the_edge_name(mangle):
    payload = encode_state_dict(sample_state_dict())
    with pytest.raises(WeightsError, match="edge-7"):
        decode_state_dict(mangle(payload), name="edge-7")


def test_header_claiming_a_larger_tensor_than_the_data_is_rejected():
    payload = encode_state_dict({"w": torch.zeros(4)})
    header_length = int.from_bytes(payload[:8], "little")
    header = payload[8 : 8 + header_length].replace(b"[4]", b"[5]")
    forged = len(header).to_bytes(8, "little") + header + payload[8 + header_length :]
    with pytest.raises(WeightsError, match="edge-f"):
        decode_state_dict(forged, name="edge-f")


def test_oversized_payload_is_rejected_before_parsing():
    payload = encode_state_dict(sample_state_dict())
    decode_state_dict(payload, name="edge-1", max_bytes=len(payload))  # exactly at the limit is fine
    with pytest.raises(WeightsError, match=r"edge-1.*exceeds the limit"):
        decode_state_dict(payload, name="edge-1", max_bytes=len(payload) - 1)
    # Garbage over the limit is reported as oversized: the size check comes first.
    with pytest.raises(WeightsError, match="exceeds the limit"):
        decode_state_dict(b"\xff" * 100, name="edge-1", max_bytes=10)


def test_non_bytes_input_is_rejected():
    with pytest.raises(WeightsError, match="edge-2"):
        decode_state_dict("not bytes", name="edge-2")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda sd: sd.pop("double"), "double"),
        (lambda sd: sd.__setitem__("extra.bias", torch.zeros(2)), "extra.bias"),
        (lambda sd: sd.__setitem__("conv.weight", torch.zeros(4, 3, 3, 2)), "conv.weight"),
        (lambda sd: sd.__setitem__("half", sd["half"].float()), "half"),
    ],
    ids=["missing", "extra", "shape", "dtype"],
)
def test_reference_mismatch_names_edge_and_tensor(change, key):
    reference = sample_state_dict()
    sent = sample_state_dict()
    change(sent)
    with pytest.raises(WeightsError) as info:
        decode_state_dict(encode_state_dict(sent), name="edge-3", reference=reference)
    assert "edge-3" in str(info.value) and key in str(info.value)


@pytest.mark.parametrize(("key", "value"),
                         [("conv.weight", float("nan")), ("half", float("inf")), ("bf16", -float("inf"))])
def test_non_finite_values_are_rejected(key, value):
    state_dict = sample_state_dict()
    state_dict[key].view(-1)[1] = value
    payload = encode_state_dict(state_dict)  # encoding is not the place to judge values
    with pytest.raises(WeightsError) as info:
        decode_state_dict(payload, name="edge-4")
    assert "edge-4" in str(info.value) and key in str(info.value) and "NaN or Inf" in str(info.value)


def test_encode_rejects_bad_inputs():
    with pytest.raises(WeightsError, match="'w'"):
        encode_state_dict({"w": [1.0, 2.0]})  # type: ignore[dict-item]
    with pytest.raises(WeightsError, match="metadata"):
        encode_state_dict({"w": torch.zeros(1)}, metadata={"round": 3})  # type: ignore[dict-item]


def test_state_dict_nbytes():
    assert state_dict_nbytes({"a": torch.zeros(10), "b": torch.zeros(3, dtype=torch.float16)}) == 46
    assert state_dict_nbytes({}) == 0


# -- files -------------------------------------------------------------------------------------------


def test_save_and_load_round_trip_leaves_no_temp_files(tmp_path):
    path = tmp_path / "phase" / "server.safetensors"  # parent created on demand
    original = sample_state_dict()
    save_state_dict(path, original, metadata={"phase": "server"})
    save_state_dict(path, original, metadata={"phase": "server"})  # overwriting works
    assert sorted(os.listdir(path.parent)) == ["server.safetensors"]
    assert_bit_exact(load_state_dict(path, reference=original), original)
    assert decode_metadata(path.read_bytes()) == {"phase": "server"}


def test_failed_replace_keeps_the_old_file_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "weights.safetensors"
    old = {"w": torch.ones(3)}
    save_state_dict(path, old)
    old_bytes = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        save_state_dict(path, {"w": torch.full((3,), 2.0)})
    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == ["weights.safetensors"]


def test_failed_fsync_keeps_the_old_file_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "weights.safetensors"
    save_state_dict(path, {"w": torch.ones(3)})
    old_bytes = path.read_bytes()

    def failing_fsync(fd):
        raise OSError("I/O error (simulated)")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated"):
        save_state_dict(path, {"w": torch.full((3,), 2.0)})
    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == ["weights.safetensors"]


def test_load_missing_or_corrupt_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsError, match="nope.safetensors.*not found"):
        load_state_dict(missing)

    path = tmp_path / "model.safetensors"
    save_state_dict(path, sample_state_dict())
    path.write_bytes(path.read_bytes()[:-10])  # truncated, e.g. by a crash of a non-atomic writer
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_state_dict(path)

    path.write_bytes(b"garbage" * 20)
    with pytest.raises(WeightsError, match=r"edge-9.*model\.safetensors"):
        load_state_dict(path, name="edge-9")


def test_load_validates_against_reference(tmp_path):
    path = tmp_path / "model.safetensors"
    save_state_dict(path, {"w": torch.zeros(2, 2)})
    with pytest.raises(WeightsError, match=r"model\.safetensors.*'w'.*shape"):
        load_state_dict(path, reference={"w": torch.zeros(4)})
    with pytest.raises(WeightsError, match="exceeds the limit"):
        load_state_dict(path, max_bytes=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_encoded_from_the_gpu():
    original = {k: v for k, v in sample_state_dict().items()}
    on_gpu = {k: v.cuda() for k, v in original.items()}
    decoded = decode_state_dict(encode_state_dict(on_gpu), name="gpu-edge")
    assert_bit_exact(decoded, original)
