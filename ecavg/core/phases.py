"""The phases a strategy is composed of, each checkpointed in the run's ``PhaseStore`` and reused on resume.

``initial_weights`` (step 0, the shared start), ``train_edges`` / ``pretrain`` (step 1, edges train and reply),
``aggregate`` (steps 2-3), ``server_train`` (step 4) and ``update`` (step 5). They fill a ``Tally`` (the results
fields, timings and bytes) and emit one ``metrics.jsonl`` record per epoch and participant.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from ecavg.core.aggregation import Aggregator
from ecavg.core.checkpoint import PhaseStore
from ecavg.core.objectives import ServerObjective
from ecavg.core.participants import ServerWorker, derive_seed
from ecavg.core.pool import EdgePool
from ecavg.core.records import KEPT_AT_EDGE, SAME_AS_SERVER, EdgeReply, StateDict
from ecavg.core.transfer import Transfer
from ecavg.data import ImageDataset
from ecavg.errors import AggregationError


@dataclass
class RunContext:
    cfg: dict[str, Any]
    pool: EdgePool
    server: ServerWorker
    store: PhaseStore
    emit: Callable[[dict[str, Any]], None] = lambda record: None


class Tally:
    """Results fields, timings and bytes, filled in as phases finish (or are reloaded on resume)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        sizes = ctx.pool.sizes()
        self.edges = {
            n: {"name": n, "train_samples": sizes.get(n, (None, None))[0],
                "test_samples": sizes.get(n, (None, None))[1],
                "accuracy_before": None, "accuracy_after": None, "accuracy_after_full": None, "update_kept": None,
                "update_train_samples": None, "update_validation": None, "weights_at_edge": False, "missing": None}
            for n in ctx.pool.names
        }
        self.server: dict[str, Any] = {"accuracy_averaged": None, "accuracy_finetuned": None}
        self.timing = {"init": 0.0, "pretrain": 0.0, "aggregate": 0.0, "finetune": 0.0, "update": 0.0}
        self.bytes = {"uplink": 0, "downlink": 0}
        self._started = time.perf_counter()

    def results(self) -> dict[str, Any]:
        # An edge that dropped out (a deployment) says why; the fields it did not report stay None.
        for name, reason in self.ctx.pool.missing_edges().items():
            if name in self.edges:
                self.edges[name]["missing"] = reason
        return {
            "edges": list(self.edges.values()),
            "server": self.server,
            "timing_s": {**{k: round(v, 3) for k, v in self.timing.items()},
                         "total": round(time.perf_counter() - self._started, 3)},
            "bytes": self.bytes,
            "transfer": Transfer.from_config(self.ctx.cfg).to_dict(),
        }


def initial_weights(ctx: RunContext, tally: Tally) -> StateDict:
    """Step 0: the shared start (seeded random, a local pretrained file, or a server warm-up)."""
    cached = ctx.store.load("init")
    if cached is not None:
        record, weights = cached
        tally.timing["init"] += record["seconds"]
        return weights
    start = time.perf_counter()
    cfg = ctx.cfg
    if cfg["init"] == "warmup" and cfg["warmup"]["epochs"] > 0:
        data = random_share(ctx.pool.training_data(), cfg["warmup"]["data_fraction"], cfg["seed"])

        def record_epoch(m: dict[str, Any]) -> None:
            ctx.emit({"participant": "server", "phase": "warmup", **m})

        weights, _ = ctx.server.train(None, data, phase="warmup", epochs=cfg["warmup"]["epochs"],
                                      on_epoch_record=record_epoch)
    else:
        weights = {k: v.detach().cpu().clone() for k, v in ctx.server.new_model().state_dict().items()}
    seconds = time.perf_counter() - start
    ctx.store.save("init", {"seconds": seconds}, weights)
    tally.timing["init"] += seconds
    return weights


def random_share(data: ImageDataset, fraction: float, seed: int) -> ImageDataset:
    """A seeded random share of ``data`` (the warm-up's data)."""
    if fraction >= 1.0:
        return data
    return data.random_subset(max(1, int(round(len(data) * fraction))), derive_seed(seed, "warmup-subset"))


# How often (seconds of the phase) a streamed phase rewrites its running checkpoint: at most this much edge work is
# redone after a hard kill. It is also rewritten when the phase ends and when an exception stops it.
RUNNING_CHECKPOINT_INTERVAL_S = 30.0


