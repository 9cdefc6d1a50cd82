"""Transfer codecs: how a state dict is compressed for the wire, and validated when it comes back.

A payload is a safetensors file (never pickle) whose metadata names the codec, whether it carries deltas, and the
encoding of every tensor. Which tensors a codec compresses is decided by a fixed rule on the *reference* state dict
both sides hold (same model), so the decoder never trusts the metadata to tell it what to expect; it checks that
the metadata agrees with what it expects.

Encodings per tensor:

* ``raw``: sent exactly as it is (its own dtype). Integer and bool tensors, empty tensors, scalars, 1-D tensors
  (biases, BatchNorm affine parameters) and BatchNorm running statistics. They are under 1% of the bytes of every
  model here, and BatchNorm's running variance does not survive 8 bits. Never sent as a delta (a float32 delta
  sent in float32 saves nothing and would not be bit-exact).
* ``fp32`` / ``fp16`` / ``bf16``: the float tensors of 2 or more dimensions (weight matrices and filters) cast.
* ``int8``: the same tensors quantised symmetrically per slice along dim 0 (output channel), with a float32 scale
  per slice stored beside it as ``<key>:scale``: ``q = round(w / scale)`` in [-127, 127], ``scale = absmax / 127``.

With ``delta=True`` the compressed tensors are sent as ``weights - base``, where ``base`` is a state dict both
sides already hold, and the decoder adds ``base`` back; quantisation error then scales with the change, not with
the weights. Decoded tensors always have the reference's dtype.

The codecs are registered in ``TRANSFER_CODECS`` (config key ``transfer.codec``, with ``transfer.delta``), so config
validation and ``ecavg options`` list them; ``codec(name, delta=...)`` builds one. ``ecavg.core.transfer`` decides
which codec and base each transfer of a run uses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from ecavg.config.checks import boolean
from ecavg.core.serialization import decode_metadata, decode_state_dict, encode_state_dict
from ecavg.errors import ConfigError, WeightsError
from ecavg.registry import Key, Option, Registry

__all__ = ["CODECS", "TRANSFER_CODECS", "Codec", "codec"]

StateDict = dict[str, Tensor]

SCALE_SUFFIX = ":scale"  # PyTorch state-dict keys never contain ':', so a scale key cannot collide with a tensor.
RAW = "raw"
# BatchNorm statistics stay exact in every codec (num_batches_tracked is an integer, so raw anyway).
_BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
_INT8_LEVELS = 127  # symmetric: -127..127, so that zero and the sign are exact
_TINY = torch.finfo(torch.float32).tiny  # smallest normal float32: floor for int8 scales (a zero row gets it too)

_META_CODEC = "ecavg.codec"
_META_DELTA = "ecavg.delta"
_META_ENCODINGS = "ecavg.encodings"


def _compressible(key: str, tensor: Tensor) -> bool:
    """Whether a codec compresses this tensor (the same rule on both sides, applied to the reference)."""
    return (
        tensor.is_floating_point()
        and tensor.dim() >= 2
        and tensor.numel() > 0
        and not key.endswith(_BATCHNORM_STATISTICS)
    )


def _first_non_finite(tensors: Iterable[tuple[str, Tensor]]) -> str | None:
    """Key of the first floating tensor holding NaN or Inf, or None.

    Same method as ecavg.core.serialization's private validation (copied, not imported): min and max propagate
    NaN and show +-Inf, and one aminmax per tensor is a single read, with one host synchronisation for all.
    """
    floating = [(key, t) for key, t in tensors if t.is_floating_point() and t.numel() > 0]
    if not floating:
        return None
    extremes = torch.stack([value.float() for _, t in floating for value in torch.aminmax(t)])
    finite = torch.isfinite(extremes).view(-1, 2).all(dim=1)
    if bool(finite.all()):
        return None
    return floating[int((~finite).nonzero()[0, 0])][0]


def _channel_view(scale: Tensor, dims: int) -> Tensor:
    return scale.reshape((-1,) + (1,) * (dims - 1))


DELTA = Key(False, boolean, "send the difference from weights both sides already hold (not with fp32)")
# Applied by ecavg.core.transfer around any codec's payload; declared here so that every codec lists it.
DEFLATE = Key(False, boolean, "compress every payload with zlib (lossless): weights after the codec, and the "
                              "edges' training-data upload")


class Codec(Option):
    """Base class: subclasses set ``name``, ``summary`` and ``wire_dtype`` (the dtype compressed tensors travel in).

    Unlike other options a codec is built from its delta flag, not from the whole config (``codec()``)."""

    name: str = ""
    wire_dtype: torch.dtype = torch.float32
    keys = {"transfer.delta": DELTA, "transfer.deflate": DEFLATE}

    def __init__(self, *, delta: bool = False) -> None:
        if not isinstance(delta, bool):
            raise ConfigError(f"codec {self.name!r}: delta must be true or false, got {delta!r}")
        self.delta = delta

    @property
    def label(self) -> str:
        """Name for results and logs: ``int8`` or ``int8+delta``."""
        return f"{self.name}+delta" if self.delta else self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(delta={self.delta})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.delta == self.delta  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.delta))

    # --- per-tensor hooks (float32 in, float32 out) ---

    def compress(self, key: str, value: Tensor) -> StateDict:
        """Wire tensors for one compressible float32 tensor (``value`` is the weights, or weights - base)."""
        return {key: value.to(self.wire_dtype)}

    def expected_wire(self, key: str, reference: Tensor) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """Shape and dtype of each wire tensor that ``compress`` makes for a tensor shaped like ``reference``."""
        return {key: (reference.shape, self.wire_dtype)}

    def expand(self, key: str, wire: Mapping[str, Tensor]) -> Tensor:
        """The float32 tensor back from its validated wire tensors."""
        return wire[key].float()

    # --- whole state dicts ---

    def encode(self, state_dict: Mapping[str, Tensor], *, base: Mapping[str, Tensor] | None = None) -> bytes:
        """Safetensors bytes of ``state_dict`` under this codec (``base`` is required exactly when ``delta``)."""
        self._check_base_given(base, "encode")
        if not isinstance(state_dict, Mapping):
            raise WeightsError(f"codec {self.label!r}: expected a state dict, got {type(state_dict).__name__}")
        wire: StateDict = {}
        encodings: dict[str, str] = {}
        compressed: list[tuple[str, Tensor]] = []  # (source key, wire tensor) for the finiteness check
        with torch.no_grad():
            for key, tensor in state_dict.items():
                if not isinstance(key, str) or not isinstance(tensor, Tensor):
                    raise WeightsError(
                        f"codec {self.label!r}: state dict entries must be str -> Tensor, got "
                        f"{type(key).__name__} -> {type(tensor).__name__} for {key!r}"
                    )
                if SCALE_SUFFIX in key:
                    raise WeightsError(f"codec {self.label!r}: tensor name {key!r} contains {SCALE_SUFFIX!r}")
                tensor = tensor.detach().cpu()
                if not _compressible(key, tensor):
                    wire[key] = tensor
                    encodings[key] = RAW
                    continue
                value = tensor.float()
                if base is not None:
                    value = value - self._base_tensor(base, key, tensor.shape, "the encoder's")
                parts = self.compress(key, value)
                wire.update(parts)
                encodings[key] = self.name
                compressed.extend((key, part) for part in parts.values())
        bad = _first_non_finite(compressed)
        if bad is not None:
            raise WeightsError(
                f"codec {self.label!r}: tensor {bad!r} is not finite once encoded "
                f"(NaN/Inf in the weights{' or base' if self.delta else ''}, or values beyond {self.name}'s range)"
            )
        metadata = {
            _META_CODEC: self.name,
            _META_DELTA: "true" if self.delta else "false",
            _META_ENCODINGS: json.dumps(encodings, separators=(",", ":"), sort_keys=True),
        }
        return encode_state_dict(wire, metadata=metadata)

    def decode(
        self,
        data: bytes | bytearray | memoryview,
        *,
        reference: Mapping[str, Tensor],
        base: Mapping[str, Tensor] | None = None,
        max_bytes: int | None = None,
        name: str,
    ) -> StateDict:
        """State dict with ``reference``'s keys, shapes and dtypes, from a payload made by :meth:`encode`.

        Everything is checked before any tensor is used: the size against ``max_bytes`` (before parsing), the
        codec and delta flag in the metadata, every wire tensor's key, shape and dtype against what this codec
        makes from ``reference``, int8 scales finite and positive, and the decoded result free of NaN/Inf. Any
        problem raises WeightsError naming ``name`` (the source) and the tensor.
        """
        source = repr(name)
        self._check_base_given(base, "decode")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise WeightsError(f"weights from {source}: expected bytes, got {type(data).__name__}")
        if max_bytes is not None and len(data) > max_bytes:
            raise WeightsError(
                f"weights from {source}: payload of {len(data)} bytes exceeds the limit of {max_bytes} bytes"
            )
        expected_encodings, wire_reference = self._expected(reference)
        self._check_metadata(decode_metadata(data, name=name), expected_encodings, source)
        # Keys, shapes, dtypes and finiteness of every wire tensor (scales included) against what we expect.
        wire = decode_state_dict(data, name=name, reference=wire_reference, max_bytes=max_bytes)
        self._check_wire(wire, expected_encodings, source)

        out: StateDict = {}
        transformed: list[str] = []
        with torch.no_grad():
            for key, ref in reference.items():
                if expected_encodings[key] == RAW:
                    out[key] = wire[key]
                    continue
                value = self.expand(key, wire)
                if base is not None:
                    # Not in place: for fp32 the value is the wire tensor, a view of the payload's immutable bytes.
                    value = value + self._base_tensor(base, key, ref.shape, "the decoder's")
                out[key] = value.to(ref.dtype)
                transformed.append(key)
        bad = _first_non_finite((key, out[key]) for key in transformed)
        if bad is not None:
            raise WeightsError(f"weights from {source}: tensor {bad!r} contains NaN or Inf values once decoded")
        return out

    # --- helpers ---

    def _check_base_given(self, base: Mapping[str, Tensor] | None, action: str) -> None:
        if self.delta and base is None:
            raise WeightsError(f"codec {self.label!r} sends deltas: {action} needs the base weights both sides hold")
        if not self.delta and base is not None:
            raise WeightsError(f"codec {self.label!r} does not send deltas: {action} takes no base weights")
        if base is not None and not isinstance(base, Mapping):
            raise WeightsError(f"codec {self.label!r}: base must be a state dict, got {type(base).__name__}")

    def _base_tensor(self, base: Mapping[str, Tensor], key: str, shape: torch.Size, side: str) -> Tensor:
        tensor = base.get(key)
        if not isinstance(tensor, Tensor):
            raise WeightsError(f"codec {self.label!r}: {side} base weights lack tensor {key!r}")
        if tensor.shape != shape:
            raise WeightsError(
                f"codec {self.label!r}: {side} base tensor {key!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(shape)}"
            )
        return tensor.detach().cpu().float()

    def _expected(
        self, reference: Mapping[str, Tensor]
    ) -> tuple[dict[str, str], dict[str, Tensor]]:
        """Encoding per reference key, and the wire tensors to expect as shape/dtype-only (meta) tensors."""
        if not isinstance(reference, Mapping):
            raise WeightsError(f"codec {self.label!r}: reference must be a state dict, got {type(reference).__name__}")
        encodings: dict[str, str] = {}
        wire: dict[str, Tensor] = {}
        for key, ref in reference.items():
            if SCALE_SUFFIX in key:
                raise WeightsError(f"codec {self.label!r}: tensor name {key!r} contains {SCALE_SUFFIX!r}")
            if _compressible(key, ref):
                encodings[key] = self.name
                specs = self.expected_wire(key, ref)
            else:
                encodings[key] = RAW
                specs = {key: (ref.shape, ref.dtype)}
            for wire_key, (shape, dtype) in specs.items():
                wire[wire_key] = torch.empty(shape, dtype=dtype, device="meta")
        return encodings, wire

    def _check_metadata(self, metadata: Mapping[str, str], expected: Mapping[str, str], source: str) -> None:
        sent_codec = metadata.get(_META_CODEC)
        if sent_codec != self.name:
            raise WeightsError(
                f"weights from {source}: payload was encoded with codec {sent_codec!r}, expected {self.name!r}"
            )
        sent_delta = metadata.get(_META_DELTA)
        if sent_delta != ("true" if self.delta else "false"):
            raise WeightsError(
                f"weights from {source}: payload has delta={sent_delta!r}, expected "
                f"{'true' if self.delta else 'false'!r}"
            )
        try:
            sent = json.loads(metadata.get(_META_ENCODINGS, ""))
        except json.JSONDecodeError:
            raise WeightsError(f"weights from {source}: metadata lacks a valid per-tensor encoding table") from None
        if not isinstance(sent, dict):
            raise WeightsError(f"weights from {source}: metadata lacks a valid per-tensor encoding table")
        for key, encoding in expected.items():
            if key not in sent:
                raise WeightsError(f"weights from {source}: missing tensor {key!r} (not in the encoding table)")
            if sent[key] != encoding:
                raise WeightsError(
                    f"weights from {source}: tensor {key!r} was encoded as {sent[key]!r}, expected {encoding!r}"
                )
        extra = sorted(set(sent) - set(expected))
        if extra:
            raise WeightsError(f"weights from {source}: unexpected tensor(s) {', '.join(repr(k) for k in extra)}")

    def _check_wire(self, wire: Mapping[str, Tensor], encodings: Mapping[str, str], source: str) -> None:
        """Codec-specific checks of the wire tensors after the generic ones (none unless overridden)."""


TRANSFER_CODECS: Registry[Codec] = Registry("transfer.codec", "fp32", what="transfer codec")


@TRANSFER_CODECS.register
class Fp32Codec(Codec):
    """float32 as today: exact for float32 models (with delta, exact up to float32 rounding of the difference)."""

    name = "fp32"
    summary = "float32, exact (the default; a run sends the same payloads as before [transfer] existed)"
    wire_dtype = torch.float32
    keys = {"transfer.deflate": DEFLATE}  # a float32 delta saves nothing: transfer.delta is refused with fp32

    def compress(self, key: str, value: Tensor) -> StateDict:
        return {key: value.contiguous()}


@TRANSFER_CODECS.register
class Fp16Codec(Codec):
    """float16: half the bytes, relative error <= 2^-11 in float16's normal range (|x| >= 2^-14, <= 65504)."""

    name = "fp16"
    summary = "weight matrices and filters in float16: half the bytes, relative error <= 2^-11"
    wire_dtype = torch.float16


