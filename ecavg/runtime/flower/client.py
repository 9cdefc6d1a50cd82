"""The edge side of a Flower deployment: a ``ClientApp`` that runs the shared :class:`EdgeWorker`.

Each SuperNode is one edge. Its node config says where the edge's data is:

* ``partition-id`` (required): the edge's index k; the edge is called ``edge-k``.
* ``data-dir``: the directory holding ``<dataset>/`` folders (as ``ecavg run --data-dir``); without it, the
  run config's ``edge-data-dir`` (set by the simulation runtime), else ``$ECAVG_DATA_DIR`` or ``./data``.
* ``dataset``: a dataset of the edge's own (e.g. ``imagefolder:/data/site3``, with ``train/`` and ``test/``);
  without it the edge takes partition k of the run's dataset, built exactly as ``ecavg run`` builds it
  (:func:`ecavg.runtime.setup.build_participants`), so that both runtimes compute the same numbers.
* ``device``: overrides the config's ``device`` on this host.

Flower starts a fresh ClientApp process per message; the edge's data is loaded again each time (from the
decoded-tensor cache, so this is quick), and its state lives in the messages and in Flower's ``context.state``
(persisted per node and run), not in the process. A long-lived process (the simulation's Ray actors, or the
runner of ``ecavg deploy local --warm-clientapps``, ``warm_clientapp.py``) keeps the edge built for its run in
``_edges``, data included, and nothing else. An update mode that keeps or compares the edge's own pre-trained
model (``update.mode``) finds it in ``context.state``, stored by the pre-training message, and so does a download
sent as a delta from the edge's last upload (``transfer.delta``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import ecavg.runtime.flower.wire as wire
from ecavg.config import model_options, resolve_config
from ecavg.config.deploy import deploy_settings
from ecavg.core.participants import EdgeWorker, ModelFactory, resolve_device
from ecavg.core.records import StateDict
from ecavg.core.serialization import decode_state_dict, encode_state_dict
from ecavg.core.training import TrainingSettings
from ecavg.core.transfer import Transfer
from ecavg.core.update import make_update_mode, validation_split
from ecavg.data import load_dataset
from ecavg.errors import DataError, EdgeSetupError
from ecavg.host import host_info
from ecavg.runtime.setup import build_participants, server_share

log = logging.getLogger("ecavg")

client_app = ClientApp()



@dataclass
class LocalEdge:
    worker: EdgeWorker
    mode: str  # "partition" or "own"
    index: torch.Tensor | None  # positions of the edge's training samples in the run's training set
    max_bytes: int
    server_share: torch.Tensor  # positions in the edge's training set of the samples it uploads
    transfer: Transfer  # the run's [transfer] codec
    _reference: StateDict | None = field(default=None, repr=False)

    def reference(self) -> StateDict:
        """The model's state dict (keys, shapes, dtypes) that a compressed download is decoded against."""
        if self._reference is None:
            self._reference = {k: v.detach().cpu() for k, v in self.worker.new_model().state_dict().items()}
        return self._reference


_edges: dict[tuple[int, int], LocalEdge] = {}


def _configure_logging() -> None:
    # The SuperNode keeps the ClientApp's stdout in its log: progress goes there.
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def node_partition_id(node_config: dict[str, Any]) -> int:
    value = node_config.get("partition-id")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EdgeSetupError(
            f"this SuperNode's node config needs partition-id = <edge index >= 0>, got {value!r} "
            "(start it with --node-config 'partition-id=0 data-dir=\"/data\"')")
    return value


def _load_edge_data(k: int, name: str, data_dir: str | None, *, download: bool = False):
    """The edge's dataset; a failure names the node-config keys that choose it (fixed when the SuperNode starts)."""
    try:
        return load_dataset(name, data_dir, download=download)
    except DataError as error:
        raise EdgeSetupError(
            f"edge-{k}: {error}. This SuperNode reads its data from node config data-dir = "
            f"{data_dir or '(unset: $ECAVG_DATA_DIR or ./data)'}; the node config is fixed when flower-supernode "
            f"starts, so restart it with --node-config 'partition-id={k} data-dir=\"DIR\"'") from None


