"""The time model of ``ecavg plan``: per-phase wall time of one run deployed on Flower, as a pure function.

:func:`predict` takes numbers only (:class:`PlanInputs`: sample counts, compute seconds per sample, payload bytes,
link rates, CPU shares, the Flower per-message overhead) and returns one :class:`PhaseEstimate` per message
exchange or server step, in the order the run does them. ``ecavg.plan.inputs`` measures or reads those numbers.

What a phase costs, as the Flower runtime (``ecavg.runtime.flower``) runs it:

* a message exchange (``hello``, ``data``, ``pretrain``, ``roundN``, ``update``) ends when the slowest edge has
  replied; edge k takes ``overhead + bytes_down_k / rate_k + compute_k / share_k + bytes_up_k / rate_k``, plus,
  behind a rate-limited link, the time Flower takes to notice a payload's last byte (:func:`pull_wait_seconds`):
  the ServerApp's for every reply, a warm ClientApp's for every message (a ClientApp process started per message
  is not yet asking while the message crosses the link: the per-message runs measured fit without that wait).
  Flower starts a fresh ClientApp process per message (importing PyTorch, reloading the edge's data): the
  overhead. A message that trains pays once more for the process's first optimizer (PyTorch imports
  ``torch._dynamo`` then: ``train_start_s``), and so does the server's first training step.
* a server step (``warmup``, ``aggregate``, ``finetune``, ``centralized``) is compute on the server alone.
* edge compute: ``epochs x batches x batch_size x train_s_per_sample`` plus evaluations
  (``samples x eval_s_per_sample``); server compute the same with the server's batch size and the full test set.

Not modelled: the server's own link (each edge's link is its own, as ``ecavg deploy local --link`` emulates),
latency, TCP slow start, and the few hundred bytes of config and metrics each message carries.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

# Flower's cost per message exchange = FLOWER_ROUTING_S + starting the edge's process (importing PyTorch and
# ecavg, loading and partitioning the dataset: ``ecavg plan --calibrate`` times that here, in a subprocess) + for a
# message that trains, that process's first optimizer (TRAIN_START_S, below).
# Measured 2026-12 on the 2-core development machine, Flower 1.42, PyTorch 2.14, under load ~13 from other
# sessions' runs (see NOTES-plan.md):
#   ecavg plan --config configs/quickstart.toml --set threads=1 --json     # just before and just after:
#   ecavg deploy local --config configs/quickstart.toml --edges 2 --set threads=1 --output /tmp/plan-runs/ovh2
# gave an edge process start of 17.7 / 22.6 s (before / after; mean 20.1 s) and phase_wall_s hello 37.3 s,
# pretrain 48.1 s, update 33.5 s, with compute 2.05 s (pretrain) and 0.03 s (update), and the server's fine-tuning
# 15.1 s for 4.1 s of compute (its first optimizer: 11.0 s). What is left of a message exchange:
#   update 33.5 - 0.03 - 20.1 = 13.3 s; pretrain 48.1 - 2.05 - 20.1 - 11.0 = 14.9 s; mean 14.1 s.
# That residual is Flower's polling (a SuperNode polls every 3 s when idle, a reply waits in 0.5 s steps) plus,
# on that machine, the CPU contention of the SuperLink, 2 SuperNodes and 2 ClientApps starting at once on 2 loaded
# cores; on an idle machine docs/deploy.md section 6 measured whole exchanges of 4.4 s (update).
FLOWER_ROUTING_S = 14.1
EDGE_START_S = 20.1  # used when the start is not timed here (--from)
MESSAGE_OVERHEAD_S = FLOWER_ROUTING_S + EDGE_START_S
# The first message (hello) costs more (the SuperNode fetches and installs the app): 37.3 - 20.1 - 14.1 s.
HELLO_EXTRA_S = 3.1
HELLO_OVERHEAD_S = MESSAGE_OVERHEAD_S + HELLO_EXTRA_S
# A process's first optimizer imports torch._dynamo (PyTorch 2.14): timed by --calibrate in the same subprocess;
# this default is the server's first fine-tuning in the measurement above (15.1 s - 4.1 s of compute).
TRAIN_START_S = 11.0

# Flower 1.42 fetches a message's objects with exponential backoff while they are not all there
# (``PULL_INITIAL_BACKOFF``, ``PULL_BACKOFF_CAP`` in flwr/supercore/constant.py; +-20% jitter, left out here). The
# receiver starts asking as soon as the message is registered, before its bytes have crossed a slow link, so it
# notices the payload at its first ask after the last byte. Measured (docs/findings.md, "Real edge conditions"):
# with the two constants patched down to 0.1 and 0.2 s, a warm int8 + deflate CIFAR-10 round at 1 Mbit/s spent
# 10.2 s less in pre-training.
PULL_INITIAL_BACKOFF_S = 1.0
PULL_BACKOFF_CAP_S = 10.0

COMPUTE, COMMUNICATION, OVERHEAD = "compute", "communication", "overhead"


@dataclass(frozen=True)
class EdgeInputs:
    name: str
    train_samples: int
    test_samples: int
    data_bytes: int = 0  # encoded size of the training data it uploads to the server (0: none)
    rate_bps: float | None = None  # its link, both directions, bits per second (None: not limited)
    cpu_share: float = 1.0  # its compute speed relative to the calibration (0.25: four times slower)
    validation_samples: int = 0  # held out by update.mode = "guarded"


@dataclass(frozen=True)
class ComputeRates:
    """Seconds per sample, as calibrated (or read from a run) on one machine."""

    edge_train_s: float  # a training sample at edge.batch_size
    server_train_s: float  # at server.batch_size
    update_train_s: float  # at the update's fine-tuning batch size
    eval_s: float  # an evaluated sample (batches of 1024)
    average_s: float = 0.0  # the server averaging the edges' weights (the whole step)
    edge_start_s: float | None = None  # starting an edge's process for one message (None: not measured)
    train_start_s: float | None = None  # a fresh process's first optimizer (None: not measured)


@dataclass(frozen=True)
class Payloads:
    """Bytes of one weights payload under the run's [transfer] codec (what ``Transfer.encode`` makes)."""

    whole: int  # a download sent whole (pre-training, FedAvg round 1; every download without delta)
    upload: int  # an upload (a delta from the weights received, with transfer.delta)
    delta_down: int  # a download sent as a delta from the edge's last upload (transfer.delta)
    delta: bool = False
    first_down: int | None = None  # the first training download (0 with shared_init = false: none sent)