@TRANSFER_CODECS.register
class Bf16Codec(Codec):
    """bfloat16: half the bytes, float32's range, relative error <= 2^-8."""

    name = "bf16"
    summary = "weight matrices and filters in bfloat16: half the bytes, float32's range, relative error <= 2^-8"
    wire_dtype = torch.bfloat16


@TRANSFER_CODECS.register
class Int8Codec(Codec):
    """int8, symmetric, one float32 scale per slice along dim 0: about a quarter of the bytes, error <= scale/2."""

    name = "int8"
    summary = ("weight matrices and filters in int8 with a float32 scale per output channel: about a quarter of "
               "the bytes, error <= half a step")
    wire_dtype = torch.int8

    def compress(self, key: str, value: Tensor) -> StateDict:
        absmax = value.reshape(value.shape[0], -1).abs().amax(dim=1)
        # A zero (or subnormal) row would give scale 0; the floor keeps every scale positive and the row exact
        # within scale/2.
        scale = (absmax / _INT8_LEVELS).clamp_min_(_TINY)
        quantised = torch.div(value, _channel_view(scale, value.dim())).round_().clamp_(-_INT8_LEVELS, _INT8_LEVELS)
        return {key: quantised.to(torch.int8), key + SCALE_SUFFIX: scale}

    def expected_wire(self, key: str, reference: Tensor) -> dict[str, tuple[torch.Size, torch.dtype]]:
        return {
            key: (reference.shape, torch.int8),
            key + SCALE_SUFFIX: (torch.Size([reference.shape[0]]), torch.float32),
        }

    def expand(self, key: str, wire: Mapping[str, Tensor]) -> Tensor:
        quantised = wire[key]
        # int8 * float32 promotes to float32: one pass, no float copy of the integers first.
        return torch.mul(quantised, _channel_view(wire[key + SCALE_SUFFIX], quantised.dim()))

    def _check_wire(self, wire: Mapping[str, Tensor], encodings: Mapping[str, str], source: str) -> None:
        # Finiteness was checked by decode_state_dict; here: every scale > 0 (one host synchronisation).
        keys = [key for key, encoding in encodings.items() if encoding == self.name]
        if not keys:
            return
        minima = torch.stack([wire[key + SCALE_SUFFIX].min() for key in keys])
        positive = minima > 0
        if not bool(positive.all()):
            key = keys[int((~positive).nonzero()[0, 0])]
            raise WeightsError(
                f"weights from {source}: tensor {key!r} has an int8 scale <= 0 ({float(minima[keys.index(key)])!r})"
            )


CODECS: tuple[str, ...] = TRANSFER_CODECS.names()


def codec(name: str, *, delta: bool = False) -> Codec:
    """The codec called ``name`` (one of :data:`CODECS`), sending deltas from a shared base when ``delta``."""
    if not isinstance(name, str) or name not in TRANSFER_CODECS.names():
        raise ConfigError(f"unknown transfer codec {name!r}; choose one of {', '.join(TRANSFER_CODECS.names())}")
    return TRANSFER_CODECS.get(name)(delta=delta)