def build_local_edge(run_config: dict[str, Any], node_config: dict[str, Any], spec_json: str) -> LocalEdge:
    """This node's EdgeWorker, from the run's config (sent by the server) and the node's own config."""
    cfg = resolve_config(json.loads(str(run_config["ecavg-config"])))
    settings = deploy_settings(json.loads(str(run_config.get("ecavg-deploy", "{}"))))
    k = node_partition_id(node_config)
    if k >= cfg["data"]["num_edges"]:
        raise EdgeSetupError(f"partition-id {k} is out of range: the run has {cfg['data']['num_edges']} edges")
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    device = resolve_device(str(node_config.get("device") or cfg["device"]))
    data_dir = str(node_config.get("data-dir") or run_config.get("edge-data-dir") or "") or None
    own_dataset = str(node_config.get("dataset") or "")
    server_spec, server_classes = wire.spec_from_json(spec_json)
    if not own_dataset:
        splits = _load_edge_data(k, cfg["data"]["dataset"], data_dir, download=cfg["data"]["download"])
        participants = build_participants(cfg, splits, device)
        worker = participants.edges[k]
        if not wire.same_spec(worker.factory.spec, server_spec) or list(splits.train.classes) != server_classes:
            raise EdgeSetupError(
                f"edge-{k}: its copy of {cfg['data']['dataset']} (in {data_dir or 'the default data dir'}) does not "
                f"match the server's (classes, image size or normalisation differ: {worker.factory.spec} vs "
                f"{server_spec}); give every host the same dataset files")
        # The server sorts the uploaded training sets by these positions, which rebuilds the union exactly as
        # the embedded runtime holds it (and so the server's fine-tuning sees the same batches).
        index = participants.positions[k]
        mode = "partition"
    else:
        splits = _load_edge_data(k, own_dataset, data_dir)
        if list(splits.train.classes) != server_classes:
            raise EdgeSetupError(f"edge-{k}: its dataset {own_dataset} has classes {splits.train.classes}, "
                                 f"the server's "
                                 f"has {server_classes}; an edge's classes must be the server's, in the same order")
        if tuple(splits.train.images.shape[1:]) != wire.image_shape_of(server_spec):
            raise EdgeSetupError(f"edge-{k}: its images are {tuple(splits.train.images.shape[1:])}, the run's are "
                                 f"{wire.image_shape_of(server_spec)} (channels, height, width)")
        # The model and the input normalisation are the server's, so every edge trains the same function.
        factory = ModelFactory(cfg["model"]["name"], model_options(cfg), server_spec, device)
        update_mode = make_update_mode(cfg)
        train_data, validation = splits.train, None
        if update_mode.holds_out_validation:  # as build_participants does for a partition of the run's dataset
            rest, held = validation_split(splits.train, cfg["update"]["validation_fraction"], cfg["seed"], f"edge-{k}")
            if len(rest) == 0:
                raise EdgeSetupError(f"edge-{k}: update.validation_fraction leaves none of its {len(splits.train)} "
                                     "training samples to train on")
            train_data, validation = splits.train.subset(rest), splits.train.subset(held)
        # It has no copy of the run's test set: its accuracy_after_full is known only when it keeps the server's.
        worker = EdgeWorker(f"edge-{k}", k, train_data, splits.test, factory,
                            TrainingSettings.from_config(cfg["edge"]), cfg["seed"],
                            eval_each_epoch=cfg["eval_each_epoch"], validation_data=validation,
                            update_mode=update_mode)
        index, mode = None, "own"
    # The server sends the shared start; a pretrained file on the server need not exist on edge hosts.
    worker.factory = dataclasses.replace(worker.factory, pretrained="")
    share = server_share(worker.train_data, cfg["server_data_fraction"], cfg["seed"], worker.name)
    return LocalEdge(worker, mode, index, settings.max_message_bytes, share, Transfer.from_config(cfg))