@dataclass(frozen=True)
class PlanInputs:
    strategy: str  # ecavg, fedavg, centralized, local
    edges: tuple[EdgeInputs, ...]
    rates: ComputeRates
    payloads: Payloads
    edge_epochs: int
    edge_batch_size: int
    server_epochs: int
    server_batch_size: int
    server_train_samples: int  # what the server fine-tunes on (0: no fine-tuning)
    full_test_samples: int
    eval_each_epoch: bool = True
    fedavg_rounds: int = 1
    upload_data: bool = False  # edges send their data (share_data = "full" and the server trains)
    warmup_epochs: int = 0  # init = "warmup": the server trains first, on this share of the union
    warmup_samples: int = 0
    # Forward passes over this many samples in the aggregate step (BatchNorm recalibration, activation matching).
    aggregate_forward_samples: int = 0
    update_mode: str = "replace"
    update_epochs: int = 0
    update_batch_size: int = 0
    message_overhead_s: float = MESSAGE_OVERHEAD_S
    hello_overhead_s: float = HELLO_OVERHEAD_S
    train_start_s: float = TRAIN_START_S  # once per training message, and once for the server's first training
    server_train_start_s: float | None = None  # the server's first training, where measured apart (else train_start_s)
    # The part of each message's overhead that is the edge's process start (importing PyTorch, loading its data):
    # CPU work, so an edge with a CPU share below one core takes start / share for it (0: not measured).
    edge_start_s: float = 0.0
    warm_clientapps: bool = False  # ecavg deploy local --warm-clientapps: one long-lived ClientApp per SuperNode


@dataclass
class EdgeCost:
    compute_s: float = 0.0
    transfer_s: float = 0.0
    overhead_s: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0

    @property
    def total_s(self) -> float:
        return self.compute_s + self.transfer_s + self.overhead_s


@dataclass
class PhaseEstimate:
    phase: str
    compute_s: float  # of the edge that finishes last (or the server's)
    transfer_s: float
    overhead_s: float
    total_s: float
    bytes_down: int = 0  # per edge (the slowest edge's), server -> edge
    bytes_up: int = 0  # per edge, edge -> server
    slowest: str = "server"
    dominant: str = COMPUTE
    per_edge: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def batches(samples: int, batch_size: int) -> int:
    """Training batches per epoch as the loader makes them (drop_last when there is more than one batch)."""
    if samples <= 0:
        return 0
    return samples // batch_size if samples > batch_size else 1


