"""Weight compression for the wire: what each option costs in bytes and in accuracy.

Every codec turns a state dict into safetensors bytes (so sizes are real payload sizes, header included) and back
into a state dict with the original dtypes. Delta codecs send ``weights - init``, where ``init`` is the shared
initial model both sides already hold (ECAvg's shared init is derived from a seed, so it never needs to travel).

Quantised codecs keep 1-D tensors (biases, BatchNorm parameters and statistics) in float32: they are well under
1% of the bytes of every model here, and BatchNorm's running variance does not survive 8 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from ecavg.core.serialization import decode_metadata, decode_state_dict, encode_state_dict

StateDict = dict[str, Tensor]

_SCALE_SUFFIX = ".__scale"


@dataclass(frozen=True)
class Codec:
    name: str
    description: str
    float_format: str  # "fp32", "fp16", "bf16", "int8-tensor", "int8-channel"
    delta: bool = False

    def encode(self, state_dict: Mapping[str, Tensor], init: Mapping[str, Tensor] | None = None) -> bytes:
        if self.delta and init is None:
            raise ValueError(f"codec {self.name!r} sends deltas and needs the shared init")
        out: StateDict = {}
        for key, tensor in state_dict.items():
            tensor = tensor.detach().cpu()
            if not tensor.is_floating_point():
                out[key] = tensor
                continue
            value = tensor.float()
            if self.delta:
                value = value - init[key].float()
            out.update(_encode_float(key, value, self.float_format))
        return encode_state_dict(out, metadata={"codec": self.name})

    def decode(self, payload: bytes, reference: Mapping[str, Tensor], init: Mapping[str, Tensor] | None = None,
               *, name: str = "peer") -> StateDict:
        """State dict with ``reference``'s keys, shapes and dtypes from a payload made by :meth:`encode`."""
        codec = decode_metadata(payload, name=name).get("codec")
        if codec != self.name:
            raise ValueError(f"payload from {name!r} was encoded with codec {codec!r}, expected {self.name!r}")
        raw = decode_state_dict(payload, name=name)
        out: StateDict = {}
        for key, ref in reference.items():
            if key not in raw:
                raise ValueError(f"payload from {name!r} lacks tensor {key!r}")
            if not ref.is_floating_point():
                out[key] = raw[key]
                continue
            value = _decode_float(raw[key], raw.get(key + _SCALE_SUFFIX)).reshape(ref.shape)
            if self.delta:
                value = value + init[key].float()
            out[key] = value.to(ref.dtype)
        return out


def _quantisable(value: Tensor) -> bool:
    return value.dim() >= 2


def _encode_float(key: str, value: Tensor, fmt: str) -> StateDict:
    if fmt == "fp32":
        return {key: value.contiguous()}
    if fmt == "fp16":
        return {key: value.half()}
    if fmt == "bf16":
        return {key: value.bfloat16()}
    if fmt in ("int8-tensor", "int8-channel"):
        if not _quantisable(value):
            return {key: value.contiguous()}
        if fmt == "int8-tensor":
            absmax = value.abs().amax().reshape(1)
        else:  # one scale per output channel (dim 0): conv filters and linear rows differ widely in range
            absmax = value.reshape(value.shape[0], -1).abs().amax(dim=1)
        scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
        view_shape = (-1,) + (1,) * (value.dim() - 1) if fmt == "int8-channel" else (1,) * value.dim()
        q = torch.round(value / scale.reshape(view_shape)).clamp_(-127, 127).to(torch.int8)
        return {key: q, key + _SCALE_SUFFIX: scale.float()}
    raise ValueError(f"unknown float format {fmt!r}")


def _decode_float(value: Tensor, scale: Tensor | None) -> Tensor:
    if value.dtype == torch.int8:
        if scale is None:
            raise ValueError("int8 tensor without its scale")
        view_shape = (-1,) + (1,) * (value.dim() - 1) if scale.numel() > 1 else (1,) * value.dim()
        return value.float() * scale.reshape(view_shape)
    return value.float()


CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        Codec("fp32", "safetensors float32, as sent today", "fp32"),
        Codec("fp16", "weights cast to float16", "fp16"),
        Codec("bf16", "weights cast to bfloat16", "bf16"),
        Codec("int8-tensor", "int8, one absmax scale per tensor (1-D tensors float32)", "int8-tensor"),
        Codec("int8-channel", "int8, one absmax scale per output channel (1-D tensors float32)", "int8-channel"),
        Codec("delta-fp16", "weights minus the shared init, float16", "fp16", delta=True),
        Codec("delta-int8-channel", "weights minus the shared init, int8 per output channel", "int8-channel",
              delta=True),
    )
}


def relative_error(original: Mapping[str, Tensor], decoded: Mapping[str, Tensor]) -> float:
    """||decoded - original|| / ||original|| over all floating tensors together."""
    num = 0.0
    den = 0.0
    for key, tensor in original.items():
        if tensor.is_floating_point():
            diff = decoded[key].double() - tensor.double()
            num += float(diff.pow(2).sum())
            den += float(tensor.double().pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def roundtrip(codec: Codec, state_dict: Mapping[str, Tensor], init: Mapping[str, Tensor] | None,
              *, name: str) -> tuple[StateDict, int]:
    payload = codec.encode(state_dict, init)
    return codec.decode(payload, state_dict, init, name=name), len(payload)


