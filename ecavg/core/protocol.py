"""The strategies (ECAvg and its baselines), written once against an ``EdgePool``.

An ``EdgePool`` is how the server reaches its edges: the embedded runtime calls edge objects in the same
process, the Flower runtime sends messages to edge agents. The strategy code below does not know which.

Every finished phase is saved in a ``PhaseStore`` and reused when a run resumes.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch

from ecavg.core.averaging import StreamingAverager
from ecavg.core.checkpoint import PhaseStore
from ecavg.core.participants import ServerWorker, StateDict, derive_seed
from ecavg.data import ImageDataset

ATTACHED = "same-as-server"


@dataclass
class EdgeReply:
    """What one edge sends back after training: weights plus what it measured on its own data."""

    name: str
    weights: StateDict
    num_samples: int
    accuracy: float
    test_samples: int
    history: list[dict[str, Any]] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class EdgeEvaluation:
    name: str
    accuracy: float
    test_samples: int
    bytes_down: int = 0


class EdgePool(ABC):
    """The server's view of its edges."""

    @property
    @abstractmethod
    def names(self) -> list[str]: ...

    @abstractmethod
    def fit(self, weights: Mapping[str, torch.Tensor] | None, *, phase: str, epochs: int,
            only: list[str] | None = None) -> Iterator[EdgeReply]:
        """Each edge (or those in ``only``) trains from ``weights`` (None: its own random init) and replies."""

    @abstractmethod
    def evaluate(self, weights: Mapping[str, torch.Tensor], *, phase: str) -> Iterator[EdgeEvaluation]:
        """Send ``weights`` to every edge; each replaces its model and evaluates it on its own test data."""

    @abstractmethod
    def training_data(self) -> ImageDataset:
        """The union of the edges' training data, for the server (warm-up, fine-tuning, BN recalibration)."""

    def sizes(self) -> dict[str, tuple[int, int]]:
        """(train samples, test samples) per edge, where known before the edges reply."""
        return {}


@dataclass
class RunContext:
    cfg: dict[str, Any]
    pool: EdgePool
    server: ServerWorker
    store: PhaseStore
    emit: Callable[[dict[str, Any]], None] = lambda record: None


@dataclass
class Outcome:
    """What a strategy produced: the results fields and the final weights."""

    results: dict[str, Any]
    server_weights: StateDict | None
    edge_weights: dict[str, StateDict | str]  # per edge: its own weights, or ATTACHED (identical to the server's)


