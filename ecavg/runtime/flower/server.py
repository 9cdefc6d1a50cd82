"""The server side of a Flower deployment: a ``ServerApp`` that runs the shared strategies over Flower.

:class:`FlowerEdgePool` is the :class:`~ecavg.core.pool.EdgePool` of a deployment: the same strategy
code (``ecavg.core.strategies``) that the embedded runtime drives calls it, and it turns each call
into Flower messages to the SuperNodes, waits for their replies within the round timeout, validates every
reply completely (:mod:`ecavg.runtime.flower.wire`) and hands the strategy what an in-process edge would.

Missing edges: an edge that does not reply in time, replies with an error, sends a reply that fails
validation, or whose SuperNode is gone is recorded (``missing_edges`` in results.json, with the reason) and
takes no further part in the run. A SuperNode is gone when the SuperLink stops listing it or answers for it
with Flower's "Node Unavailable" error: it stopped (at once) or missed its heartbeats (Flower 1.42: a SuperNode
sends one about every 20 s and is given up 2 x 30 s after the last, a fixed interval). The server does not wait
out ``round_timeout_s`` for such an edge. A training phase with fewer replies than ``deploy.min_edges`` stops
the run with :class:`EdgeQuorumError`; the phases and replies that finished stay in ``checkpoints/`` and
``failure.json`` says what happened.

A little under 500 lines: the pool's message exchanges, their liveness checks and the ServerApp that drives them
belong together (the reply validation already lives in ``wire.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from flwr.app import Context, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

import ecavg.runtime.flower.wire as wire
from ecavg.config import resolve_config
from ecavg.config.deploy import (
    DeploySettings,
    check_data_policy,
    deploy_settings,
    server_training_needs_edge_data,
)
from ecavg.core.participants import DataSpec, ServerWorker
from ecavg.core.pool import EdgePool
from ecavg.core.records import EdgeEvaluation, EdgeReply, StateDict
from ecavg.core.serialization import encode_state_dict
from ecavg.core.transfer import EdgeLinks, Transfer
from ecavg.core.update import make_update_mode
from ecavg.data import ImageDataset, load_dataset
from ecavg.errors import DeploymentError, EdgeQuorumError
from ecavg.runtime.setup import RunDirectory, build_participants, execute, prepare_compute
from ecavg.tracking import require_backend

log = logging.getLogger("ecavg")

# What `ecavg deploy` itself puts in the output directory before the ServerApp starts.
DEPLOY_OWNED = frozenset({"logs", "deploy"})
# How often the server asks the SuperLink for replies: small against any training time, cheap for it.
POLL_INTERVAL_S = 0.2
# Messages live a little longer than the server waits for them, then Flower discards them.
TTL_GRACE_S = 60.0
# How often, while waiting for replies, the server asks the SuperLink which SuperNodes are still connected.
LIVENESS_CHECK_S = 2.0

server_app = ServerApp()


def _node_unavailable(reply: Message) -> bool:
    """Whether ``reply`` is the SuperLink's own answer that the destination SuperNode is gone."""
    return reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE




class SkipFinetuneServer(ServerWorker):
    """A server with no data to train on (``share_data = "none"``, no ``server_data``): "fine-tuning" returns
    the averaged weights unchanged, which makes an ECAvg run a one-shot FedAvg."""

    def train(self, weights, data, *, phase, epochs, on_epoch_record=None, loss=None):  # type: ignore[override]
        if weights is None:
            raise DeploymentError(f"the server has no data to train on in phase {phase!r}")
        return {k: v.detach().cpu().clone() for k, v in weights.items()}, []