def _local_edge(message: Message, context: Context) -> LocalEdge:
    _configure_logging()
    key = (context.run_id, context.node_id)
    if key not in _edges:
        for stale in [k for k in _edges if k[0] != context.run_id]:  # a long-lived process: earlier runs' edges
            del _edges[stale]
        spec_json = message.content[wire.CONFIG].get("spec") if wire.CONFIG in message.content else None
        if not isinstance(spec_json, str):
            raise EdgeSetupError("the server's message carries no data spec")
        _edges[key] = build_local_edge(dict(context.run_config), dict(context.node_config), spec_json)
    return _edges[key]


def _last_upload(context: Context, edge: LocalEdge) -> StateDict:
    """The edge's last upload as the server decoded it (kept in the node's state by the upload's message)."""
    if wire.LAST_UPLOAD not in context.state:
        raise EdgeSetupError(f"{edge.worker.name}: the server sent a delta from this edge's last upload, but the node "
                             "holds none (was its state lost since it last uploaded?)")
    payload = wire.payload_bytes(context.state, wire.LAST_UPLOAD, source=f"{edge.worker.name}'s state",
                                 max_bytes=None)
    return decode_state_dict(payload, name=f"{edge.worker.name}'s last upload")


def _received_weights(message: Message, context: Context, edge: LocalEdge) -> dict[str, torch.Tensor] | None:
    if wire.WEIGHTS not in message.content:
        return None
    payload = wire.payload_bytes(message.content, wire.WEIGHTS, source="server", max_bytes=edge.max_bytes)
    base_label = message.content[wire.CONFIG].get("base") if wire.CONFIG in message.content else None
    if base_label not in (None, wire.BASE_UPLOAD):
        raise EdgeSetupError(f"{edge.worker.name}: the server's download names an unknown base {base_label!r}")
    base = _last_upload(context, edge) if base_label == wire.BASE_UPLOAD else None
    # A plain payload is checked as before (no model built for a reference); a codec's needs the model's shapes.
    reference = None if edge.transfer.plain(base) else edge.reference()
    return edge.transfer.decode(payload, reference=reference, base=base, max_bytes=edge.max_bytes, name="server")


def _data_record(edge: LocalEdge) -> Any:
    """The samples this edge gives the server: its ``server_data_fraction`` share (all of them by default)."""
    share = edge.server_share
    index = edge.index[share] if edge.index is not None else None
    return wire.payload_record(wire.encode_train_data(edge.worker.train_data.subset(share), index, edge.transfer))


@client_app.query("hello")
def hello(message: Message, context: Context) -> Message:
    edge = _local_edge(message, context)
    w = edge.worker
    log.info("%s: %s data, %d training / %d test samples", w.name, edge.mode, len(w.train_data), len(w.test_data))
    content = RecordDict({
        wire.METRICS: MetricRecord({"partition-id": w.index, "train-samples": len(w.train_data),
                                    "test-samples": len(w.test_data)}),
        wire.REPORT: wire.config_record(mode=edge.mode, name=w.name, host=json.dumps(host_info())),
    })
    return Message(content, reply_to=message)


@client_app.query("data")
def data(message: Message, context: Context) -> Message:
    edge = _local_edge(message, context)
    log.info("%s: uploading %d training samples (deploy.share_data = full)", edge.worker.name,
             len(edge.server_share))
    return Message(RecordDict({wire.TRAIN_DATA: _data_record(edge)}), reply_to=message)


def _needs_own_weights(edge: LocalEdge) -> bool:
    return edge.worker.update_mode is not None and edge.worker.update_mode.needs_own_weights


