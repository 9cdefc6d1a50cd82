"""What ``ecavg plan`` feeds its time model (``ecavg.plan.model``): counted, measured or read from a run.

* Sample counts: the run's partition, built exactly as every runtime builds it (``build_participants``).
* Bytes: the real encoded sizes, not estimates: the model's state dict under the run's ``[transfer]`` codec
  (``Transfer.encode``, with a base when the run sends deltas; a payload's size depends on shapes and dtypes
  only) and each edge's training-data upload as the Flower edge encodes it (``wire.encode_train_data`` of its
  ``server_data_fraction`` share, with the sample positions).
* Compute: :func:`calibrate` trains a few batches of the configured model here, with the configured threads and
  batch sizes, and evaluates a few; :func:`rates_from_run` reads an earlier run's ``metrics.jsonl`` (samples per
  second of every training epoch) and ``results.json`` (``timing_s``: the aggregate step is an evaluation of the
  full test set, which gives the evaluation rate).
* Flower's per-message overhead: by default the routing measured on the development machine plus the edge process
  start timed here; from a deployed run (``--from`` a ``deploy`` run), :func:`overheads_from_run` fits it to what
  that run's exchanges took beyond their compute and transfers, so a plan of other links on the same machines
  needs no constant measured elsewhere.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ecavg
from ecavg.config import deploy_settings, resolve_config
from ecavg.config.deploy import server_training_needs_edge_data
from ecavg.core import average_state_dicts
from ecavg.core.training import TrainingSettings, evaluate, train
from ecavg.core.transfer import Transfer
from ecavg.data import load_dataset
from ecavg.errors import ConfigError
from ecavg.models import batchnorm_keys
from ecavg.plan import measured_phases
from ecavg.plan.model import (
    EDGE_START_S,
    FLOWER_ROUTING_S,
    HELLO_EXTRA_S,
    TRAIN_START_S,
    ComputeRates,
    EdgeInputs,
    Payloads,
    PlanInputs,
    predict,
)
from ecavg.runtime.setup import Participants, build_participants, prepare_compute, server_share

# Training is timed over enough batches to fill this many seconds (at least MIN, at most one epoch), after a
# short untimed run that warms up and sizes it; evaluation over up to EVAL_BATCHES batches of 1024.
CALIBRATION_SECONDS = 2.0
MIN_CALIBRATION_BATCHES = 5
EVAL_BATCHES = 3
BN_RECALIBRATION_BATCHES = 200  # as ecavg.core.training.recalibrate_batchnorm's default


class _FirstBatches:
    """The first ``n`` batches of a loader, with a length (what ``train`` and ``evaluate`` iterate)."""

    def __init__(self, loader: Any, n: int):
        self.loader, self.n = loader, min(n, len(loader))

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.loader), self.n)


def setup(cfg: dict[str, Any], data_dir: str | None) -> Participants:
    """The run's participants (partition, model factory, settings), with the config's threads and device."""
    device, splits, _ = prepare_compute(cfg, data_dir)
    return build_participants(cfg, splits, device)


def payloads(cfg: Mapping[str, Any], participants: Participants) -> Payloads:
    """Encoded sizes of the run's weight transfers. A codec's size depends only on shapes and dtypes, so the model's
    initial weights, and themselves as a delta base, give the exact figure. With ``transfer.deflate`` it depends on
    the values too: every transfer is planned at the initial weights' deflated size (a delta of the weights from
    themselves, all zeros, would deflate to almost nothing). Trained weights can deflate less well: MobileNetV2's
    int8 payload is 23.4% of fp32's initialised and 26.2% trained (bench/README.md, docs/findings.md)."""
    transfer = Transfer.from_config(cfg)
    weights = {k: v.detach().cpu() for k, v in participants.server.new_model().state_dict().items()}
    whole = len(transfer.encode(weights))
    delta = len(transfer.encode(weights, base=weights)) if transfer.delta and not transfer.deflate else whole
    return Payloads(whole=whole, upload=delta, delta_down=delta, delta=transfer.delta,
                    first_down=whole if cfg["shared_init"] else 0)