class FlowerEdgePool(EdgePool):
    """The server's edges, reached through a Flower ``Grid``."""

    def __init__(self, grid: Grid, *, num_edges: int, settings: DeploySettings, spec: DataSpec, classes: list[str],
                 reference: Mapping[str, torch.Tensor], upload_data: bool, server_data: ImageDataset | None,
                 emit=lambda record: None, update_candidates: tuple[str, ...] = ("server",),
                 transfer: Transfer | None = None):
        self._grid = grid
        self._names = [f"edge-{k}" for k in range(num_edges)]
        self.settings = settings
        self._spec = spec
        self._classes = list(classes)
        self._spec_json = wire.spec_to_json(spec, classes)
        self._reference = dict(reference)
        self._upload_data = upload_data  # share_data = "full" and the run trains on the server
        self._server_data = server_data
        self._emit = emit
        self._update_candidates = update_candidates  # what an edge may report as kept (the run's update mode)
        self._own_payloads: dict[str, bytes] = {}  # edges' own pre-trained weights restored from checkpoints
        self._links = EdgeLinks(transfer)  # the [transfer] codec, and each edge's last upload (delta bases)
        self.nodes: dict[str, int] = {}
        self.modes: dict[str, str] = {}
        self.hosts: dict[str, dict[str, Any]] = {}
        self.missing: dict[str, str] = {}
        self._sizes: dict[str, tuple[int, int]] = {}
        self._data: dict[str, wire.TrainData] = {}
        self._union: ImageDataset | None = None
        self.data_bytes_up = 0
        self.phase_seconds: dict[str, float] = {}
        # Per exchange (phase) and edge: seconds from sending to the reply, or to the edge being dropped.
        self.reply_seconds: dict[str, dict[str, float]] = {}
        self.drop_seconds: dict[str, dict[str, float]] = {}

    # -- EdgePool ---------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def sizes(self) -> dict[str, tuple[int, int]]:
        return dict(self._sizes)

    def fit(self, weights: Mapping[str, torch.Tensor] | None, *, phase: str, epochs: int,
            only: list[str] | None = None) -> Iterator[EdgeReply]:
        targets = [n for n in (only if only is not None else self._names) if n not in self.missing]
        transfer = self._links.transfer
        download = self._links.download(weights) if weights is not None else None
        reference = weights if weights is not None else self._reference
        wants_data = {n: self._upload_data and n not in self._data for n in targets}
        messages = {}
        upload_bases: dict[str, StateDict | None] = {}
        for name in targets:
            content = RecordDict({wire.CONFIG: wire.config_record(
                phase=phase, epochs=int(epochs), spec=self._spec_json, **{"send-data": wants_data[name]},
                base=self._base_label(download, name))})
            upload_bases[name] = None
            if download is not None:
                content[wire.WEIGHTS] = wire.payload_record(download.payload(name))
                if transfer.delta:  # the edge's upload is a delta from what it decodes: the server decodes it too
                    upload_bases[name] = download.received(name)
            messages[name] = content
        # Replies are handed on in edge order, not arrival order: the average then sums in the same order
        # as in the embedded runtime, so a deployment reproduces its numbers bit for bit.
        ready: dict[str, EdgeReply] = {}
        settled: set[str] = set()
        position = 0
        for name, reply in self._exchange(messages, wire.fit_message_type(phase), phase):
            try:
                parsed, data, data_bytes = wire.parse_fit_reply(
                    reply, source=name, node_id=self.nodes[name], reference=reference,
                    max_bytes=self.settings.max_message_bytes, spec=self._spec if wants_data[name] else None,
                    transfer=transfer, base=upload_bases[name])
            except wire.EdgeReplyError as error:
                self._drop(name, phase, f"{error.kind}: {error}")
            else:
                if data is not None:
                    self._add_data(name, data, data_bytes)
                self._links.remember_upload(name, parsed.weights)
                ready[name] = dataclasses.replace(
                    parsed, bytes_up=parsed.bytes_up + data_bytes,
                    bytes_down=len(download.payload(name)) if download is not None else 0)
            settled.add(name)
            while position < len(targets) and (targets[position] in settled or targets[position] in self.missing):
                if targets[position] in ready:
                    yield ready.pop(targets[position])
                position += 1
        for name in targets[position:]:
            if name in ready:
                yield ready.pop(name)
        # Edges not asked (their reply was already checkpointed) took part as well.
        self._check_quorum(phase, sum(1 for n in self._names if n not in self.missing))

    def evaluate(self, weights: Mapping[str, torch.Tensor], *, phase: str) -> Iterator[EdgeEvaluation]:
        download = self._links.download(weights)
        messages = {}
        for name in self._names:
            if name in self.missing:
                continue
            messages[name] = RecordDict({
                wire.CONFIG: wire.config_record(phase=phase, spec=self._spec_json,
                                                base=self._base_label(download, name)),
                wire.WEIGHTS: wire.payload_record(download.payload(name)),
            })
            if name in self._own_payloads:
                messages[name][wire.OWN_WEIGHTS] = wire.payload_record(self._own_payloads[name])
        for name, reply in self._exchange(messages, wire.UPDATE, phase):
            try:
                evaluation = wire.parse_evaluate_reply(reply, source=name, node_id=self.nodes[name],
                                                       candidates=self._update_candidates)
            except wire.EdgeReplyError as error:
                self._drop(name, phase, f"{error.kind}: {error}")
                continue
            own = len(self._own_payloads.get(name, b""))
            if evaluation.kept == "server":  # the server decodes the edge's copy as the edge did, bit for bit
                evaluation = dataclasses.replace(evaluation, weights=download.copy_kept(name))
            yield dataclasses.replace(evaluation, bytes_down=len(download.payload(name)) + own)

    def restore_own_weights(self, name: str, weights: Mapping[str, torch.Tensor]) -> None:
        # A deployment does not resume today (each submission is a new run), but if it did, a fresh run's edges
        # would hold no state: their own weights go down with the update message.
        self._own_payloads[name] = encode_state_dict(weights)

    def restore_upload(self, name: str, weights: Mapping[str, torch.Tensor]) -> None:
        # Nothing to remember: a fresh run's edge does not hold that upload, so its next download goes whole.
        pass

    @staticmethod
    def _base_label(download, name: str) -> str | None:
        """The config record's ``base`` of edge ``name``'s download: "upload" when it is a delta from the edge's
        last upload, else absent (sent whole)."""
        return wire.BASE_UPLOAD if download is not None and download.base(name) is not None else None

    def training_data(self) -> ImageDataset:
        if self._server_data is not None:
            return self._server_data
        if self._union is None:
            self._collect_data()
            self._union = self._assemble_union()
        return self._union

    # -- connecting ---------------------------------------------------------------------------------

    def connect(self) -> None:
        """Wait for the SuperNodes, ask each which edge it is, and check the federation fits the run."""
        deadline = time.monotonic() + self.settings.connect_timeout_s
        wanted = len(self._names)
        node_ids: list[int] = []
        last_count = -1
        while time.monotonic() < deadline:
            node_ids = sorted(self._grid.get_node_ids())
            if len(node_ids) != last_count:
                log.info("%d of %d SuperNodes connected", len(node_ids), wanted)
                last_count = len(node_ids)
            if len(node_ids) >= wanted:
                break
            time.sleep(0.5)
        hello = {f"node {n}": RecordDict({wire.CONFIG: wire.config_record(spec=self._spec_json)}) for n in node_ids}
        node_of = {f"node {n}": n for n in node_ids}
        claimed: dict[int, int] = {}
        problems = []
        answered: set[str] = set()
        # The first message starts each edge's ClientApp (and loads its data): it gets connect_timeout_s of its
        # own, whatever the round timeout is.
        timeout = self.settings.connect_timeout_s
        for label, reply in self._exchange(hello, wire.HELLO, "hello", node_of=node_of, timeout=timeout):
            answered.add(label)
            node = node_of[label]
            try:
                identity = wire.parse_hello_reply(reply, node_id=node, num_edges=wanted)
            except wire.EdgeReplyError as error:
                problems.append(str(error))
                continue
            if identity.partition_id in claimed:
                first, second = sorted((claimed[identity.partition_id], node))
                raise DeploymentError(f"SuperNodes {first} and {second} both have partition-id "
                                      f"{identity.partition_id}; give every SuperNode its own")
            claimed[identity.partition_id] = node
            name = self._names[identity.partition_id]
            log.info("%s is SuperNode %d", name, node)  # `flwr supernode ls` shows node ids only
            self.nodes[name] = node
            self.modes[name] = identity.mode
            self.hosts[name] = identity.host
            self._sizes[name] = (identity.train_samples, identity.test_samples)
        problems += [f"SuperNode {node_of[label]} did not answer {wire.HELLO} within {timeout:g} s"
                     for label in hello if label not in answered]
        for problem in problems:
            log.warning("a SuperNode could not join: %s", problem)
        for name in self._names:
            if name not in self.nodes:
                why = f"not connected: no usable SuperNode with partition-id {self._names.index(name)} within " \
                      f"{self.settings.connect_timeout_s:g} s"
                if problems:
                    why += f" (SuperNodes that failed to join: {'; '.join(problems)})"
                self._drop(name, "connect", why)
        self._check_quorum("connect", len(self.nodes))

    # -- messaging ----------------------------------------------------------------------------------

    def _exchange(self, contents: dict[str, RecordDict], message_type: str, phase: str, *,
                  node_of: dict[str, int] | None = None, timeout: float | None = None) -> Iterator[tuple[str, Message]]:
        """Send one message per edge, yield (edge, reply) as replies arrive.

        Edges silent past the timeout, and edges whose SuperNode is gone (the SuperLink no longer lists it, or
        answers for it with "Node Unavailable"), are recorded as missing at once and not yielded; for the
        anonymous nodes of the hello exchange (labels that are not edges) every reply is yielded, errors too.
        """
        node_of = node_of if node_of is not None else self.nodes
        timeout = timeout if timeout is not None else self.settings.round_timeout_s
        if not contents:
            return
        started = time.monotonic()
        labels = list(contents)
        messages = [Message(contents[label], dst_node_id=node_of[label], message_type=message_type,
                            ttl=timeout + TTL_GRACE_S, group_id=phase) for label in labels]
        message_ids = list(self._grid.push_messages(messages))
        # Flower returns fewer ids than messages when the SuperLink refused the whole push (payload too large).
        message_ids += [None] * (len(labels) - len(message_ids))
        pending: dict[str, str] = {}
        for label, message_id in zip(labels, message_ids):
            if message_id:
                pending[message_id] = label
            elif label in self._names:
                self._drop(label, phase, "error: the SuperLink did not accept the message for this edge",
                           after_s=0.0)
        deadline = started + timeout
        next_liveness_check = started + LIVENESS_CHECK_S
        while pending:
            for reply in self._grid.pull_messages(list(pending)):
                label = pending.pop(reply.metadata.reply_to_message_id, None)
                if label is None:
                    continue
                elapsed = time.monotonic() - started
                if label in self._names and _node_unavailable(reply):
                    self._drop(label, phase, f"gone: its SuperNode (node {node_of[label]}) stopped or missed its "
                                             f"heartbeats; the SuperLink reports it unavailable", after_s=elapsed)
                    continue
                self.reply_seconds.setdefault(phase, {})[label] = round(elapsed, 3)
                yield label, reply
            now = time.monotonic()
            if not pending or now >= deadline:
                break
            if now >= next_liveness_check:
                connected = set(self._grid.get_node_ids())
                for message_id, label in list(pending.items()):
                    if label in self._names and node_of[label] not in connected:
                        del pending[message_id]
                        self._drop(label, phase, f"gone: its SuperNode (node {node_of[label]}) is no longer "
                                                 f"connected to the SuperLink", after_s=now - started)
                next_liveness_check = now + LIVENESS_CHECK_S
            time.sleep(POLL_INTERVAL_S)
        for label in pending.values():
            if label in self._names:
                self._drop(label, phase, f"timeout: no reply to {message_type} within {timeout:g} s",
                           after_s=time.monotonic() - started)
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.monotonic() - started

    def _drop(self, name: str, phase: str, reason: str, *, after_s: float | None = None) -> None:
        if name in self.missing:
            return
        self.missing[name] = f"{reason} (phase {phase})"
        if after_s is None:  # a reply that was rejected: the edge was given up when it arrived
            after_s = self.reply_seconds.get(phase, {}).get(name)
        record = {"participant": name, "phase": phase, "event": "missing", "reason": self.missing[name]}
        if after_s is not None:  # how long the phase's exchange had run when the edge was given up
            self.drop_seconds.setdefault(phase, {})[name] = round(after_s, 3)
            record["after_s"] = round(after_s, 3)
        log.warning("%s is out of the run: %s", name, self.missing[name])
        self._emit(record)

    def missing_edges(self) -> dict[str, str]:
        return dict(self.missing)

    def _check_quorum(self, phase: str, took_part: int) -> None:
        required = self.settings.required_edges(len(self._names))
        if took_part >= required:
            return
        details = "; ".join(f"{n}: {why}" for n, why in self.missing.items()) or "none recorded"
        raise EdgeQuorumError(
            f"{phase}: only {took_part} of {len(self._names)} edges took part, but deploy.min_edges requires "
            f"{required} (0 means all). Missing edges: {details}")

    # -- the edges' training data (share_data = "full") ------------------------------------------------

    def _add_data(self, name: str, data: wire.TrainData, size: int) -> None:
        self._data[name] = data
        self.data_bytes_up += size
        self._union = None

    def _collect_data(self) -> None:
        wanted = {n: RecordDict({wire.CONFIG: wire.config_record(spec=self._spec_json)})
                  for n in self._names if n not in self._data and n not in self.missing}
        for name, reply in self._exchange(wanted, wire.DATA, "data"):
            try:
                data, size = wire.parse_data_reply(reply, source=name, node_id=self.nodes[name], spec=self._spec,
                                                   max_bytes=self.settings.max_message_bytes,
                                                   transfer=self._links.transfer)
            except wire.EdgeReplyError as error:
                self._drop(name, "data", f"{error.kind}: {error}")
                continue
            self._add_data(name, data, size)
        if not self._data:
            raise EdgeQuorumError("data: no edge uploaded its training data, so the server has nothing to train on")
        # A run whose edges never train (strategy = "centralized") takes part through this upload alone.
        self._check_quorum("data", sum(1 for n in self._names if n not in self.missing))

    def _assemble_union(self) -> ImageDataset:
        """The edges' training sets as one dataset: in the run's original order when every edge holds a
        partition of the run's dataset (then it is exactly the embedded runtime's union), else edge by edge."""
        parts = [self._data[n] for n in self._names if n in self._data]
        images = torch.cat([p.images for p in parts])
        labels = torch.cat([p.labels for p in parts])
        if all(p.index is not None for p in parts):
            index = torch.cat([p.index for p in parts])  # type: ignore[misc]
            order = torch.argsort(index, stable=True)
            if bool((index[order][1:] == index[order][:-1]).any()):
                raise DeploymentError("two edges uploaded the same training sample positions; their partition-ids "
                                      "or configs differ")
            images, labels = images[order], labels[order]
        return ImageDataset(images, labels, self._classes)


