"""Model weights on the wire and on disk, as safetensors (never pickle).

Weights arriving from an edge are untrusted input: :func:`decode_state_dict` checks the payload size before
parsing, rejects anything that is not well-formed safetensors, optionally checks keys/shapes/dtypes against a
reference state dict, and rejects NaN/Inf in floating and complex tensors. Every rejection raises
:class:`WeightsError` naming the source (edge name or file path) and, where there is one, the tensor; no other
exception escapes the decoder, whatever the bytes (tests/test_fuzz_serialization.py holds it to that).

Files are written atomically (temporary file in the same directory, fsync, ``os.replace``), so a crash or a
failed write never leaves a half-written file in place of a good one.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as _safetensors_load
from safetensors.torch import save as _safetensors_save
from torch import Tensor

from ecavg.errors import WeightsError
from ecavg.fileio import write_bytes_atomic

__all__ = [
    "WeightsError",
    "byte_planes",
    "decode_metadata",
    "decode_state_dict",
    "encode_state_dict",
    "load_state_dict",
    "save_state_dict",
    "state_dict_nbytes",
]

# safetensors layout: an 8-byte little-endian header length, a JSON header, then the raw tensor bytes.
_HEADER_LENGTH_BYTES = 8
# Same cap the safetensors library applies; a larger header is garbage or an attack, not a model.
_MAX_HEADER_BYTES = 100_000_000
# A valid header nests three deep ({name: {"shape": [...]}}); deeper JSON is refused before json.loads, whose
# recursion would otherwise end in RecursionError (or worse, in a thread with a small stack).
_MAX_HEADER_DEPTH = 3
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_INNERMOST_JSON_CONTAINER = re.compile(r"\[[^\[\]{}]*\]|\{[^\[\]{}]*\}")
# The safetensors dtype names this decoder accepts (the ones safetensors.torch maps to a torch dtype), with the bytes
# per element (for byte_planes). Anything else (F8_E8M0, F4, F6_*, a typo) is refused by name rather than left to
# the library's lookup table.
_ELEMENT_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
                  "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                  "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_SAFETENSORS_DTYPES = frozenset(_ELEMENT_BYTES)
# dtypes torch.aminmax reduces directly; other floating dtypes (float8) are widened to float32 for the check.
_AMINMAX_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
# Read files in pieces of this size, so a size limit holds for files whose size stat() cannot tell.
_READ_CHUNK_BYTES = 16 * 1024 * 1024


def state_dict_nbytes(state_dict: Mapping[str, Tensor]) -> int:
    """Total raw tensor bytes in `state_dict` (what the payload costs, without the small header)."""
    return sum(t.numel() * t.element_size() for t in state_dict.values())


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise WeightsError(
                f"metadata must map str to str; got {type(key).__name__} -> {type(value).__name__} for {key!r}"
            )
    return dict(metadata)


def encode_state_dict(state_dict: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialize `state_dict` to safetensors bytes.

    Tensors are detached, moved to the CPU and made contiguous. safetensors refuses tensors that share
    storage (tied weights, views); those are cloned so each is written out in full.
    """
    checked_metadata = _check_metadata(metadata)
    prepared: dict[str, Tensor] = {}
    seen_storages: set[int] = set()
    for key, tensor in state_dict.items():
        if not isinstance(key, str):
            raise WeightsError(f"tensor names must be str, got {type(key).__name__} {key!r}")
        if not isinstance(tensor, Tensor):
            raise WeightsError(f"tensor {key!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.layout != torch.strided:
            raise WeightsError(f"tensor {key!r} has layout {tensor.layout}; only dense tensors can be saved")
        cpu_tensor = tensor.detach().to("cpu").contiguous()
        if cpu_tensor.numel() > 0:
            storage_ptr = cpu_tensor.untyped_storage().data_ptr()
            if storage_ptr in seen_storages:
                cpu_tensor = cpu_tensor.clone()
            else:
                seen_storages.add(storage_ptr)
        prepared[key] = cpu_tensor
    try:
        data = _safetensors_save(prepared, metadata=checked_metadata)
    except (SafetensorError, ValueError, TypeError, RuntimeError) as error:
        raise WeightsError(f"cannot encode state dict as safetensors: {error}") from error
    return _sorted_metadata(data) if checked_metadata and len(checked_metadata) > 1 else data


def _sorted_metadata(data: bytes) -> bytes:
    """``data`` with its header's metadata entries in sorted order: safetensors writes them in a hash map's order,
    which changes from process to process, so the same weights would not give the same bytes (nor the same
    compressed size with ``transfer.deflate``). Same header length, so the tensors' offsets are unchanged; a header
    that would not re-serialize to the same length is left as it is."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) != len(data[8:8 + length].rstrip()):
        return data
    return data[:8] + text.ljust(length) + data[8 + length:]


def _check_nesting(text: str, source: str) -> None:
    """Refuse JSON nested deeper than a safetensors header can be, without recursing."""
    skeleton = _JSON_STRING.sub('""', text)
    for _ in range(_MAX_HEADER_DEPTH):
        skeleton = _INNERMOST_JSON_CONTAINER.sub("0", skeleton)
    if any(bracket in skeleton for bracket in "[]{}"):
        raise WeightsError(
            f"weights from {source}: not a valid safetensors payload (header nested deeper than "
            f"{_MAX_HEADER_DEPTH} levels, or unbalanced)"
        )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_header_entries(header: dict, source: str) -> None:
    """Each entry is a tensor description the decoder can load (or the string metadata)."""
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise WeightsError(f"weights from {source}: metadata is not a mapping of str to str")
            continue
        where = f"weights from {source}: tensor {key!r}"
        if not isinstance(entry, dict):
            raise WeightsError(f"{where}: header entry is a {type(entry).__name__}, not an object")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
            raise WeightsError(
                f"{where} has dtype {dtype!r}, which this decoder does not accept "
                f"(accepted: {', '.join(sorted(_SAFETENSORS_DTYPES))})"
            )
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
            raise WeightsError(f"{where} has shape {shape!r}; expected a list of integers >= 0")
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(n) for n in offsets)
            or offsets[0] > offsets[1]
        ):
            raise WeightsError(f"{where} has data_offsets {offsets!r}; expected [begin, end] with 0 <= begin <= end")


def _read_header(data: bytes | bytearray | memoryview, source: str) -> dict:
    """Parse and check the safetensors JSON header of `data`: structure, dtypes, shapes, offsets."""
    if len(data) < _HEADER_LENGTH_BYTES:
        raise WeightsError(f"weights from {source}: {len(data)} bytes is too short to be a safetensors payload")
    (header_length,) = struct.unpack("<Q", bytes(data[:_HEADER_LENGTH_BYTES]))
    if header_length > _MAX_HEADER_BYTES or header_length > len(data) - _HEADER_LENGTH_BYTES:
        raise WeightsError(
            f"weights from {source}: not a valid safetensors payload (header length {header_length} "
            f"does not fit in {len(data)} bytes)"
        )
    raw_header = bytes(data[_HEADER_LENGTH_BYTES : _HEADER_LENGTH_BYTES + header_length])
    try:
        text = raw_header.decode("utf-8")
    except UnicodeDecodeError as error:
        raise WeightsError(f"weights from {source}: not a valid safetensors payload (bad header: {error})") from None
    _check_nesting(text, source)
    try:
        header = json.loads(text)
    except ValueError as error:  # JSONDecodeError, and the int-digits limit of int('9' * 5000)
        raise WeightsError(f"weights from {source}: not a valid safetensors payload (bad header: {error})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"weights from {source}: not a valid safetensors payload (header is not a JSON object)")
    _check_header_entries(header, source)
    return header


def byte_planes(data: bytes | bytearray | memoryview, *, name: str, inverse: bool = False) -> bytes:
    """``data`` (safetensors) with each tensor of multi-byte elements stored as byte planes: the first byte of every
    element, then every second byte, and so on (``inverse``: back to elements). Lossless, and a filter to apply
    before deflate (HDF5's and Blosc's "shuffle"): the sign-and-exponent bytes of a tensor's float weights take few
    values and compress well once together, while their low mantissa bytes are close to noise. The header, and
    tensors of one-byte elements (int8 weights, uint8 images), are left as they are.

    The header is checked as the decoder checks it; a tensor whose bytes lie outside ``data`` or are not a whole
    number of its elements is refused (WeightsError naming ``name``)."""
    source = repr(name)
    header = _read_header(data, source)
    start = _HEADER_LENGTH_BYTES + struct.unpack("<Q", bytes(data[:_HEADER_LENGTH_BYTES]))[0]
    out = bytearray(data)
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        size = _ELEMENT_BYTES[entry["dtype"]]
        begin, end = (start + offset for offset in entry["data_offsets"])
        if size == 1 or begin == end:
            continue
        if end > len(data) or (end - begin) % size:
            raise WeightsError(f"weights from {source}: tensor {key!r} has data_offsets {entry['data_offsets']}, "
                               f"not whole {entry['dtype']} elements within the payload's {len(data)} bytes")
        elements = np.frombuffer(data, np.uint8, count=end - begin, offset=begin)
        out[begin:end] = elements.reshape((size, -1) if inverse else (-1, size)).T.tobytes()
    return bytes(out)


def decode_metadata(data: bytes | bytearray | memoryview, *, name: str = "payload") -> dict[str, str]:
    """The string metadata stored in a safetensors payload (empty dict when there is none)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WeightsError(f"weights from {name!r}: expected bytes, got {type(data).__name__}")
    return dict(_read_header(data, repr(name)).get("__metadata__") or {})


def _validate_tensors(
    tensors: Mapping[str, Tensor], reference: Mapping[str, Tensor] | None, source: str
) -> None:
    if reference is not None:
        missing = reference.keys() - tensors.keys()
        if missing:
            names = ", ".join(repr(k) for k in sorted(missing))
            raise WeightsError(f"weights from {source}: missing tensor(s) {names}")
        unexpected = tensors.keys() - reference.keys()
        if unexpected:
            raise WeightsError(
                f"weights from {source}: unexpected tensor(s) {', '.join(repr(k) for k in sorted(unexpected))}"
            )
        for key, expected in reference.items():
            tensor = tensors[key]
            if tensor.shape != expected.shape:
                raise WeightsError(
                    f"weights from {source}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(expected.shape)}"
                )
            if tensor.dtype != expected.dtype:
                raise WeightsError(
                    f"weights from {source}: tensor {key!r} has dtype {tensor.dtype}, expected {expected.dtype}"
                )
    for key, tensor in tensors.items():
        # A bool is one byte holding 0 or 1; torch reads other bytes inconsistently (equal() compares bytes).
        if tensor.dtype == torch.bool and tensor.numel() and int(tensor.view(torch.uint8).max()) > 1:
            raise WeightsError(f"weights from {source}: bool tensor {key!r} holds bytes other than 0 and 1")
    # torch.aminmax is one bandwidth-bound read per tensor, where isfinite().all() writes and rereads a bool
    # mask (ResNet50: 5 ms against 38 ms, bench/ transfer section). min and max propagate NaN and show +-Inf, so
    # both extremes are finite exactly when every element is; one host synchronisation for all tensors.
    checked = [(key, t) for key, t in tensors.items() if (t.is_floating_point() or t.is_complex()) and t.numel() > 0]
    if checked:
        extremes = torch.stack([value.float() for key, t in checked for value in _extremes(key, t, source)])
        finite = torch.isfinite(extremes).view(-1, 2).all(dim=1)
        if not bool(finite.all()):
            key = checked[int((~finite).nonzero()[0, 0])][0]
            raise WeightsError(f"weights from {source}: tensor {key!r} contains NaN or Inf values")


def _extremes(key: str, tensor: Tensor, source: str) -> tuple[Tensor, Tensor]:
    """(min, max) of a floating or complex tensor, for the NaN/Inf check; a dtype that cannot be checked is refused."""
    try:
        values = torch.view_as_real(tensor) if tensor.is_complex() else tensor
        if values.dtype not in _AMINMAX_DTYPES:
            values = values.float()  # float8: no aminmax kernel; float32 holds every float8 value (and NaN/Inf)
        low, high = torch.aminmax(values)
        return low, high
    except (RuntimeError, TypeError, NotImplementedError) as error:
        raise WeightsError(
            f"weights from {source}: tensor {key!r} has dtype {tensor.dtype}, whose values cannot be checked "
            f"for NaN/Inf ({error})"
        ) from None


def _decode(
    data: bytes | bytearray | memoryview,
    source: str,
    reference: Mapping[str, Tensor] | None,
    max_bytes: int | None,
) -> dict[str, Tensor]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WeightsError(f"weights from {source}: expected bytes, got {type(data).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise WeightsError(f"weights from {source}: payload of {len(data)} bytes exceeds the limit of "
                           f"{max_bytes} bytes")
    _read_header(data, source)  # clear message for the common garbage/truncation cases
    try:
        # The library copies each tensor's bytes out of `data`, so the tensors never alias the caller's buffer.
        tensors = _safetensors_load(bytes(data))
    except SafetensorError as error:
        raise WeightsError(f"weights from {source}: not a valid safetensors payload ({error})") from None
    except Exception as error:  # noqa: BLE001 - the bytes are untrusted: any failure to parse them is theirs
        raise WeightsError(
            f"weights from {source}: not a valid safetensors payload ({type(error).__name__}: {error})"
        ) from None
    _validate_tensors(tensors, reference, source)
    if reference is not None:
        # safetensors stores tensors in its own order; hand them back in the reference's order.
        tensors = {key: tensors[key] for key in reference}
    return tensors


def decode_state_dict(
    data: bytes | bytearray | memoryview,
    *,
    name: str,
    reference: Mapping[str, Tensor] | None = None,
    max_bytes: int | None = None,
) -> dict[str, Tensor]:
    """Decode safetensors bytes received from `name` (an edge) into a state dict of CPU tensors.

    With a `reference`, the keys come back in the reference's order.

    Raises WeightsError naming `name` (and the tensor, where one is at fault) when the payload exceeds
    `max_bytes` (checked before parsing), is not valid safetensors (truncated, garbage, bad header), does
    not match `reference` in keys, shapes or dtypes, or holds NaN/Inf in a floating tensor.
    """
    return _decode(data, repr(name), reference, max_bytes)


def save_state_dict(
    path: str | os.PathLike[str], state_dict: Mapping[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write `state_dict` to `path` as safetensors, atomically.

    The bytes go to a temporary file in the same directory, are fsynced, and then ``os.replace`` puts the
    file in place: readers see either the old file or the complete new one. Missing parent directories
    are created. I/O failures propagate as OSError after the temporary file is removed.
    """
    write_bytes_atomic(path, encode_state_dict(state_dict, metadata))


def load_state_dict(
    path: str | os.PathLike[str],
    *,
    reference: Mapping[str, Tensor] | None = None,
    name: str | None = None,
    max_bytes: int | None = None,
) -> dict[str, Tensor]:
    """Read a safetensors file written by :func:`save_state_dict`, with the checks of :func:`decode_state_dict`.

    A missing, unreadable or corrupt file raises WeightsError naming the path (and `name`, if given).
    """
    source = f"{name!r} ({str(path)!r})" if name is not None else repr(str(path))
    try:
        data = _read_file(Path(path), source, max_bytes)
    except FileNotFoundError:
        raise WeightsError(f"weights from {source}: file not found") from None
    except OSError as error:
        raise WeightsError(f"weights from {source}: cannot read file ({error})") from None
    return _decode(data, source, reference, max_bytes)


def _read_file(path: Path, source: str, max_bytes: int | None) -> bytes:
    """The file's bytes, never more than `max_bytes`: stat() refuses a large regular file before reading, and the
    read itself stops one byte past the limit, which is what holds for pipes (whose size stat() does not know)."""
    with path.open("rb") as handle:
        info = os.fstat(handle.fileno())
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode)):
            # /dev/zero and friends never end; a directory or socket is not a weights file either.
            raise WeightsError(f"weights from {source}: not a regular file")
        if max_bytes is None:
            return handle.read()
        if stat.S_ISREG(info.st_mode) and info.st_size > max_bytes:
            raise WeightsError(
                f"weights from {source}: file of {info.st_size} bytes exceeds the limit of {max_bytes} bytes"
            )
        chunks: list[bytes] = []
        remaining = max_bytes + 1
        while remaining > 0:
            chunk = handle.read(min(remaining, _READ_CHUNK_BYTES))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        if remaining <= 0:
            raise WeightsError(f"weights from {source}: file exceeds the limit of {max_bytes} bytes")
        return b"".join(chunks)
