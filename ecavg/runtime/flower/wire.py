"""What the server and the edges send each other over Flower, and the checks on what arrives.

Tensors travel in Flower ``ArrayRecord``s, each holding one ``Array`` whose bytes are a safetensors payload
(``stype = "safetensors"``). Keeping safetensors inside the record means that the server validates a reply
with exactly the same code as the embedded runtime (:func:`ecavg.core.serialization.decode_state_dict`:
size limit before parsing, keys, shapes, dtypes, NaN/Inf), that bfloat16 and integer buffers travel
bit-exact, and that nothing received is ever unpickled. Scalars travel in ``MetricRecord``s, small text in
``ConfigRecord``s; JSON is the only structured text format parsed.

Message types (Flower accepts ``<train|evaluate|query>.<action>``):

=====================  =========================================================================
``query.hello``        which edge a SuperNode is (partition id, sample counts, data spec check, its host)
``query.data``         the edge's training tensors, for the server (``share_data = "full"``)
``train.pretrain``     train from the sent weights (or the edge's own init); reply with weights
``train.fedavg``       the same for one FedAvg round (the phase name is in the config record)
``evaluate.update``    the edge makes its final model from the sent weights (``update.mode``) and
                       evaluates it; the reply says which model it kept (its weights stay on the edge)
=====================  =========================================================================

An edge keeps its own pre-trained weights, for update modes that need them, in Flower's ``context.state``
(persisted per node and run, across the fresh process of every message) under ``OWN_WEIGHTS``, as a
safetensors payload like every other tensor record.

Weights travel under the run's ``[transfer]`` codec (``ecavg.core.transfer``). With ``transfer.delta`` a download
whose config record says ``base = "upload"`` is a delta from the edge's last upload, which the edge keeps, decoded,
in its ``context.state`` under ``LAST_UPLOAD`` (plain float32 safetensors); an upload is a delta from the weights
the edge received for the phase.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from ecavg.core.participants import DataSpec
from ecavg.core.records import EdgeEvaluation, EdgeReply, StateDict
from ecavg.core.serialization import WeightsError, decode_state_dict, encode_state_dict
from ecavg.core.transfer import Transfer
from ecavg.core.update import FINETUNE_PHASES
from ecavg.data import ImageDataset

HELLO = "query.hello"
DATA = "query.data"
PRETRAIN = "train.pretrain"
FEDAVG = "train.fedavg"
UPDATE = "evaluate.update"

WEIGHTS = "weights"  # ArrayRecord: the model weights
TRAIN_DATA = "train-data"  # ArrayRecord: images, labels (and global indices) of the edge's training set
CONFIG = "config"  # ConfigRecord: server -> edge instructions
METRICS = "metrics"  # MetricRecord: edge -> server numbers
REPORT = "report"  # ConfigRecord: edge -> server text (identity, per-epoch history as JSON)
OWN_WEIGHTS = "own-weights"  # ArrayRecord: an edge's own pre-trained weights (its context.state; on resume, sent)
LAST_UPLOAD = "last-upload"  # ArrayRecord in an edge's context.state: its last upload as decoded ([transfer] delta)
# The config record's "base" of a download sent as a delta from the edge's last upload.
BASE_UPLOAD = "upload"

PAYLOAD_KEY = "payload"
PAYLOAD_STYPE = "safetensors"
PAYLOAD_DTYPE = "uint8"

# Per-epoch history is informative only; a longer text is an error, not something to parse.
_MAX_HISTORY_CHARS = 1_000_000


class EdgeReplyError(ValueError):
    """A reply from an edge that the server refuses; the message names the edge.

    ``kind`` is "error" when the edge itself reported a failure (an error reply), "rejected" when the reply
    failed validation.
    """

    def __init__(self, message: str, *, kind: str = "rejected"):
        super().__init__(message)
        self.kind = kind


_Parsed = TypeVar("_Parsed")


def _reply_parser(parse: Callable[..., _Parsed]) -> Callable[..., _Parsed]:
    """Any failure while parsing an edge's reply is that reply's fault: it becomes an EdgeReplyError naming the
    edge, so the server drops that edge instead of stopping the run (the checks below name the common problems;
    this catches what they miss, e.g. a decoder bug or a JSON text nested too deep)."""

    @functools.wraps(parse)
    def parse_or_reject(reply: Message, **kwargs: Any) -> _Parsed:
        try:
            return parse(reply, **kwargs)
        except EdgeReplyError:
            raise
        except WeightsError as error:
            raise EdgeReplyError(str(error)) from None
        except Exception as error:  # the reply is untrusted input
            source = kwargs.get("source") or f"node {kwargs.get('node_id')}"
            raise EdgeReplyError(f"{source}: malformed reply ({type(error).__name__}: {error})") from error

    return parse_or_reject


def fit_message_type(phase: str) -> str:
    return PRETRAIN if phase == "pretrain" else FEDAVG


# ---------------------------------------------------------------------------------------------------
# Payloads: safetensors bytes inside an ArrayRecord
# ---------------------------------------------------------------------------------------------------


def payload_record(payload: bytes) -> ArrayRecord:
    array = Array(dtype=PAYLOAD_DTYPE, shape=(len(payload),), stype=PAYLOAD_STYPE, data=payload)
    return ArrayRecord({PAYLOAD_KEY: array})


def payload_bytes(content: RecordDict, key: str, *, source: str, max_bytes: int | None) -> bytes:
    """The safetensors bytes stored under ``content[key]``; checks the record's shape and the size first."""
    if key not in content:
        raise EdgeReplyError(f"{source}: the reply has no '{key}' record")
    record = content[key]
    if not isinstance(record, ArrayRecord):
        raise EdgeReplyError(f"{source}: '{key}' is a {type(record).__name__}, expected an ArrayRecord")
    if set(record.keys()) != {PAYLOAD_KEY}:
        raise EdgeReplyError(f"{source}: '{key}' must hold exactly one array '{PAYLOAD_KEY}', "
                             f"got {sorted(record.keys())}")
    array = record[PAYLOAD_KEY]
    if array.stype != PAYLOAD_STYPE or array.dtype != PAYLOAD_DTYPE:
        # Anything else (e.g. numpy's .npy serialisation) is refused rather than interpreted.
        raise EdgeReplyError(f"{source}: '{key}' has serialisation {array.stype!r}/{array.dtype!r}, "
                             f"expected {PAYLOAD_STYPE!r}/{PAYLOAD_DTYPE!r}")
    data = array.data
    if not isinstance(data, (bytes, bytearray)):
        raise EdgeReplyError(f"{source}: '{key}' carries {type(data).__name__}, expected bytes")
    if max_bytes is not None and len(data) > max_bytes:
        raise EdgeReplyError(f"{source}: '{key}' payload of {len(data)} bytes exceeds the limit of {max_bytes} bytes "
                             f"(deploy.max_message_mb)")
    return bytes(data)


