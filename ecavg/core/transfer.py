"""Compressed transfers (config ``[transfer]``): the codec and the base of every weight transfer in a run.

``transfer.codec`` (one of ``ecavg.core.codecs.TRANSFER_CODECS``) encodes every transfer of model weights, both
ways; with ``transfer.delta`` each is sent as the difference from weights both sides already hold, its *base*:

- upload (edge -> server, after a training phase): the weights the edge received for that phase, as it decoded them
  (the shared start for pre-training, the round's global weights for a FedAvg round);
- download (server -> edge): that edge's last upload, as the server decoded it (the edge keeps the same decoded
  copy), once it has uploaded in this run: ECAvg's final update and FedAvg's rounds after the first, whose base is
  then the edge's previous upload rather than the previous global weights (one rule for every download, and the
  same state the update needs). The first training download (pre-training, FedAvg round 1) has no base: it goes
  whole, under the codec.

Both runtimes apply exactly this (the embedded runtime encodes and decodes every transfer, so an embedded run
loses what a deployment loses and counts the real bytes). ``fp32`` without a base sends the plain safetensors
payload of earlier versions (no codec metadata), so the default reproduces earlier results and byte counts exactly.

With ``transfer.deflate`` every payload is additionally compressed with zlib (DEFLATE, lossless), each tensor's
bytes first regrouped into byte planes (``ecavg.core.serialization.byte_planes``): each weight payload after its
codec, and the edges' training-data upload (``deploy.share_data = "full"``). What it gains
depends on the bytes (measured in docs/findings.md, "Real edge conditions"), it loses nothing, and the receiver
inflates it with the size limit applied to the inflated bytes too (a small payload cannot inflate into an unbounded
one).

Refused by ``check_transfer_config``: delta with ``fp32`` (a float32 difference is as large as the weights), delta
with ``shared_init = false`` (each edge starts from its own init, so its pre-training upload has no base) and delta
with a strategy whose edges never upload (the final model would have none). Not compressed by a codec: the edges'
training data (deflated only) and an edge's own weights kept for the update modes (not weights in transit).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Mapping

from torch import Tensor

from ecavg.core.codecs import Codec, codec
from ecavg.core.records import StateDict
from ecavg.core.serialization import byte_planes, decode_state_dict, encode_state_dict
from ecavg.errors import ConfigError, WeightsError


@dataclass(frozen=True)
class Transfer:
    """A run's ``[transfer]`` settings, applied to one payload at a time (the same on both sides of a link)."""

    codec_name: str = "fp32"
    delta: bool = False
    deflate: bool = False

    def __post_init__(self) -> None:
        codec(self.codec_name, delta=self.delta)  # an unknown name or a non-bool flag fails here
        if not isinstance(self.deflate, bool):
            raise ConfigError(f"transfer.deflate must be true or false, got {self.deflate!r}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Transfer:
        section = cfg["transfer"]
        return cls(section["codec"], section["delta"], section["deflate"])

    def to_dict(self) -> dict[str, Any]:
        """What results.json records under ``transfer``."""
        return {"codec": self.codec_name, "delta": self.delta, "deflate": self.deflate}

    def codec_for(self, base: Mapping[str, Tensor] | None) -> Codec:
        """The codec of a transfer with this base (None: sent whole, also when the run sends deltas)."""
        if base is not None and not self.delta:
            raise WeightsError(f"transfer.codec {self.codec_name!r} without delta takes no base weights")
        return codec(self.codec_name, delta=base is not None)

    @property
    def exact(self) -> bool:
        """Whether every payload decodes to the weights sent, bit for bit (fp32; deflate is lossless)."""
        return self.codec_name == "fp32"

    def plain(self, base: Mapping[str, Tensor] | None = None) -> bool:
        """Whether a payload with this base is the plain float32 safetensors of earlier versions (no metadata)."""
        return self.codec_name == "fp32" and base is None and not self.deflate

    def encode(self, weights: Mapping[str, Tensor], *, base: Mapping[str, Tensor] | None = None) -> bytes:
        if self.plain(base):
            return encode_state_dict(weights)
        return self.pack(self.codec_for(base).encode(weights, base=base))

    def pack(self, payload: bytes) -> bytes:
        """``payload`` (safetensors) as it crosses the wire: with ``transfer.deflate``, its tensors as byte planes
        (``byte_planes``), deflated; else as it is."""
        # Level 1: on weight payloads within 0.3% of level 6's size, and faster (measured on ResNet50 and
        # MobileNetV2 weights).
        return zlib.compress(byte_planes(payload, name="payload"), 1) if self.deflate else payload

    def unpack(self, payload: bytes | bytearray | memoryview, *, max_bytes: int | None,
               name: str) -> bytes | bytearray | memoryview:
        """The bytes :meth:`pack` was given, from what crossed the wire (checked: see :func:`inflate`)."""
        if not self.deflate:
            return payload
        return byte_planes(inflate(payload, max_bytes=max_bytes, name=name), name=name, inverse=True)

    def decode(self, payload: bytes | bytearray | memoryview, *, reference: Mapping[str, Tensor] | None,
               base: Mapping[str, Tensor] | None = None, max_bytes: int | None = None, name: str) -> StateDict:
        """The weights in ``payload``, validated before use (size, codec, keys, shapes, dtypes, scales, NaN/Inf)
        against ``reference`` (required unless the payload is plain fp32) and decoded against ``base``."""
        if self.plain(base):
            return decode_state_dict(payload, name=name, reference=reference, max_bytes=max_bytes)
        if reference is None:
            raise WeightsError(f"weights from {name!r}: a {self.codec_for(base).label} payload needs the expected "
                               "state dict to decode against")
        payload = self.unpack(payload, max_bytes=max_bytes, name=name)
        return self.codec_for(base).decode(payload, reference=reference, base=base, max_bytes=max_bytes, name=name)

    def upload_base(self, received: StateDict | None) -> StateDict | None:
        """The base of an edge's upload: the weights it received for the phase, when the run sends deltas."""
        return received if self.delta else None


def inflate(payload: bytes | bytearray | memoryview, *, max_bytes: int | None, name: str) -> bytes:
    """The bytes of a ``transfer.deflate`` payload (weights or training data): one complete zlib stream, nothing
    after it, inflating to at most ``max_bytes`` (checked while inflating, so a crafted stream cannot exhaust memory
    first)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise WeightsError(f"payload from {name!r}: expected bytes, got {type(payload).__name__}")
    if max_bytes is not None and len(payload) > max_bytes:
        raise WeightsError(f"payload from {name!r}: {len(payload)} bytes exceeds the limit of "
                           f"{max_bytes} bytes")
    stream = zlib.decompressobj()
    try:
        out = stream.decompress(payload, 0 if max_bytes is None else max_bytes + 1)
    except zlib.error as exc:
        raise WeightsError(f"payload from {name!r}: not a valid zlib stream (transfer.deflate = true): "
                           f"{exc}") from None
    if max_bytes is not None and (len(out) > max_bytes or stream.unconsumed_tail):
        raise WeightsError(f"payload from {name!r}: inflates beyond the limit of {max_bytes} bytes")
    if not stream.eof:
        raise WeightsError(f"payload from {name!r}: zlib stream is truncated (transfer.deflate = true)")
    if stream.unused_data:
        raise WeightsError(f"payload from {name!r}: {len(stream.unused_data)} bytes after the end of the zlib stream")
    return out


class EdgeLinks:
    """The server's end of the links to its edges: the run's transfer, and (with delta) each edge's last upload,
    as decoded: the base of that edge's next download. Both runtimes' pools hold one."""

    def __init__(self, transfer: Transfer | None = None):
        self.transfer = transfer or Transfer()
        self._uploads: dict[str, StateDict] = {}

    def remember_upload(self, name: str, weights: StateDict) -> None:
        """``weights``: edge ``name``'s upload exactly as decoded, which the edge keeps as well."""
        if self.transfer.delta:
            self._uploads[name] = weights

    def upload(self, name: str, weights: Mapping[str, Tensor], *,
               received: StateDict | None) -> tuple[StateDict, int]:
        """Edge ``name``'s upload of ``weights``, trained from ``received`` (None: from its own start), where one
        process holds both ends of the link: what the server decodes (remembered, as :meth:`remember_upload`) and
        the payload's bytes."""
        base = self.transfer.upload_base(received)
        payload = self.transfer.encode(weights, base=base)
        # Without a download (shared_init = false) the edge's own weights give the expected shapes.
        decoded = self.transfer.decode(payload, reference=received if received is not None else weights, base=base,
                                       name=name)
        self.remember_upload(name, decoded)
        return decoded, len(payload)

    def download(self, weights: Mapping[str, Tensor]) -> Download:
        return Download(self.transfer, weights, dict(self._uploads) if self.transfer.delta else {})


class Download:
    """One download of ``weights`` to several edges: one payload shared by the edges that get it whole, one per edge
    sent a delta from its last upload (encoded when first asked for)."""

    def __init__(self, transfer: Transfer, weights: Mapping[str, Tensor], bases: Mapping[str, StateDict]):
        self.transfer = transfer
        self.weights = weights
        self._bases = bases
        self._payloads: dict[str | None, bytes] = {}
        self._shared_copy: StateDict | None = None

    def base(self, name: str) -> StateDict | None:
        """The base of edge ``name``'s payload (None: sent whole)."""
        return self._bases.get(name)

    def payload(self, name: str) -> bytes:
        key = name if name in self._bases else None
        if key not in self._payloads:
            self._payloads[key] = self.transfer.encode(self.weights, base=self.base(name))
        return self._payloads[key]

    def received(self, name: str) -> StateDict:
        """What edge ``name`` decodes from its payload (bit for bit: same bytes, same base, same code). The edges
        sent the shared payload get one object: decoded once, and recognisable as one copy."""
        if name in self._bases:
            return self.transfer.decode(self.payload(name), reference=self.weights, base=self.base(name), name=name)
        if self._shared_copy is None:
            self._shared_copy = self.transfer.decode(self.payload(name), reference=self.weights, name=name)
        return self._shared_copy

    def copy_kept(self, name: str, received: StateDict | None = None) -> StateDict | None:
        """The weights edge ``name`` ends with when it keeps the server's model: None where they are the server's
        bit for bit (an fp32 transfer), else its decoded copy (``received``, when the caller holds it), which is
        what its results and its final weights must be of."""
        if self.transfer.exact:
            return None
        return received if received is not None else self.received(name)


def check_transfer_config(cfg: Mapping[str, Any], strategy: Any) -> None:
    """``transfer.delta`` has a base for every transfer of the run (ConfigError naming the key otherwise).

    ``strategy`` is the selected strategy class (``edge_models``: whether its edges train and upload)."""
    section = cfg["transfer"]
    if not section["delta"]:
        return
    if section["codec"] == "fp32":
        raise ConfigError("config key 'transfer.delta' = true gains nothing with transfer.codec = \"fp32\" (a float32 "
                          "difference is as large as the weights); use codec fp16, bf16 or int8, or delta = false")
    if not cfg["shared_init"]:
        raise ConfigError("config key 'transfer.delta' = true needs weights both sides hold, but with shared_init = "
                          "false every edge starts from its own random init, so its first upload has no base; set "
                          "shared_init = true or transfer.delta = false")
    if not strategy.edge_models:
        raise ConfigError(f"config key 'transfer.delta' = true has no base with strategy = \"{strategy.name}\": its "
                          "edges never upload weights, so the final model goes down whole; set transfer.delta = false")
