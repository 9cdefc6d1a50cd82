"""Drop-in replacements for hot spots in ``ecavg.core``, measured by the benchmarks against the shipped code.

The benchmarks time each against the shipped code in the same process. Two proposals measured here now ship:
the aminmax finiteness check (in ``ecavg.core.serialization``) and ``SmallMapConv2d`` (``ecavg.models.small_map``).

* :func:`all_finite_aminmax` for the NaN/Inf check in ``ecavg.core.serialization._validate_tensors``:
  ``torch.isfinite(t).all()`` writes a bool mask per tensor and then reads it back, while ``torch.aminmax`` is
  one bandwidth-bound read. min/max propagate NaN and show +-Inf, so "both extremes finite" holds exactly when
  every element is finite (no false alarm from overflow, unlike sums or norms, so no second pass is needed).
* :func:`encode_direct` for ``safetensors.torch.save`` in ``ecavg.core.serialization.encode_state_dict``: writes
  the safetensors layout (8-byte header length, JSON header padded to 8 bytes, raw little-endian tensor bytes)
  with one tensor copy into a preallocated buffer, instead of the library's per-tensor byte strings and joins.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def first_nonfinite_aminmax(keys: Sequence[str], tensors: Sequence[Tensor]) -> str | None:
    """Key of the first tensor (in order) holding NaN or Inf, or None; one host synchronisation per device."""
    groups: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(tensors):
        if tensor.numel():
            groups.setdefault(tensor.device, []).append(index)
    for indices in groups.values():
        extremes = []
        for i in indices:
            low, high = torch.aminmax(tensors[i])
            extremes.append(low.float())
            extremes.append(high.float())
        finite = torch.isfinite(torch.stack(extremes)).view(-1, 2).all(dim=1)  # one host sync per device
        if not bool(finite.all()):
            return keys[indices[int((~finite).nonzero()[0, 0])]]
    return None


def all_finite_aminmax(tensors: Mapping[str, Tensor]) -> str | None:
    """Key of the first floating tensor holding NaN or Inf, or None (for serialization's validation)."""
    keys = [k for k, t in tensors.items() if t.is_floating_point()]
    return first_nonfinite_aminmax(keys, [tensors[k] for k in keys])


def encode_direct(prepared: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """safetensors bytes of contiguous CPU tensors, written with one copy per tensor into one buffer.

    The output loads with ``safetensors.torch.load``; tensors are laid out in the mapping's order (the format
    only requires the offsets to tile the data section, which they do).
    """
    if sys.byteorder != "little":  # safetensors stores little-endian bytes; let the library byte-swap
        from safetensors.torch import save

        return save(dict(prepared), metadata=dict(metadata) if metadata else None)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for key, tensor in prepared.items():
        dtype = _SAFETENSORS_DTYPES.get(tensor.dtype)
        if dtype is None:
            raise ValueError(f"tensor {key!r}: dtype {tensor.dtype} has no safetensors name here")
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format pads the header with spaces to 8 bytes
    start = 8 + len(header_bytes)
    buffer = bytearray(start + offset)
    struct.pack_into("<Q", buffer, 0, len(header_bytes))
    buffer[8:start] = header_bytes
    if offset:
        data = torch.frombuffer(buffer, dtype=torch.uint8, offset=start, count=offset)
        position = 0
        for tensor in prepared.values():
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes:
                data[position : position + nbytes].copy_(tensor.reshape(-1).view(torch.uint8))
            position += nbytes
    return bytes(buffer)


# -------------------------------------------------------------------------------------------------
# Convolutions on tiny feature maps
# -------------------------------------------------------------------------------------------------


# SmallMapConv2d was proposed here and now ships in ecavg (ecavg/models/small_map.py; every conv net that
# build_model makes uses it). The benchmarks compare against plain nn.Conv2d models with use_plain_convs.
from ecavg.models.small_map import SmallMapConv2d, use_small_map_convs  # noqa: E402,F401


def use_plain_convs(model: torch.nn.Module) -> int:
    """Swap every SmallMapConv2d of ``model`` back to a plain ``nn.Conv2d`` (parameters shared); returns how many.

    What a model built the usual way (torchvision, no ecavg) runs: the baseline of the training benchmarks."""
    swapped = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is SmallMapConv2d:
                plain = torch.nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                                        padding=child.padding, dilation=child.dilation, groups=child.groups,
                                        bias=child.bias is not None, padding_mode=child.padding_mode,
                                        device=child.weight.device, dtype=child.weight.dtype)
                plain.weight, plain.bias = child.weight, child.bias
                setattr(module, child_name, plain)
                swapped += 1
    return swapped