def decode_weights(content: RecordDict, *, source: str, reference: Mapping[str, torch.Tensor] | None,
                   max_bytes: int | None, transfer: Transfer | None = None,
                   base: Mapping[str, torch.Tensor] | None = None) -> tuple[StateDict, int]:
    """(weights, payload size) under ``transfer`` (default plain fp32) against ``base``: keys, shapes and dtypes
    checked against ``reference``, the codec's metadata and int8 scales checked, NaN/Inf rejected."""
    payload = payload_bytes(content, WEIGHTS, source=source, max_bytes=max_bytes)
    try:
        weights = (transfer or Transfer()).decode(payload, reference=reference, base=base, max_bytes=max_bytes,
                                                  name=source)
    except WeightsError as error:
        raise EdgeReplyError(str(error)) from None
    return weights, len(payload)


def encode_train_data(data: ImageDataset, index: torch.Tensor | None, transfer: Transfer | None = None) -> bytes:
    """An edge's training-data upload: safetensors of images, labels (and index), deflated with transfer.deflate."""
    tensors = {"images": data.images.contiguous(), "labels": data.labels.contiguous()}
    if index is not None:
        tensors["index"] = index.to(torch.int64).contiguous()
    return (transfer or Transfer()).pack(encode_state_dict(tensors))