def streams_checkpoint(cfg: dict[str, Any], aggregator: Aggregator | None, keep: dict[str, StateDict] | None,
                       restore_own: bool) -> bool:
    """Whether a phase checkpoints its aggregator's running state instead of each edge's weights: when the rule
    streams (``average``) and nothing later needs an edge's own weights (``local``, ``distill``, the update
    modes ``personal`` and ``guarded`` do; so do ``match``, which holds all of them anyway, and
    ``transfer.delta``, whose next download to an edge is a difference from that edge's upload)."""
    return (aggregator is not None and aggregator.streams and keep is None and not restore_own
            and not Transfer.from_config(cfg).delta)


def train_edges(ctx: RunContext, tally: Tally, phase: str, weights: StateDict | None, *, epochs: int,
                aggregator: Aggregator | None = None, keep: dict[str, StateDict] | None = None,
                checkpoint_edges: bool = True, timing_key: str = "pretrain",
                restore_own: bool = False) -> dict[str, dict[str, Any]]:
    """Edges train from ``weights``; each reply is checkpointed and, if given, streamed into ``aggregator``.

    Returns the per-edge records (accuracy, sample counts). With ``checkpoint_edges``, edges that finished
    before an interruption are not trained again on ``--resume`` (FedAvg checkpoints whole rounds instead).
    How they are kept depends on what the run needs later (``streams_checkpoint``):

    * streamed (``average``, the default): one running checkpoint holding the aggregator's running sum and
      the records of the edges in it (no edge's weights), rewritten every ``RUNNING_CHECKPOINT_INTERVAL_S``
      seconds, at the phase's end and when an exception stops it; disk stays at about one model whatever
      the number of edges. ``--resume`` restores the sum and trains again only the edges that replied after
      the last rewrite (none unless the process was killed hard);
    * per edge (``local``, ``match``, ``distill``, update modes ``personal``/``guarded``, ``transfer.delta``):
      each edge's record and weights, so disk grows with the number of edges. ``--resume`` reloads them (with
      ``restore_own``, the pool gets each edge's own weights back, for an update that keeps or compares them;
      with ``transfer.delta``, the base of the edge's next download).
    """
    if checkpoint_edges and streams_checkpoint(ctx.cfg, aggregator, keep, restore_own):
        assert aggregator is not None
        return _train_edges_streamed(ctx, tally, phase, weights, epochs=epochs, aggregator=aggregator,
                                     timing_key=timing_key)
    records: dict[str, dict[str, Any]] = {}
    aggregate_s = 0.0
    missing = []
    for name in ctx.pool.names:
        cached = None
        if checkpoint_edges:
            cached = ctx.store.load(f"{phase}/{name}",
                                    with_weights=aggregator is not None or keep is not None or restore_own)
        if cached is None:
            missing.append(name)
            continue
        record, w = cached
        records[name] = record
        tally.timing[timing_key] += record["seconds"]
        if aggregator is not None:
            t = time.perf_counter()
            aggregator.add(name, w, record["num_samples"])
            aggregate_s += time.perf_counter() - t
        if keep is not None:
            keep[name] = w
        if restore_own and w is not None:  # (a checkpoint's weights are written before its record)
            ctx.pool.restore_own_weights(name, w)
        if w is not None:  # the base of the edge's next download when the run sends deltas ([transfer])
            ctx.pool.restore_upload(name, w)
    if missing:
        start = time.perf_counter()
        for reply in ctx.pool.fit(weights, phase=phase, epochs=epochs, only=missing):
            record = _reply_record(ctx, phase, reply, time.perf_counter() - start)
            if aggregator is not None:
                t = time.perf_counter()
                aggregator.add(reply.name, reply.weights, reply.num_samples)
                aggregate_s += time.perf_counter() - t
            if checkpoint_edges:
                ctx.store.save(f"{phase}/{reply.name}", record, reply.weights)
            if keep is not None:
                keep[reply.name] = reply.weights
            records[reply.name] = record
            tally.timing[timing_key] += record["seconds"]
            start = time.perf_counter()
    _tally_records(tally, records, aggregate_s)
    return records


def _reply_record(ctx: RunContext, phase: str, reply: EdgeReply, seconds: float) -> dict[str, Any]:
    """The checkpointed record of one reply (everything but its weights); its epochs go to metrics.jsonl."""
    for m in reply.history:
        ctx.emit({"participant": reply.name, "phase": phase, **m})
    return {"num_samples": reply.num_samples, "accuracy": reply.accuracy, "test_samples": reply.test_samples,
            "bytes_up": reply.bytes_up, "bytes_down": reply.bytes_down, "seconds": seconds}


def _tally_records(tally: Tally, records: dict[str, dict[str, Any]], aggregate_s: float) -> None:
    for name, record in records.items():
        tally.bytes["uplink"] += record["bytes_up"]
        tally.bytes["downlink"] += record["bytes_down"]
        edge = tally.edges[name]
        edge["train_samples"], edge["test_samples"] = record["num_samples"], record["test_samples"]
    tally.timing["aggregate"] += aggregate_s