def data_upload_bytes(cfg: Mapping[str, Any], participants: Participants) -> list[int]:
    """Per edge: the size of the training data it uploads (``share_data = "full"``), exactly as encoded (and
    deflated, with ``transfer.deflate``)."""
    from ecavg.runtime.flower.wire import encode_train_data  # imports Flower: only when data is uploaded

    transfer = Transfer.from_config(cfg)
    sizes = []
    for edge, positions in zip(participants.edges, participants.positions):
        share = server_share(edge.train_data, cfg["server_data_fraction"], cfg["seed"], edge.name)
        sizes.append(len(encode_train_data(edge.train_data.subset(share), positions[share], transfer)))
    return sizes


@dataclass(frozen=True)
class Overheads:
    """Flower's cost per message exchange beyond compute and transfers (see ``ecavg.plan.model``)."""

    message_s: float  # a message that does not train
    hello_s: float  # the first message
    train_start_s: float  # added to a message that trains (the process's first optimizer)
    server_train_start_s: float | None = None  # the server's first training step beyond its compute


def plan_inputs(cfg: dict[str, Any], participants: Participants, rates: ComputeRates, *, data_dir: str | None,
                links: Mapping[int, int], cpu_shares: Mapping[int, float],
                message_overhead_s: float | None = None, overheads: Overheads | None = None,
                warm_clientapps: bool = False) -> PlanInputs:
    """Everything the time model needs for ``cfg`` (resolved), with per-edge links (bits per second) and CPU shares,
    keyed by edge index as ``rates.parse_edge_values`` gives them (an edge absent: unlimited, one whole core).
    ``warm_clientapps``: one long-lived ClientApp per SuperNode (``deploy local --warm-clientapps``)."""
    settings = deploy_settings(cfg["deploy"], num_edges=cfg["data"]["num_edges"])
    trains_on_server = server_training_needs_edge_data(cfg)
    upload = settings.share_data == "full" and trains_on_server
    data_bytes = data_upload_bytes(cfg, participants) if upload else [0] * len(participants.edges)
    union = len(participants.union)
    if settings.share_data == "full":
        server_samples = union
    elif settings.server_data:
        server_samples = len(load_dataset(settings.server_data, data_dir).train)
    else:
        server_samples = 0
    if cfg["strategy"] == "ecavg" and cfg["server_data_fraction"] == 0:
        server_samples = 0  # one-shot averaging: no fine-tuning
    edges = tuple(
        EdgeInputs(name=e.name, train_samples=len(e.train_data), test_samples=len(e.test_data),
                   data_bytes=size, rate_bps=links.get(k), cpu_share=cpu_shares.get(k, 1.0),
                   validation_samples=len(e.validation_data) if e.validation_data is not None else 0)
        for k, (e, size) in enumerate(zip(participants.edges, data_bytes)))
    warmup = cfg["init"] == "warmup" and cfg["warmup"]["epochs"] > 0
    fraction = cfg["warmup"]["data_fraction"]
    forward = 0
    if cfg["bn_recalibration"] and batchnorm_keys(participants.server.new_model()):
        forward += min(union, BN_RECALIBRATION_BATCHES * cfg["server"]["batch_size"])
    if cfg["strategy"] == "ecavg":
        from ecavg.core.aggregation import AGGREGATORS

        forward += AGGREGATORS.get(cfg["aggregation"]).forward_samples(cfg, len(participants.edges), union)
    hello_extra_s = HELLO_EXTRA_S
    train_start_s = rates.train_start_s if rates.train_start_s is not None else TRAIN_START_S
    server_train_start_s = None
    if overheads is not None:
        hello_extra_s = overheads.hello_s - overheads.message_s
        train_start_s, server_train_start_s = overheads.train_start_s, overheads.server_train_start_s
        if message_overhead_s is None:
            message_overhead_s = overheads.message_s
    if message_overhead_s is None:
        start = rates.edge_start_s if rates.edge_start_s is not None else EDGE_START_S
        message_overhead_s = FLOWER_ROUTING_S + start
    return PlanInputs(
        strategy=cfg["strategy"], edges=edges, rates=rates, payloads=payloads(cfg, participants),
        edge_epochs=cfg["edge"]["epochs"], edge_batch_size=cfg["edge"]["batch_size"],
        server_epochs=cfg["server"]["epochs"], server_batch_size=cfg["server"]["batch_size"],
        server_train_samples=server_samples, full_test_samples=len(participants.server.test_data),
        eval_each_epoch=bool(cfg["eval_each_epoch"]), fedavg_rounds=cfg["fedavg"]["rounds"], upload_data=upload,
        warmup_epochs=cfg["warmup"]["epochs"] if warmup else 0,
        warmup_samples=(union if fraction >= 1.0 else max(1, round(union * fraction))) if warmup else 0,
        aggregate_forward_samples=forward, update_mode=cfg["update"]["mode"], update_epochs=cfg["update"]["epochs"],
        update_batch_size=cfg["update"]["batch_size"] or cfg["edge"]["batch_size"],
        message_overhead_s=message_overhead_s, hello_overhead_s=message_overhead_s + hello_extra_s,
        train_start_s=train_start_s, server_train_start_s=server_train_start_s,
        edge_start_s=rates.edge_start_s or 0.0, warm_clientapps=warm_clientapps)