@dataclass
class TrainData:
    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor | None  # positions in the shared training set (partition mode), else None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def decode_train_data(content: RecordDict, *, source: str, image_shape: tuple[int, int, int], num_classes: int,
                      max_bytes: int | None, transfer: Transfer | None = None) -> tuple[TrainData, int]:
    """An edge's uploaded training set, checked: uint8 images of the run's shape, labels in range. The size
    returned is what crossed the wire (deflated with transfer.deflate)."""
    payload = payload_bytes(content, TRAIN_DATA, source=source, max_bytes=max_bytes)
    try:
        unpacked = (transfer or Transfer()).unpack(payload, max_bytes=max_bytes, name=source)
        tensors = decode_state_dict(unpacked, name=source, max_bytes=max_bytes)
    except WeightsError as error:
        raise EdgeReplyError(str(error)) from None
    keys = set(tensors)
    if not {"images", "labels"} <= keys or not keys <= {"images", "labels", "index"}:
        raise EdgeReplyError(f"{source}: training data must hold 'images', 'labels' and optionally 'index', "
                             f"got {sorted(keys)}")
    images, labels, index = tensors["images"], tensors["labels"], tensors.get("index")
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != tuple(image_shape):
        raise EdgeReplyError(f"{source}: training images must be uint8 [N, {', '.join(map(str, image_shape))}], "
                             f"got {images.dtype} {tuple(images.shape)}")
    n = int(images.shape[0])
    if labels.dtype != torch.int64 or tuple(labels.shape) != (n,):
        raise EdgeReplyError(f"{source}: training labels must be int64 [{n}], got {labels.dtype} {tuple(labels.shape)}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise EdgeReplyError(f"{source}: training labels span [{int(labels.min())}, {int(labels.max())}] "
                             f"but the run has {num_classes} classes")
    if index is not None:
        if index.dtype != torch.int64 or tuple(index.shape) != (n,):
            raise EdgeReplyError(f"{source}: training index must be int64 [{n}], "
                                 f"got {index.dtype} {tuple(index.shape)}")
        if n and int(index.min()) < 0:
            raise EdgeReplyError(f"{source}: training index holds negative positions")
    return TrainData(images, labels, index), len(payload)


# ---------------------------------------------------------------------------------------------------
# Records of numbers and text
# ---------------------------------------------------------------------------------------------------


def _record(content: RecordDict, key: str, kind: type, source: str) -> Any:
    if key not in content:
        raise EdgeReplyError(f"{source}: the reply has no '{key}' record")
    record = content[key]
    if not isinstance(record, kind):
        raise EdgeReplyError(f"{source}: '{key}' is a {type(record).__name__}, expected a {kind.__name__}")
    return record