# ---------------------------------------------------------------------------------------------------
# The ServerApp
# ---------------------------------------------------------------------------------------------------


def _attach_log_handlers(out: Path) -> list[logging.Handler]:
    """The ServerApp process logs to <output>/logs/server.log and to stdout (which `flwr log` shows)."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.FileHandler(out / "logs" / "server.log"),
                                       logging.StreamHandler(sys.stdout)]
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    return handlers


def _own_server_data(name: str, data_dir: str | None, splits_classes: list[str], spec: DataSpec) -> ImageDataset:
    data = load_dataset(name, data_dir).train
    if list(data.classes) != splits_classes or tuple(data.images.shape[1:]) != wire.image_shape_of(spec):
        raise DeploymentError(f"deploy.server_data {name!r} has classes {data.classes} and images "
                              f"{tuple(data.images.shape[1:])}; the run needs {splits_classes} and "
                              f"{wire.image_shape_of(spec)}")
    return data


def run_server(grid: Grid, run_config: Mapping[str, Any], *, log_to_output: bool = True) -> dict[str, Any]:
    """Run one experiment as the server of a Flower federation; writes the output directory like ``ecavg run``.

    ``run_config`` is the Flower run config written by :func:`ecavg.deploy.write_app` (``ecavg-config``,
    ``ecavg-deploy``, ``output-dir``, ``data-dir``).
    """
    cfg = resolve_config(json.loads(str(run_config["ecavg-config"])))
    require_backend(cfg)  # the server tracks a deployed run; the edges need no tracking package
    settings = deploy_settings(json.loads(str(run_config.get("ecavg-deploy", "{}"))),
                               num_edges=cfg["data"]["num_edges"])
    note = check_data_policy(cfg, settings)
    data_dir = str(run_config.get("data-dir", "")) or None
    run_dir = RunDirectory.for_new_run(Path(str(run_config["output-dir"])), may_hold=DEPLOY_OWNED)
    device, splits, load_s = prepare_compute(cfg, data_dir)
    # The server builds its worker exactly as the embedded runtime does (the edge workers are unused here).
    server = build_participants(cfg, splits, device).server
    reference = {k: v.detach().cpu() for k, v in server.new_model().state_dict().items()}
    server_data = None
    if settings.share_data == "none":
        if settings.server_data:
            server_data = _own_server_data(settings.server_data, data_dir, list(splits.train.classes),
                                           server.factory.spec)
        else:
            server_data = splits.train.subset(torch.empty(0, dtype=torch.int64))
            server = SkipFinetuneServer(server.factory, server.settings, server.test_data, server.seed,
                                        eval_each_epoch=server.eval_each_epoch)
    run_dir.start(cfg, data_dir)
    handlers = _attach_log_handlers(run_dir.path) if log_to_output else []
    try:
        if note:
            log.info(note)
        pool = FlowerEdgePool(grid, num_edges=cfg["data"]["num_edges"], settings=settings, spec=server.factory.spec,
                              classes=list(splits.train.classes), reference=reference,
                              upload_data=settings.share_data == "full" and server_training_needs_edge_data(cfg),
                              server_data=server_data, emit=run_dir.emit,
                              update_candidates=make_update_mode(cfg).candidates(),
                              transfer=Transfer.from_config(cfg))
        log.info("%s over Flower: %s, %d edges, %s on %s, share_data = %s, output %s", cfg["strategy"],
                 cfg["data"]["dataset"], cfg["data"]["num_edges"], cfg["model"]["name"], device,
                 settings.share_data, run_dir.path)
        failure_details = lambda: {"missing_edges": pool.missing,  # noqa: E731
                                   "connected_edges": {n: str(node) for n, node in pool.nodes.items()}}
        try:
            pool.connect()
        except Exception as error:
            run_dir.write_failure(error, **failure_details())
            raise
        results = execute(
            cfg, pool, server, run_dir, runtime="flower", device=device, load_s=load_s,
            failure_details=failure_details,
            extra_results=lambda: {"missing_edges": dict(pool.missing), "deploy": {
                **settings.to_dict(),
                "edge_data": dict(pool.modes),
                "edge_hosts": dict(pool.hosts),
                "data_bytes_up": pool.data_bytes_up,
                "phase_wall_s": {k: round(v, 3) for k, v in pool.phase_seconds.items()},
                "reply_s": pool.reply_seconds,
                "dropped_after_s": pool.drop_seconds,
                **({"note": note} if note else {}),
            }})
        log.info("results written to %s", run_dir.path)
        return results
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, dict(context.run_config))