# -- compute: measured here ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No per-epoch log lines from the calibration's short training runs."""
    logger = logging.getLogger("ecavg")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _train_s_per_sample(participants: Participants, settings: TrainingSettings, seconds: float) -> float:
    """Seconds per training sample of the configured model at ``settings.batch_size``, on the largest edge's data
    (its loader: normalisation and augmentation included)."""
    edge = max(participants.edges, key=lambda e: len(e.train_data))
    model = edge.new_model()
    loader = edge.factory.loader(edge.train_data, settings.batch_size, train=True, seed=0)
    one_epoch = replace(settings, epochs=1)
    with _quiet():
        first = train(model, _FirstBatches(loader, MIN_CALIBRATION_BATCHES), one_epoch, desc="calibration")[0]
        batch_s = first["seconds"] / max(1, len(_FirstBatches(loader, MIN_CALIBRATION_BATCHES)))
        timed = max(MIN_CALIBRATION_BATCHES, int(seconds / max(batch_s, 1e-6)))
        history = train(model, _FirstBatches(loader, timed), one_epoch, desc="calibration")
    return 1.0 / history[0]["samples_per_s"]


def calibrate(cfg: Mapping[str, Any], participants: Participants, *, data_dir: str | None = None,
              seconds: float | None = None) -> ComputeRates:
    """Compute rates measured now on this machine (the config's threads and device), timing each batch size's
    training for about ``seconds`` (default CALIBRATION_SECONDS), and an edge process's start."""
    seconds = CALIBRATION_SECONDS if seconds is None else seconds
    edge_settings = participants.edges[0].settings
    measured: dict[tuple[int, str], float] = {}

    def rate(settings: TrainingSettings) -> float:
        key = (settings.batch_size, settings.optimizer)
        if key not in measured:
            measured[key] = _train_s_per_sample(participants, settings, seconds)
        return measured[key]

    update_bs = cfg["update"]["batch_size"] or edge_settings.batch_size
    server = participants.server
    model = server.new_model()
    test_loader = server.factory.eval_loader(server.test_data)
    flip = server.factory.spec.test_flip  # test-time flips evaluate each sample twice
    evaluate(model, _FirstBatches(test_loader, 1), flip=flip)
    start = time.perf_counter()
    seen = evaluate(model, _FirstBatches(test_loader, EVAL_BATCHES), flip=flip)["samples"]
    eval_s = (time.perf_counter() - start) / seen
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    average_state_dicts([weights] * len(participants.edges), [len(e.train_data) for e in participants.edges])
    average_s = time.perf_counter() - start
    edge_start, train_start = edge_start_seconds(cfg, data_dir)
    return ComputeRates(edge_train_s=rate(edge_settings), server_train_s=rate(server.settings),
                        update_train_s=rate(replace(edge_settings, batch_size=update_bs)), eval_s=eval_s,
                        average_s=average_s, edge_start_s=edge_start, train_start_s=train_start)