def _count(record: Mapping[str, Any], key: str, source: str, *, minimum: int) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EdgeReplyError(f"{source}: '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def _fraction(record: Mapping[str, Any], key: str, source: str) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise EdgeReplyError(f"{source}: '{key}' must be a number in [0, 1], got {value!r}")
    return float(value)


def _json_text(report: Mapping[str, Any], key: str, default: str, source: str) -> Any:
    text = report.get(key, default)
    if not isinstance(text, str) or len(text) > _MAX_HISTORY_CHARS:
        raise EdgeReplyError(f"{source}: '{key}' must be a JSON text of at most {_MAX_HISTORY_CHARS} characters")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise EdgeReplyError(f"{source}: '{key}' is not valid JSON ({error})") from None


def _is_epoch_list(history: Any) -> bool:
    return isinstance(history, list) and all(
        isinstance(h, dict) and all(isinstance(k, str) and (isinstance(v, (int, float)) and not isinstance(v, bool))
                                    for k, v in h.items())
        for h in history)


def _history(content: RecordDict, source: str) -> list[dict[str, Any]]:
    history = _json_text(_record(content, REPORT, ConfigRecord, source), "history", "[]", source)
    if not _is_epoch_list(history):
        raise EdgeReplyError(f"{source}: 'history' must be a list of {{name: number}} objects")
    return history


def check_reply_envelope(reply: Message, *, source: str, node_id: int) -> None:
    """The reply comes from the edge's node and is not an error (an error is reported with its reason)."""
    if reply.has_error():
        error = reply.error
        raise EdgeReplyError(f"{source}: error reply (code {error.code}): {error.reason}", kind="error")
    if reply.metadata.src_node_id != node_id:
        raise EdgeReplyError(f"{source}: reply came from node {reply.metadata.src_node_id}, expected node {node_id}")


@_reply_parser
def parse_fit_reply(reply: Message, *, source: str, node_id: int, reference: Mapping[str, torch.Tensor],
                    max_bytes: int | None, spec: DataSpec | None = None, transfer: Transfer | None = None,
                    base: Mapping[str, torch.Tensor] | None = None) -> tuple[EdgeReply, TrainData | None, int]:
    """Validate a ``train.*`` reply completely before anything of it is used: (the edge's reply, its training
    data and that data's payload size when ``spec`` is given, i.e. ``share_data = "full"``). The weights are
    decoded under ``transfer`` against ``base`` (the weights the edge received, when the run sends deltas).

    Raises EdgeReplyError naming the edge (``source``) for any problem.
    """
    check_reply_envelope(reply, source=source, node_id=node_id)
    content = reply.content
    weights, size = decode_weights(content, source=source, reference=reference, max_bytes=max_bytes,
                                   transfer=transfer, base=base)
    metrics = _record(content, METRICS, MetricRecord, source)
    num_samples = _count(metrics, "num-samples", source, minimum=1)
    parsed = EdgeReply(
        name=source,
        weights=weights,
        num_samples=num_samples,
        accuracy=_fraction(metrics, "accuracy", source),
        test_samples=_count(metrics, "test-samples", source, minimum=0),
        history=_history(content, source),
        bytes_up=size,
    )
    if spec is None:
        return parsed, None, 0
    data, data_size = decode_train_data(content, source=source, image_shape=image_shape_of(spec),
                                        num_classes=spec.num_classes, max_bytes=max_bytes, transfer=transfer)
    if len(data) > num_samples:  # the edge uploads its server_data_fraction share of them
        raise EdgeReplyError(f"{source}: reports {num_samples} training samples but uploaded {len(data)}")
    return parsed, data, data_size


@_reply_parser
def parse_data_reply(reply: Message, *, source: str, node_id: int, spec: DataSpec,
                     max_bytes: int | None, transfer: Transfer | None = None) -> tuple[TrainData, int]:
    check_reply_envelope(reply, source=source, node_id=node_id)
    return decode_train_data(reply.content, source=source, image_shape=image_shape_of(spec),
                             num_classes=spec.num_classes, max_bytes=max_bytes, transfer=transfer)


@_reply_parser
def parse_evaluate_reply(reply: Message, *, source: str, node_id: int,
                         candidates: tuple[str, ...] = ("server",)) -> EdgeEvaluation:
    """Validate an ``evaluate.update`` reply: the accuracies, which model the edge kept (one of ``candidates``,
    those of the run's update mode), the candidates' validation scores and the fine-tunes' per-epoch history."""
    check_reply_envelope(reply, source=source, node_id=node_id)
    metrics = _record(reply.content, METRICS, MetricRecord, source)
    evaluation = EdgeEvaluation(source, _fraction(metrics, "accuracy", source),
                                _count(metrics, "test-samples", source, minimum=0))
    if "accuracy-full" in metrics:
        evaluation.accuracy_full = _fraction(metrics, "accuracy-full", source)
    if "update-train-samples" in metrics:
        evaluation.train_samples = _count(metrics, "update-train-samples", source, minimum=0)
    report = _record(reply.content, REPORT, ConfigRecord, source) if REPORT in reply.content else {}
    kept = report.get("kept", "server")
    if kept not in candidates:
        raise EdgeReplyError(f"{source}: 'kept' must be one of {', '.join(candidates)} for this run's update mode, "
                             f"got {kept!r}")
    evaluation.kept = kept
    if "validation" in report:
        scores = _json_text(report, "validation", "{}", source)
        if not isinstance(scores, dict) or not scores or any(k not in candidates for k in scores) or kept not in scores:
            raise EdgeReplyError(f"{source}: 'validation' must map the scored candidates (among "
                                 f"{', '.join(candidates)}, the kept one included) to accuracies")
        evaluation.validation = {k: _fraction(scores, k, source) for k in scores}
    history = _json_text(report, "history", "{}", source)
    if not isinstance(history, dict) or not all(k in FINETUNE_PHASES and _is_epoch_list(v) for k, v in history.items()):
        raise EdgeReplyError(f"{source}: 'history' must map fine-tuning phases ({', '.join(FINETUNE_PHASES)}) to "
                             "lists of {name: number} objects")
    evaluation.history = history
    return evaluation


@dataclass
class EdgeIdentity:
    partition_id: int
    train_samples: int
    test_samples: int
    mode: str  # "partition" (a share of the run's dataset) or "own" (the edge's own dataset)
    host: dict[str, Any]  # the edge's CPU and versions (ecavg.host): what its training's numbers depend on


@_reply_parser
def parse_hello_reply(reply: Message, *, node_id: int, num_edges: int) -> EdgeIdentity:
    source = f"node {node_id}"
    check_reply_envelope(reply, source=source, node_id=node_id)
    metrics = _record(reply.content, METRICS, MetricRecord, source)
    report = _record(reply.content, REPORT, ConfigRecord, source)
    partition_id = _count(metrics, "partition-id", source, minimum=0)
    if partition_id >= num_edges:
        raise EdgeReplyError(f"{source}: partition-id {partition_id} is out of range; the run has {num_edges} edges "
                             f"(0 .. {num_edges - 1})")
    mode = report.get("mode")
    if mode not in ("partition", "own"):
        raise EdgeReplyError(f"{source}: unknown data mode {mode!r}")
    host = _json_text(report, "host", "{}", source)
    if not isinstance(host, dict):
        raise EdgeReplyError(f"{source}: 'host' must be a JSON object")
    return EdgeIdentity(partition_id, _count(metrics, "train-samples", source, minimum=1),
                        _count(metrics, "test-samples", source, minimum=0), mode, host)


# ---------------------------------------------------------------------------------------------------
# The data spec (what the model is built for), sent so every edge builds the same model
# ---------------------------------------------------------------------------------------------------


def image_shape_of(spec: DataSpec) -> tuple[int, int, int]:
    return (spec.in_channels, spec.image_size, spec.image_size)


def spec_to_json(spec: DataSpec, classes: list[str]) -> str:
    return json.dumps({"num_classes": spec.num_classes, "in_channels": spec.in_channels,
                       "image_size": spec.image_size, "mean": list(spec.mean), "std": list(spec.std),
                       "crop_padding": spec.crop_padding, "flip": spec.flip,
                       "test_flip": spec.test_flip, "classes": list(classes)})


def spec_from_json(text: str) -> tuple[DataSpec, list[str]]:
    raw = json.loads(text)
    spec = DataSpec(num_classes=int(raw["num_classes"]), in_channels=int(raw["in_channels"]),
                    image_size=int(raw["image_size"]), mean=tuple(float(v) for v in raw["mean"]),
                    std=tuple(float(v) for v in raw["std"]), crop_padding=int(raw["crop_padding"]),
                    flip=bool(raw["flip"]), test_flip=bool(raw["test_flip"]))
    return spec, [str(c) for c in raw["classes"]]


def same_spec(a: DataSpec, b: DataSpec) -> bool:
    """Equal up to float rounding of the normalisation statistics (they travel as JSON)."""
    return (a.num_classes, a.in_channels, a.image_size, a.crop_padding, a.flip, a.test_flip) == \
        (b.num_classes, b.in_channels, b.image_size, b.crop_padding, b.flip, b.test_flip) and \
        len(a.mean) == len(b.mean) and len(a.std) == len(b.std) and \
        all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) for x, y in zip((*a.mean, *a.std), (*b.mean, *b.std)))


def config_record(**values: Any) -> ConfigRecord:
    return ConfigRecord({k: v for k, v in values.items() if v is not None})