def _fit(message: Message, context: Context) -> Message:
    edge = _local_edge(message, context)
    config = message.content[wire.CONFIG]
    phase, epochs = str(config["phase"]), int(config["epochs"])
    weights = _received_weights(message, context, edge)
    reply = edge.worker.fit(weights, phase=phase, epochs=epochs)
    log.info("%s %s: test accuracy %.4f on %d samples", edge.worker.name, phase, reply.accuracy, reply.test_samples)
    base = edge.transfer.upload_base(weights)
    payload = edge.transfer.encode(reply.weights, base=base)
    if edge.transfer.delta:
        # The base of the next download: the upload exactly as the server decodes it (same bytes, base and code).
        sent = edge.transfer.decode(payload, reference=weights, base=base, name=f"{edge.worker.name}'s own upload")
        context.state[wire.LAST_UPLOAD] = wire.payload_record(encode_state_dict(sent))
    if phase == "pretrain" and _needs_own_weights(edge):
        # The next message (the update) runs in a fresh process: the edge's own model waits in the node's state,
        # exact (the upload may have been compressed).
        own = payload if edge.transfer.plain(base) else encode_state_dict(reply.weights)
        context.state[wire.OWN_WEIGHTS] = wire.payload_record(own)
    content = RecordDict({
        wire.WEIGHTS: wire.payload_record(payload),
        wire.METRICS: MetricRecord({"num-samples": reply.num_samples, "accuracy": float(reply.accuracy),
                                    "test-samples": reply.test_samples}),
        wire.REPORT: wire.config_record(history=json.dumps(reply.history)),
    })
    if bool(config.get("send-data", False)):
        log.info("%s: uploading %d training samples with the weights (deploy.share_data = full)",
                 edge.worker.name, len(edge.server_share))
        content[wire.TRAIN_DATA] = _data_record(edge)
    return Message(content, reply_to=message)


@client_app.train("pretrain")
def pretrain(message: Message, context: Context) -> Message:
    return _fit(message, context)


@client_app.train("fedavg")
def fedavg_round(message: Message, context: Context) -> Message:
    return _fit(message, context)


def _own_weights(message: Message, context: Context, edge: LocalEdge) -> dict[str, torch.Tensor] | None:
    """The edge's own pre-trained weights: sent back by the server (a run resumed from checkpoints, then also
    kept in the state), else from the node's state; None when neither has them (the update mode says so)."""
    if wire.OWN_WEIGHTS in message.content:
        payload = wire.payload_bytes(message.content, wire.OWN_WEIGHTS, source="server", max_bytes=edge.max_bytes)
        context.state[wire.OWN_WEIGHTS] = wire.payload_record(payload)
    elif wire.OWN_WEIGHTS in context.state:
        payload = wire.payload_bytes(context.state, wire.OWN_WEIGHTS, source=f"{edge.worker.name}'s state",
                                     max_bytes=None)
    else:
        return None
    return decode_state_dict(payload, name=f"{edge.worker.name}'s own pre-trained weights")


@client_app.evaluate("update")
def update(message: Message, context: Context) -> Message:
    edge = _local_edge(message, context)
    weights = _received_weights(message, context, edge)
    if weights is None:
        raise EdgeSetupError("evaluate.update carries no weights")
    if _needs_own_weights(edge):
        # Never from this process's memory: a deployment starts a fresh process per message.
        edge.worker.pretrained_weights = _own_weights(message, context, edge)
    try:
        evaluation = edge.worker.update(weights)
    finally:  # a long-lived process (the simulation's) caches its edges: they keep no model between messages
        edge.worker.pretrained_weights = None
    log.info("%s update: kept %s, test accuracy %.4f on %d samples", edge.worker.name, evaluation.kept,
             evaluation.accuracy, evaluation.test_samples)
    metrics: dict[str, Any] = {"accuracy": float(evaluation.accuracy), "test-samples": evaluation.test_samples,
                               "update-train-samples": evaluation.train_samples}
    if evaluation.accuracy_full is not None:
        metrics["accuracy-full"] = float(evaluation.accuracy_full)
    report = wire.config_record(
        kept=evaluation.kept, history=json.dumps(evaluation.history),
        validation=json.dumps(evaluation.validation) if evaluation.validation is not None else None)
    # The edge's final weights stay here: the server learns which model it kept, not the model.
    content = RecordDict({wire.METRICS: MetricRecord(metrics), wire.REPORT: report})
    return Message(content, reply_to=message)