def train_seconds(samples: int, batch_size: int, epochs: int, seconds_per_sample: float) -> float:
    return epochs * batches(samples, batch_size) * batch_size * seconds_per_sample


def transfer_seconds(nbytes: int, rate_bps: float | None) -> float:
    return 0.0 if rate_bps is None or nbytes == 0 else nbytes * 8.0 / rate_bps


def pull_wait_seconds(transfer_s: float) -> float:
    """From a payload's last byte to the receiver's next ask for it (asks at 0, 1, 3, 7, 15, 25, 35, ... s)."""
    asked, delay = 0.0, PULL_INITIAL_BACKOFF_S
    while asked < transfer_s:
        asked += delay
        delay = min(2.0 * delay, PULL_BACKOFF_CAP_S)
    return asked - transfer_s


def _edge_fit_s(p: PlanInputs, edge: EdgeInputs) -> float:
    evaluations = (p.edge_epochs - 1 if p.eval_each_epoch else 0) + 1 if p.edge_epochs > 0 else 1
    return (train_seconds(edge.train_samples, p.edge_batch_size, p.edge_epochs, p.rates.edge_train_s)
            + evaluations * edge.test_samples * p.rates.eval_s)


def _edge_update_s(p: PlanInputs, edge: EdgeInputs) -> float:
    """Evaluating (and for the fine-tuning modes first training) the edge's final model."""
    r = p.rates
    if p.update_mode == "replace" or p.strategy == "centralized":
        return edge.test_samples * r.eval_s
    tunes = {"finetune": 1, "personal": 1, "guarded": 2}.get(p.update_mode, 1) if p.update_epochs > 0 else 0
    evaluations = (p.update_epochs - 1 if p.eval_each_epoch else 0) * edge.test_samples
    seconds = tunes * (train_seconds(edge.train_samples, p.update_batch_size or p.edge_batch_size, p.update_epochs,
                                     r.update_train_s) + evaluations * r.eval_s)
    if p.update_mode == "guarded":  # own, server and each fine-tune scored on the held-out slice
        seconds += (2 + tunes) * edge.validation_samples * r.eval_s
    # The kept model on the edge's test set and on the full test set.
    return seconds + (edge.test_samples + p.full_test_samples) * r.eval_s


def _exchange(p: PlanInputs, phase: str, *, compute, down, up, overhead: float) -> PhaseEstimate:
    """A message to every edge; the phase ends with the last reply."""
    costs: dict[str, EdgeCost] = {}
    start = min(p.edge_start_s, overhead)  # the CPU-bound part of this message's overhead
    for edge in p.edges:
        bytes_down, bytes_up = down(edge), up(edge)
        down_s, up_s = transfer_seconds(bytes_down, edge.rate_bps), transfer_seconds(bytes_up, edge.rate_bps)
        waits = pull_wait_seconds(up_s) + (pull_wait_seconds(down_s) if p.warm_clientapps else 0.0)
        costs[edge.name] = EdgeCost(
            compute_s=compute(edge) / edge.cpu_share, transfer_s=down_s + up_s,
            overhead_s=overhead + start * (1.0 / edge.cpu_share - 1.0) + waits, bytes_down=bytes_down,
            bytes_up=bytes_up)
    slowest = max(costs, key=lambda n: costs[n].total_s)
    c = costs[slowest]
    parts = {COMPUTE: c.compute_s, COMMUNICATION: c.transfer_s, OVERHEAD: c.overhead_s}
    return PhaseEstimate(phase, c.compute_s, c.transfer_s, c.overhead_s, c.total_s, c.bytes_down, c.bytes_up,
                         slowest, max(parts, key=lambda k: parts[k]),
                         {n: {"compute_s": e.compute_s, "transfer_s": e.transfer_s, "total_s": e.total_s}
                          for n, e in costs.items()})


def _server(phase: str, seconds: float, overhead: float = 0.0) -> PhaseEstimate:
    return PhaseEstimate(phase, seconds, 0.0, overhead, seconds + overhead, dominant=OVERHEAD if overhead > seconds
                         else COMPUTE)