# What a ClientApp process does before it can handle a message (``ecavg.runtime.flower.client``): start Python,
# import the client (PyTorch, Flower, ecavg), load the dataset and build the edge's partition.
# Then its first optimizer (which imports torch._dynamo), timed on its own.
_EDGE_START = """
import json, sys, time
import ecavg.runtime.flower.client
from ecavg.config import resolve_config
from ecavg.runtime.setup import build_participants, prepare_compute
cfg = resolve_config(json.loads(sys.argv[1]))
device, splits, _ = prepare_compute(cfg, sys.argv[2] or None)
model = build_participants(cfg, splits, device).edges[0].new_model()
start = time.perf_counter()
import torch
torch.optim.SGD(model.parameters(), lr=0.1)
print(json.dumps({"train_start_s": time.perf_counter() - start}))
"""


def edge_start_seconds(cfg: Mapping[str, Any], data_dir: str | None) -> tuple[float, float]:
    """(seconds to start an edge's process for one message, seconds of its first optimizer), timed now in a
    subprocess on this machine."""
    root = str(Path(ecavg.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _EDGE_START, json.dumps(cfg), data_dir or ""], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"ecavg plan could not time an edge process start: {last}")
    train_start = float(json.loads(done.stdout.strip().splitlines()[-1])["train_start_s"])
    return seconds - train_start, train_start


# -- compute: read from an earlier run ----------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--from {path.parent}: no {path.name} (is it an ecavg run directory?)") from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"--from {path.parent}: {path.name} is unreadable ({error})") from None


def run_config(run_dir: Path) -> dict[str, Any]:
    """The config an earlier run resolved (its config.json)."""
    saved = _read_json(run_dir / "config.json")
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise ConfigError(f"--from {run_dir}: config.json holds no run config")
    return saved["config"]


def rates_from_run(run_dir: Path, cfg: Mapping[str, Any]) -> ComputeRates:
    """Compute rates of an earlier run of the same model and dataset (embedded or deployed)."""
    used = run_config(run_dir)
    if used.get("model") != cfg["model"]:
        raise ConfigError(f"--from {run_dir}: that run trained another model ({used.get('model')} vs "
                          f"{cfg['model']}); its rates are per sample of its own model")
    if used.get("data", {}).get("dataset") != cfg["data"]["dataset"]:
        raise ConfigError(f"--from {run_dir}: that run used dataset {used.get('data', {}).get('dataset')!r}, the "
                          f"config {cfg['data']['dataset']!r}; its rates are per sample of its own images")
    results = _read_json(run_dir / "results.json")
    if not isinstance(results, dict) or not isinstance(results.get("edges", []), list):
        raise ConfigError(f"--from {run_dir}: results.json is not an ecavg run's results")
    records = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue

    def per_sample(participants: str, phases: tuple[str, ...]) -> float | None:
        rates = [1.0 / r["samples_per_s"] for r in records
                 if str(r.get("participant", "")).startswith(participants) and str(r.get("phase")).startswith(phases)
                 and isinstance(r.get("samples_per_s"), (int, float)) and r["samples_per_s"] > 0]
        return statistics.median(rates) if rates else None

    edge = per_sample("edge-", ("pretrain", "round"))
    server = per_sample("server", ("finetune", "centralized", "warmup"))
    if edge is None and server is None:
        raise ConfigError(f"--from {run_dir}: metrics.jsonl has no training epochs to take rates from; "
                          "use --calibrate")
    test = sum(int(e.get("test_samples") or 0) for e in results.get("edges", []) if isinstance(e, dict))
    timing = results.get("timing_s", {})
    aggregate = float(timing.get("aggregate") or 0.0)
    if aggregate <= 0 or test <= 0:
        raise ConfigError(f"--from {run_dir}: its results.json has no aggregate step to take the evaluation rate "
                          "from (an ECAvg run has one); use --calibrate")
    # The aggregate step is averaging plus one evaluation of the full test set; both are counted as evaluation.
    return ComputeRates(edge_train_s=edge or server, server_train_s=server or edge,  # type: ignore[arg-type]
                        update_train_s=per_sample("edge-", ("update-",)) or edge or server,  # type: ignore[arg-type]
                        eval_s=aggregate / test, average_s=0.0)