def _train_edges_streamed(ctx: RunContext, tally: Tally, phase: str, weights: StateDict | None, *, epochs: int,
                          aggregator: Aggregator, timing_key: str) -> dict[str, dict[str, Any]]:
    """``train_edges`` for a streaming aggregator: the running checkpoint holds its state and the edges' records."""
    records: dict[str, dict[str, Any]] = {}
    aggregate_s = 0.0
    saved = ctx.store.load_running(phase)
    if saved is not None:
        description, tensors = saved
        records = dict(description["records"])
        if description["aggregator"] is not None:
            aggregator.restore(description["aggregator"], tensors)
        elif len(records) < len(ctx.pool.names):  # released only after the aggregate phase, which needs every edge
            raise AggregationError(f"checkpoint {phase}: the running sum was released before every edge replied; "
                                   "the run cannot be resumed, start it again")
        del tensors
        for record in records.values():
            tally.timing[timing_key] += record["seconds"]
    missing = [n for n in ctx.pool.names if n not in records]
    if missing:
        unsaved = 0
        last_save = start = time.perf_counter()

        def save() -> None:
            nonlocal unsaved, last_save
            description, tensors = aggregator.state()
            ctx.store.save_running(phase, {"records": records, "aggregator": description}, tensors)
            unsaved, last_save = 0, time.perf_counter()

        try:
            for reply in ctx.pool.fit(weights, phase=phase, epochs=epochs, only=missing):
                record = _reply_record(ctx, phase, reply, time.perf_counter() - start)
                t = time.perf_counter()
                aggregator.add(reply.name, reply.weights, reply.num_samples)
                aggregate_s += time.perf_counter() - t
                records[reply.name] = record
                unsaved += 1
                tally.timing[timing_key] += record["seconds"]
                if time.perf_counter() - last_save >= RUNNING_CHECKPOINT_INTERVAL_S:
                    save()
                start = time.perf_counter()
        finally:  # the phase's end, or an exception (an edge's error, a quorum lost, Ctrl-C): keep what replied
            if unsaved:
                save()
    _tally_records(tally, records, aggregate_s)
    return records


def release_running_sum(ctx: RunContext, phase: str) -> None:
    """Once the phase's aggregate is checkpointed, its running checkpoint keeps only the edges' records (the sum
    is no longer needed by --resume, and dropping it keeps the run's checkpoints within ~3 models)."""
    saved = ctx.store.load_running(phase, with_tensors=False)
    if saved is not None and saved[0]["aggregator"] is not None:
        ctx.store.save_running(phase, {**saved[0], "aggregator": None}, {})


def own_weights_reader(store: PhaseStore, phase: str = "pretrain") -> Callable[[str], StateDict | None]:
    """Edge ``name``'s own weights from its ``phase`` checkpoint (None when there is none): kept per edge on disk
    whenever the update mode needs them (``streams_checkpoint``), so a runtime need not hold K models in memory."""

    def read(name: str) -> StateDict | None:
        cached = store.load(f"{phase}/{name}")
        return cached[1] if cached is not None else None

    return read


def pretrain(ctx: RunContext, tally: Tally, *, aggregator: Aggregator | None = None,
             keep: dict[str, StateDict] | None = None, restore_own: bool = False) -> None:
    """Steps 0-1: the shared start goes to the edges, each pre-trains and reports ``accuracy_before``.

    ``restore_own``: the update needs each edge's own pre-trained weights, so edges whose pre-training is
    reloaded from checkpoints (``--resume``) get theirs back (``EdgePool.restore_own_weights``)."""
    init = initial_weights(ctx, tally)
    records = train_edges(ctx, tally, "pretrain", init if ctx.cfg["shared_init"] else None,
                          epochs=ctx.cfg["edge"]["epochs"], aggregator=aggregator, keep=keep,
                          restore_own=restore_own)
    for name, record in records.items():
        tally.edges[name]["accuracy_before"] = record["accuracy"]