def predict(p: PlanInputs) -> list[PhaseEstimate]:
    """Every phase of the run, in order, with its predicted wall time (pure: numbers in, numbers out)."""
    if p.strategy not in ("ecavg", "fedavg", "centralized", "local"):
        raise ValueError(f"no time model for strategy {p.strategy!r}")
    if not p.edges:
        raise ValueError("a plan needs at least one edge")
    r, w = p.rates, p.payloads
    edge_models = p.strategy != "centralized"
    phases = [_exchange(p, "hello", compute=lambda e: 0.0, down=lambda e: 0, up=lambda e: 0,
                        overhead=p.hello_overhead_s)]
    # Data goes up with the pre-training reply, unless the server needs it first (see FlowerEdgePool.fit).
    data_first = p.upload_data and (not edge_models or p.warmup_epochs > 0)
    if data_first:
        phases.append(_exchange(p, "data", compute=lambda e: 0.0, down=lambda e: 0, up=lambda e: e.data_bytes,
                                overhead=p.message_overhead_s))
    server_trained = False  # the ServerApp's first training pays its start once
    server_start = p.train_start_s if p.server_train_start_s is None else p.server_train_start_s
    if p.warmup_epochs > 0:
        phases.append(_server("warmup", train_seconds(p.warmup_samples, p.server_batch_size, p.warmup_epochs,
                                                      r.server_train_s) + p.full_test_samples * r.eval_s,
                              server_start))
        server_trained = True
    if edge_models:
        with_data = p.upload_data and not data_first
        fit_phases = ["pretrain"] if p.strategy != "fedavg" else [f"round{k}" for k in range(1, p.fedavg_rounds + 1)]
        for k, phase in enumerate(fit_phases):
            first = w.whole if w.first_down is None else w.first_down
            down = first if k == 0 else (w.delta_down if w.delta else w.whole)
            extra = (lambda e: e.data_bytes) if with_data and k == 0 else (lambda e: 0)
            estimate = _exchange(p, phase, compute=lambda e: _edge_fit_s(p, e), down=lambda e, d=down: d,
                                 up=lambda e, x=extra: w.upload + x(e),
                                 overhead=p.message_overhead_s + p.train_start_s)
            if p.strategy == "fedavg":  # the server averages and evaluates every round
                estimate.compute_s += r.average_s + p.full_test_samples * r.eval_s
                estimate.total_s += r.average_s + p.full_test_samples * r.eval_s
            phases.append(estimate)
    if p.strategy == "ecavg":
        phases.append(_server("aggregate", r.average_s + p.full_test_samples * r.eval_s
                              + p.aggregate_forward_samples * r.eval_s))
    server_phase = {"ecavg": "finetune", "centralized": "centralized"}.get(p.strategy)
    if server_phase and p.server_train_samples > 0 and p.server_epochs > 0:
        evaluations = p.server_epochs if p.eval_each_epoch else 1
        phases.append(_server(server_phase, train_seconds(p.server_train_samples, p.server_batch_size,
                                                          p.server_epochs, r.server_train_s)
                              + evaluations * p.full_test_samples * r.eval_s,
                              0.0 if server_trained else server_start))
    if p.strategy != "local":
        down = w.delta_down if w.delta and edge_models else w.whole
        trains = p.update_mode != "replace" and p.update_epochs > 0 and p.strategy != "centralized"
        phases.append(_exchange(p, "update", compute=lambda e: _edge_update_s(p, e), down=lambda e: down,
                                up=lambda e: 0, overhead=p.message_overhead_s + (p.train_start_s if trains else 0)))
    return phases


def round_summary(phases: list[PhaseEstimate]) -> dict[str, Any]:
    """The whole run: total seconds, and how much of it is compute, transfer and Flower's overhead."""
    total = sum(ph.total_s for ph in phases)
    parts = {COMPUTE: sum(ph.compute_s for ph in phases), COMMUNICATION: sum(ph.transfer_s for ph in phases),
             OVERHEAD: sum(ph.overhead_s for ph in phases)}
    return {"total_s": round(total, 3), **{f"{k}_s": round(v, 3) for k, v in parts.items()},
            "dominant": max(parts, key=lambda k: parts[k])}


def crossover_rate_bps(p: PlanInputs) -> float | None:
    """The link rate (the same on every edge) below which the run's transfers take longer than its compute:
    the bits the slowest edge moves over the run divided by the run's compute seconds (None: nothing to send)."""
    unlimited = PlanInputs(**{**p.__dict__, "edges": tuple(EdgeInputs(**{**e.__dict__, "rate_bps": None})
                                                                 for e in p.edges)})
    phases = predict(unlimited)
    compute = sum(ph.compute_s for ph in phases)
    bits = sum(8.0 * (ph.bytes_down + ph.bytes_up) for ph in phases)
    if bits == 0 or compute <= 0 or not math.isfinite(compute):
        return None
    return bits / compute