# -- Flower's overhead: fitted to a deployed run -----------------------------------------------------------


def run_conditions(results: Mapping[str, Any], num_edges: int) -> tuple[dict[int, int], dict[int, float]]:
    """The links (bits per second) and CPU shares a deployed run had, as ``deploy local`` recorded them."""
    deploy = results.get("deploy") or {}
    links: dict[int, int] = {}
    for name, link in ((deploy.get("links") or {}).get("edges") or {}).items():
        if isinstance(link, dict) and link.get("rate_bps"):
            links[int(name.removeprefix("edge-"))] = int(link["rate_bps"])
    shares = {int(name.removeprefix("edge-")): float(share) for name, share in (deploy.get("edge_cpu") or {}).items()}
    return ({k: v for k, v in links.items() if k < num_edges}, {k: v for k, v in shares.items() if k < num_edges})


def overheads_from_run(run_dir: Path, rates: ComputeRates, data_dir: str | None) -> Overheads | None:
    """Flower's overheads as a deployed run measured them, or None for a run that was not deployed.

    Each exchange's ``phase_wall_s`` minus what the time model gives it with no overhead (its compute at ``rates``
    and its transfers at that run's own links) is its overhead: the non-training exchanges after the first give
    ``message_s``, the first (hello) ``hello_s``, the training ones ``message_s + train_start_s``; the server's
    first training step (warm-up, fine-tuning) ``server_train_start_s``."""
    results = _read_json(run_dir / "results.json")
    if not isinstance(results, dict) or not (results.get("deploy") or {}).get("phase_wall_s"):
        return None
    measured = measured_phases(results)
    cfg = resolve_config(run_config(run_dir))
    links, shares = run_conditions(results, cfg["data"]["num_edges"])
    participants = setup(cfg, data_dir)
    # A warm ClientApp also waits for Flower to notice each download (``pull_wait_seconds``): the model's, not
    # message overhead.
    warm = (results.get("deploy") or {}).get("clientapp") == "warm"
    bare = replace(plan_inputs(cfg, participants, rates, data_dir=data_dir, links=links, cpu_shares=shares,
                               message_overhead_s=0.0, warm_clientapps=warm), hello_overhead_s=0.0,
                   train_start_s=0.0, server_train_start_s=0.0)
    planned = predict(bare)
    residual = {ph.phase: measured[ph.phase] - ph.total_s for ph in planned if ph.phase in measured}
    server_steps = [ph.phase for ph in planned if ph.phase in ("warmup", "finetune", "centralized")]
    server_start = max(0.0, residual[server_steps[0]]) if server_steps and server_steps[0] in residual else None
    for step in ("aggregate", *server_steps):
        residual.pop(step, None)
    trains = {"pretrain", *(p for p in residual if p.startswith("round"))}
    if bare.update_mode != "replace" and bare.update_epochs > 0 and bare.strategy != "centralized":
        trains.add("update")
    plain = [v for p, v in residual.items() if p != "hello" and p not in trains]
    trained = [v for p, v in residual.items() if p in trains]
    if "hello" not in residual or not plain:
        raise ConfigError(f"--from {run_dir}: its deploy.phase_wall_s lacks the hello or a message that does not "
                          "train (e.g. a replace update), which the overhead is fitted to; use --calibrate")
    message = max(0.0, statistics.mean(plain))
    return Overheads(message_s=message, hello_s=max(0.0, residual["hello"]),
                     train_start_s=max(0.0, statistics.mean(trained) - message) if trained else TRAIN_START_S,
                     server_train_start_s=server_start)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median_rates(rates: list[ComputeRates]) -> ComputeRates:
    """Each compute rate's median over several runs' (one run: its own)."""
    return ComputeRates(**{name: _median([getattr(r, name) for r in rates])
                           for name in ComputeRates.__dataclass_fields__})


def median_overheads(overheads: list[Overheads]) -> Overheads:
    """Each overhead's median over several deployed runs' fits."""
    return Overheads(**{name: _median([getattr(o, name) for o in overheads])
                        for name in Overheads.__dataclass_fields__})