def aggregate(ctx: RunContext, tally: Tally, aggregator: Aggregator, edges_phase: str = "pretrain") -> StateDict:
    """Step 3: the aggregator's result (the edges of ``edges_phase`` were streamed in), optionally with BatchNorm
    statistics recomputed on the server's data. Once it is checkpointed, the running sum is released."""
    cached = ctx.store.load("averaged")
    if cached is not None:
        record, averaged = cached
    else:
        start = time.perf_counter()
        averaged = aggregator.result(ctx.server, ctx.pool.training_data)
        aggregate_s = time.perf_counter() - start
        record: dict[str, Any] = {"seconds": aggregate_s, "accuracy": ctx.server.evaluate(averaged)}
        if ctx.cfg["bn_recalibration"]:
            recalibrated = ctx.server.recalibrate(averaged, ctx.pool.training_data())
            if recalibrated is not None:
                record["accuracy_before_bn_recalibration"] = record["accuracy"]
                averaged = recalibrated
                record["accuracy"] = ctx.server.evaluate(averaged)
        ctx.store.save("averaged", record, averaged)
        ctx.emit({"participant": "server", "phase": "aggregate", "test_accuracy": record["accuracy"]})
    release_running_sum(ctx, edges_phase)
    tally.timing["aggregate"] += record["seconds"]
    tally.server["accuracy_averaged"] = record["accuracy"]
    if "accuracy_before_bn_recalibration" in record:
        tally.server["accuracy_averaged_before_bn_recalibration"] = record["accuracy_before_bn_recalibration"]
    return averaged


def server_train(ctx: RunContext, tally: Tally, phase: str, weights: StateDict,
                 objective: ServerObjective | None = None) -> StateDict:
    """Step 4 (and the centralized baseline): the server trains ``weights`` on its data for ``server.epochs``."""
    cached = ctx.store.load(phase)
    if cached is not None:
        record, trained = cached
    else:
        start = time.perf_counter()

        def record_epoch(m: dict[str, Any]) -> None:
            ctx.emit({"participant": "server", "phase": phase, **m})

        trained, history = ctx.server.train(weights, ctx.pool.training_data(), phase=phase,
                                            epochs=ctx.cfg["server"]["epochs"], on_epoch_record=record_epoch,
                                            loss=objective.loss if objective is not None else None)
        accuracy = history[-1]["test_accuracy"] if history else ctx.server.evaluate(trained)
        record = {"seconds": time.perf_counter() - start, "accuracy": accuracy}
        ctx.store.save(phase, record, trained)
    tally.server["accuracy_finetuned"] = record["accuracy"]
    tally.timing["finetune"] += record["seconds"]
    return trained


def update(ctx: RunContext, tally: Tally, weights: StateDict, phase: str = "update") -> dict[str, object]:
    """Step 5: send the final weights to every edge, which makes its final model (``update.mode``) and evaluates
    it. Returns each edge's final weights for the output directory: SAME_AS_SERVER when it kept the server's bit
    for bit, its decoded copy when it kept them through a lossy ``transfer.codec`` (measured on the full test set
    here, as the server's own model is), its own weights when the runtime hands them over, else KEPT_AT_EDGE (a
    deployed edge keeps them). An edge
    that did not report (it dropped out of a deployment) has no entry: it was not updated, nothing is written."""
    start = time.perf_counter()
    final: dict[str, object] = {}
    kept_server = []
    # A lossy transfer's decoded copy, measured once per copy: edges sent one shared payload share one object
    # (ecavg.core.transfer.Download.received), which ``final`` keeps alive, so its id stays its own.
    full_of_copy: dict[int, float] = {}
    for ev in ctx.pool.evaluate(weights, phase=phase):
        edge = tally.edges[ev.name]
        edge["accuracy_after"] = ev.accuracy
        edge["test_samples"] = ev.test_samples
        edge["update_kept"] = ev.kept
        edge["update_train_samples"] = ev.train_samples
        edge["update_validation"] = ev.validation
        tally.bytes["downlink"] += ev.bytes_down
        for fine_tune, history in ev.history.items():
            for m in history:
                ctx.emit({"participant": ev.name, "phase": fine_tune, **m})
        record: dict[str, Any] = {"participant": ev.name, "phase": phase, "test_accuracy": ev.accuracy}
        if ev.kept == "server" and ev.weights is None:
            kept_server.append(ev.name)
            final[ev.name] = SAME_AS_SERVER
        else:
            accuracy_full = ev.accuracy_full
            if ev.kept == "server":  # the edge's decoded copy of the server's model (a lossy transfer.codec)
                if id(ev.weights) not in full_of_copy:
                    full_of_copy[id(ev.weights)] = ctx.server.evaluate(ev.weights)
                accuracy_full = full_of_copy[id(ev.weights)]
            record.update(kept=ev.kept, test_accuracy_full=accuracy_full)
            edge["accuracy_after_full"] = accuracy_full
            final[ev.name] = ev.weights if ev.weights is not None else KEPT_AT_EDGE
            edge["weights_at_edge"] = ev.weights is None
        ctx.emit(record)
    if kept_server:  # the server's model on the full test set: the server measures it once for all such edges
        accuracy_full = ctx.server.evaluate(weights)
        for name in kept_server:
            tally.edges[name]["accuracy_after_full"] = accuracy_full
    tally.timing["update"] += time.perf_counter() - start
    return final