class _Tally:
    """Results fields, timings and bytes, filled in as phases finish (or are reloaded on resume)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        sizes = ctx.pool.sizes()
        self.edges = {
            n: {"name": n, "train_samples": sizes.get(n, (None, None))[0], "test_samples": sizes.get(n, (None, None))[1],
                "accuracy_before": None, "accuracy_after": None}
            for n in ctx.pool.names
        }
        self.server: dict[str, Any] = {"accuracy_averaged": None, "accuracy_finetuned": None}
        self.timing = {"init": 0.0, "pretrain": 0.0, "aggregate": 0.0, "finetune": 0.0, "update": 0.0}
        self.bytes = {"uplink": 0, "downlink": 0}

    def results(self, total_s: float) -> dict[str, Any]:
        return {
            "edges": list(self.edges.values()),
            "server": self.server,
            "timing_s": {**{k: round(v, 3) for k, v in self.timing.items()}, "total": round(total_s, 3)},
            "bytes": self.bytes,
        }


def _initial_weights(ctx: RunContext, tally: _Tally) -> StateDict:
    """Step 0: the shared start (seeded random, a local pretrained file, or a server warm-up)."""
    cached = ctx.store.load("init")
    if cached is not None:
        record, weights = cached
        tally.timing["init"] += record["seconds"]
        return weights
    start = time.perf_counter()
    cfg = ctx.cfg
    if cfg["init"] == "warmup" and cfg["warmup"]["epochs"] > 0:
        data = _fraction(ctx.pool.training_data(), cfg["warmup"]["data_fraction"], cfg["seed"])

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


def _fraction(data: ImageDataset, fraction: float, seed: int) -> ImageDataset:
    if fraction >= 1.0:
        return data
    g = torch.Generator().manual_seed(derive_seed(seed, "warmup-subset"))
    keep = torch.randperm(len(data), generator=g)[: max(1, int(round(len(data) * fraction)))]
    return data.subset(keep.sort().values)


def _edge_phase(ctx: RunContext, tally: _Tally, phase: str, weights: StateDict | None, *, epochs: int,
                averager: StreamingAverager | None, keep: dict[str, StateDict] | None = None,
                checkpoint_edges: bool = True, timing_key: str = "pretrain") -> dict[str, dict[str, Any]]:
    """Edges train from ``weights``; each reply is checkpointed and, if given, streamed into ``averager``.

    Returns the per-edge records (accuracy, sample counts). With ``checkpoint_edges``, edges that finished
    before an interruption are loaded from the store instead of training again (FedAvg checkpoints whole
    rounds instead, so that many rounds do not keep every edge's weights on disk).
    """
    records: dict[str, dict[str, Any]] = {}
    aggregate_s = 0.0
    missing = []
    for name in ctx.pool.names:
        cached = None
        if checkpoint_edges:
            cached = ctx.store.load(f"{phase}/{name}", with_weights=averager is not None or keep is not None)
        if cached is None:
            missing.append(name)
            continue
        record, w = cached
        records[name] = record
        tally.timing[timing_key] += record["seconds"]
        if averager is not None:
            t = time.perf_counter()
            averager.add(w, record["num_samples"], name=name)
            aggregate_s += time.perf_counter() - t
        if keep is not None:
            keep[name] = w
    if missing:
        start = time.perf_counter()
        for reply in ctx.pool.fit(weights, phase=phase, epochs=epochs, only=missing):
            seconds = time.perf_counter() - start
            record = {"num_samples": reply.num_samples, "accuracy": reply.accuracy, "test_samples": reply.test_samples,
                      "bytes_up": reply.bytes_up, "bytes_down": reply.bytes_down, "seconds": seconds}
            for m in reply.history:
                ctx.emit({"participant": reply.name, "phase": phase, **m})
            if averager is not None:
                t = time.perf_counter()
                averager.add(reply.weights, reply.num_samples, name=reply.name)
                aggregate_s += time.perf_counter() - t
            if checkpoint_edges:
                ctx.store.save(f"{phase}/{reply.name}", record, reply.weights)
            if keep is not None:
                keep[reply.name] = reply.weights
            records[reply.name] = record
            tally.timing[timing_key] += seconds
            start = time.perf_counter()
    for name, record in records.items():
        tally.bytes["uplink"] += record["bytes_up"]
        tally.bytes["downlink"] += record["bytes_down"]
        edge = tally.edges[name]
        edge["train_samples"], edge["test_samples"] = record["num_samples"], record["test_samples"]
    tally.timing["aggregate"] += aggregate_s
    return records


def _update(ctx: RunContext, tally: _Tally, weights: StateDict, phase: str = "update") -> None:
    """Step 5: send the final weights to every edge, which replaces its model and evaluates it."""
    start = time.perf_counter()
    for ev in ctx.pool.evaluate(weights, phase=phase):
        tally.edges[ev.name]["accuracy_after"] = ev.accuracy
        tally.edges[ev.name]["test_samples"] = ev.test_samples
        tally.bytes["downlink"] += ev.bytes_down
        ctx.emit({"participant": ev.name, "phase": phase, "test_accuracy": ev.accuracy})
    tally.timing["update"] += time.perf_counter() - start


def _server_train(ctx: RunContext, tally: _Tally, phase: str, weights: StateDict) -> StateDict:
    cached = ctx.store.load(phase)
    if cached is not None:
        record, trained = cached
    else:
        start = time.perf_counter()

        def record_epoch(m: dict[str, Any]) -> None:
            ctx.emit({"participant": "server", "phase": phase, **m})

        trained, history = ctx.server.train(weights, ctx.pool.training_data(), phase=phase,
                                            epochs=ctx.cfg["server"]["epochs"], on_epoch_record=record_epoch)
        accuracy = history[-1]["test_accuracy"] if history else ctx.server.evaluate(trained)
        record = {"seconds": time.perf_counter() - start, "accuracy": accuracy}
        ctx.store.save(phase, record, trained)
    tally.server["accuracy_finetuned"] = record["accuracy"]
    tally.timing["finetune"] += record["seconds"]
    return trained


def _average(ctx: RunContext, tally: _Tally, averager: StreamingAverager) -> StateDict:
    """Step 3: the weighted average (already streamed in), optionally with BatchNorm statistics recomputed."""
    cached = ctx.store.load("averaged")
    if cached is not None:
        record, averaged = cached
    else:
        start = time.perf_counter()
        averaged = averager.result()
        aggregate_s = time.perf_counter() - start
        record: dict[str, Any] = {"seconds": aggregate_s, "accuracy": ctx.server.evaluate(averaged)}
        if ctx.cfg["bn_recalibration"]:
            recalibrated = ctx.server.recalibrate(averaged, ctx.pool.training_data())
            if recalibrated is not None:
                record["accuracy_before_bn_recalibration"] = record["accuracy"]
                averaged = recalibrated
                record["accuracy"] = ctx.server.evaluate(averaged)
        ctx.store.save("averaged", record, averaged)
    tally.timing["aggregate"] += record["seconds"]
    tally.server["accuracy_averaged"] = record["accuracy"]
    if "accuracy_before_bn_recalibration" in record:
        tally.server["accuracy_averaged_before_bn_recalibration"] = record["accuracy_before_bn_recalibration"]
    ctx.emit({"participant": "server", "phase": "aggregate", "test_accuracy": record["accuracy"]})
    return averaged


def _pretrain(ctx: RunContext, tally: _Tally, *, averager: StreamingAverager | None = None,
              keep: dict[str, StateDict] | None = None) -> None:
    """Steps 0-1: the shared start goes to the edges, each pre-trains and reports ``accuracy_before``."""
    init = _initial_weights(ctx, tally)
    records = _edge_phase(ctx, tally, "pretrain", init if ctx.cfg["shared_init"] else None,
                          epochs=ctx.cfg["edge"]["epochs"], averager=averager, keep=keep)
    for name, record in records.items():
        tally.edges[name]["accuracy_before"] = record["accuracy"]


def run_ecavg(ctx: RunContext) -> Outcome:
    tally = _Tally(ctx)
    start = time.perf_counter()
    averager = StreamingAverager()
    _pretrain(ctx, tally, averager=averager)
    averaged = _average(ctx, tally, averager)
    finetuned = _server_train(ctx, tally, "finetune", averaged)
    _update(ctx, tally, finetuned)
    return Outcome(tally.results(time.perf_counter() - start), finetuned, {n: ATTACHED for n in ctx.pool.names})


def run_local(ctx: RunContext) -> Outcome:
    tally = _Tally(ctx)
    start = time.perf_counter()
    kept: dict[str, StateDict] = {}
    _pretrain(ctx, tally, keep=kept)
    return Outcome(tally.results(time.perf_counter() - start), None, dict(kept))


def run_centralized(ctx: RunContext) -> Outcome:
    tally = _Tally(ctx)
    start = time.perf_counter()
    init = _initial_weights(ctx, tally)
    trained = _server_train(ctx, tally, "centralized", init)
    _update(ctx, tally, trained)
    return Outcome(tally.results(time.perf_counter() - start), trained, {n: ATTACHED for n in ctx.pool.names})


def run_fedavg(ctx: RunContext) -> Outcome:
    tally = _Tally(ctx)
    start = time.perf_counter()
    init = _initial_weights(ctx, tally)
    global_weights: StateDict | None = init if ctx.cfg["shared_init"] else None
    rounds = ctx.cfg["fedavg"]["rounds"]
    for r in range(1, rounds + 1):
        phase = f"round{r}"
        cached = ctx.store.load(phase)
        if cached is not None:
            record, global_weights = cached
            tally.timing["pretrain"] += record["train_s"]
            tally.timing["aggregate"] += record["aggregate_s"]
            tally.bytes["uplink"] += record["bytes_up"]
            tally.bytes["downlink"] += record["bytes_down"]
        else:
            before = (tally.timing["pretrain"], tally.timing["aggregate"], tally.bytes["uplink"], tally.bytes["downlink"])
            averager = StreamingAverager()
            records = _edge_phase(ctx, tally, phase, global_weights, epochs=ctx.cfg["edge"]["epochs"],
                                  averager=averager, checkpoint_edges=False)
            t = time.perf_counter()
            global_weights = averager.result()
            tally.timing["aggregate"] += time.perf_counter() - t
            record = {
                "accuracy": ctx.server.evaluate(global_weights),
                "edges": {n: rec["accuracy"] for n, rec in records.items()},
                "train_s": tally.timing["pretrain"] - before[0], "aggregate_s": tally.timing["aggregate"] - before[1],
                "bytes_up": tally.bytes["uplink"] - before[2], "bytes_down": tally.bytes["downlink"] - before[3],
            }
            ctx.store.save(phase, record, global_weights)
            ctx.emit({"participant": "server", "phase": phase, "test_accuracy": record["accuracy"]})
        if r == 1:
            for name, acc in record["edges"].items():
                tally.edges[name]["accuracy_before"] = acc
        tally.server["accuracy_averaged"] = record["accuracy"]
    assert global_weights is not None
    _update(ctx, tally, global_weights)
    return Outcome(tally.results(time.perf_counter() - start), global_weights, {n: ATTACHED for n in ctx.pool.names})


STRATEGIES: dict[str, Callable[[RunContext], Outcome]] = {
    "ecavg": run_ecavg,
    "fedavg": run_fedavg,
    "local": run_local,
    "centralized": run_centralized,
}


def run_strategy(ctx: RunContext) -> Outcome:
    return STRATEGIES[ctx.cfg["strategy"]](ctx)
