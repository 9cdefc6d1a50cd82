"""Everything a run needs before and after its strategy, the same for both runtimes.

``prepare_compute`` (threads, device, dataset), ``build_participants`` (the partition and the edge and server
workers), ``RunDirectory`` (the output directory: checked before anything is written, ``config.json``,
``metrics.jsonl``, checkpoints, ``failure.json``) and ``execute`` (run the strategy, write the results). The
embedded driver (``ecavg.experiment``) and the Flower ServerApp (``ecavg.runtime.flower.server``) differ only in
their ``EdgePool``; a Flower edge calls ``build_participants`` to hold exactly the partition the embedded runtime
gives it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ecavg.config import model_options, resolve_config
from ecavg.core.checkpoint import PhaseStore
from ecavg.core.participants import DataSpec, EdgeWorker, ModelFactory, ServerWorker, derive_seed, resolve_device
from ecavg.core.phases import RunContext
from ecavg.core.pool import EdgePool
from ecavg.core.strategies import run_strategy
from ecavg.core.training import TrainingSettings
from ecavg.core.update import make_update_mode, validation_split
from ecavg.data import (
    DatasetSplits,
    ImageDataset,
    load_dataset,
    partition_indices,
    partition_test_like,
    stratified_share,
)
from ecavg.errors import ConfigError
from ecavg.fileio import write_text_atomic
from ecavg.report import build_results, write_outputs
from ecavg.tracking import make_tracker

log = logging.getLogger("ecavg")

RUN_CONFIG = "config.json"  # the resolved config and data dir, written when a run starts; --resume reads it
FAILURE_FILE = "failure.json"
# metrics.jsonl phases that are checkpointed under another name (see ecavg.core.phases).
_STORED_AS = {"aggregate": "averaged", "warmup": "init"}
# What may already be in a directory that --output names without it being a run: nothing else is overwritten.
_HARMLESS = {".DS_Store"}


def augmentation(cfg: Mapping[str, Any], splits: DatasetSplits) -> tuple[int, bool]:
    """(crop padding, flip) for the configured augmentation; ``auto`` crops and flips colour images only
    (flipping digits changes what they are)."""
    mode = cfg["data"]["augment"]
    if mode == "auto":
        mode = "crop+flip" if splits.train.images.shape[1] == 3 else "none"
    size = splits.train.images.shape[-1]
    padding = max(1, size // 8) if "crop" in mode else 0
    return padding, "flip" in mode


def train_subset(data: ImageDataset, fraction: float, seed: int) -> ImageDataset:
    """A seeded, class-stratified share of the training set (``data.train_fraction``, for quick runs)."""
    if fraction >= 1.0:
        return data
    g = torch.Generator().manual_seed(derive_seed(seed, "train-subset"))
    return data.subset(stratified_share(data.labels, data.num_classes, fraction, g).sort().values)


def server_share(edge_train: ImageDataset, fraction: float, seed: int, edge_name: str) -> torch.Tensor:
    """Positions (in the edge's training set) of the samples the edge gives the server: a seeded,
    class-stratified ``server_data_fraction`` of them. The embedded union and a deployed edge's upload use this
    same function, so both runtimes fine-tune on the same samples."""
    if fraction >= 1.0:
        return torch.arange(len(edge_train))
    g = torch.Generator().manual_seed(derive_seed(seed, "server-share", edge_name))
    return stratified_share(edge_train.labels, edge_train.num_classes, fraction, g).sort().values


@dataclass
class Participants:
    edges: list[EdgeWorker]
    union: ImageDataset  # the edges' training data together, in the training set's order
    server: ServerWorker
    positions: list[torch.Tensor]  # per edge, its samples' positions in the (train_fraction) training set


def build_participants(cfg: dict[str, Any], splits: DatasetSplits, device: torch.device) -> Participants:
    """Partition the data and make the participants of one run (the same in every runtime)."""
    data_cfg = cfg["data"]
    train = train_subset(splits.train, data_cfg["train_fraction"], cfg["seed"])
    scheme = f"data.partition = \"{data_cfg['partition']}\""
    try:
        parts = partition_indices(
            train.labels, data_cfg["num_edges"], data_cfg["partition"], seed=cfg["seed"],
            ratios=data_cfg["ratios"] or None, alpha=data_cfg["alpha"], labels_per_edge=data_cfg["labels_per_edge"],
        )
    except ValueError as error:
        raise ConfigError(f"{scheme} cannot split {len(train)} training samples of {data_cfg['dataset']} "
                          f"among {data_cfg['num_edges']} edges: {error}") from None
    test_parts = partition_test_like([train.labels[p] for p in parts], splits.test.labels, train.num_classes,
                                     seed=cfg["seed"])
    # An edge without training or test samples would fail only when its turn comes, after others trained.
    for k, (part, test_part) in enumerate(zip(parts, test_parts)):
        if len(part) == 0 or len(test_part) == 0:
            what = "training" if len(part) == 0 else "test"
            raise ConfigError(f"{scheme} leaves edge-{k} with no {what} samples ({len(part)} training, "
                              f"{len(test_part)} test); use fewer edges, a larger data.train_fraction, or a less "
                              f"skewed split (data.alpha, data.ratios, data.labels_per_edge)")
    padding, flip = augmentation(cfg, splits)
    spec = DataSpec(
        num_classes=train.num_classes, in_channels=int(train.images.shape[1]), image_size=int(train.images.shape[-1]),
        mean=tuple(splits.mean), std=tuple(splits.std), crop_padding=padding, flip=flip,
        test_flip=data_cfg["test_augment"] == "flip",
    )
    factory = ModelFactory(cfg["model"]["name"], model_options(cfg), spec, device, pretrained=cfg["pretrained"])
    update_mode = make_update_mode(cfg)
    if update_mode.uses_keep_local:  # a model without the parts update.keep_local names fails before anything runs
        update_mode.check_model(factory.build(derive_seed(cfg["seed"], "init", "server")), cfg["model"]["name"])
    edge_settings = TrainingSettings.from_config(cfg["edge"])
    edges = []
    for k in range(data_cfg["num_edges"]):
        validation = None
        if update_mode.holds_out_validation:
            # Held out before anything trains: neither the edge's pre-training nor the server's union sees it.
            rest, held = validation_split(train.subset(parts[k]), cfg["update"]["validation_fraction"], cfg["seed"],
                                          f"edge-{k}")
            if len(rest) == 0:
                raise ConfigError(f"config key 'update.validation_fraction' leaves edge-{k} no training samples of its "
                                  f"{len(parts[k])}; use a smaller fraction or fewer edges")
            validation = train.subset(parts[k][held])
            parts[k] = parts[k][rest]
        edges.append(EdgeWorker(f"edge-{k}", k, train.subset(parts[k]), splits.test.subset(test_parts[k]), factory,
                                edge_settings, cfg["seed"], eval_each_epoch=cfg["eval_each_epoch"],
                                validation_data=validation, full_test_data=splits.test, update_mode=update_mode))
    fraction = cfg["server_data_fraction"]
    shared = [part[server_share(edge.train_data, fraction, cfg["seed"], edge.name)] for part, edge in zip(parts, edges)]
    union = train.subset(torch.cat(shared).sort().values)
    server = ServerWorker(factory, TrainingSettings.from_config(cfg["server"]), splits.test, cfg["seed"],
                          eval_each_epoch=cfg["eval_each_epoch"])
    return Participants(edges, union, server, list(parts))


def prepare_compute(cfg: Mapping[str, Any], data_dir: str | Path | None) -> tuple[torch.device, DatasetSplits, float]:
    """Thread count, device and the run's dataset (with its load time in seconds), as every runtime needs them."""
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    device = resolve_device(cfg["device"])
    started = time.perf_counter()
    splits = load_dataset(cfg["data"]["dataset"], data_dir, download=cfg["data"]["download"])
    return device, splits, time.perf_counter() - started


def default_output_dir(cfg: Mapping[str, Any]) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = cfg.get("name") or f"{cfg['strategy']}-{cfg['data']['dataset']}-{cfg['model']['name']}"
    return Path("runs") / f"{name.replace('/', '_').replace(':', '_')}-{stamp}"


class RunDirectory:
    """One run's output directory.

    A new run's directory is checked first (``for_new_run``: nothing written), and created only when the run
    starts (``start``), after its config, data and model have been checked, so a bad command leaves nothing
    behind and the corrected command is not refused.
    """

    def __init__(self, path: str | Path, *, resumed: bool = False):
        self.path = Path(path)
        self.resumed = resumed
        self._store: PhaseStore | None = None
        self._followers: list[Callable[[Mapping[str, Any]], None]] = []

    @classmethod
    def for_new_run(cls, path: str | Path, *, may_hold: frozenset[str] = frozenset()) -> RunDirectory:
        """``may_hold``: names that may already be there (a deployment's own ``logs/`` and ``deploy/``)."""
        out = Path(path)
        if (out / RUN_CONFIG).exists():
            raise ConfigError(f"{out} already holds a run; continue it with `ecavg run --resume {out}` "
                              "or choose another --output")
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--output {out} is a file, not a directory; choose another --output")
        if out.is_dir() and any(p.name not in _HARMLESS | may_hold for p in out.iterdir()):
            raise ConfigError(f"--output {out} is not empty and holds no run; choose an empty or new directory")
        parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
        if not parent.is_dir() or not _writable(parent):
            raise ConfigError(f"--output {out} cannot be created: {parent} is not a writable directory")
        return cls(out)

    @classmethod
    def for_resume(cls, path: str | Path) -> tuple[RunDirectory, dict[str, Any], str | None]:
        """The directory of an interrupted run, with the config and data dir it started with."""
        config_path = Path(path) / RUN_CONFIG
        if not config_path.is_file():
            raise ConfigError(f"cannot resume {path}: it has no {RUN_CONFIG} (is it an ecavg output directory?)")
        try:
            saved = json.loads(config_path.read_text())
            cfg = resolve_config(saved["config"])
            data_dir = saved.get("data_dir")
        except ConfigError as error:
            raise ConfigError(f"cannot resume {path}: its {RUN_CONFIG} holds a config that is no longer valid "
                              f"({error})") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"cannot resume {path}: its {RUN_CONFIG} is unreadable or corrupt "
                              f"({type(error).__name__}: {error})") from None
        if data_dir is not None and not isinstance(data_dir, str):
            raise ConfigError(f"cannot resume {path}: its {RUN_CONFIG} has a data_dir that is not a string")
        return cls(path, resumed=True), cfg, data_dir

    def start(self, cfg: Mapping[str, Any], data_dir: str | None) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path / RUN_CONFIG, json.dumps({"config": cfg, "data_dir": data_dir}, indent=2))
        except OSError as error:
            raise ConfigError(f"--output {self.path} cannot be written: {error.strerror or error}") from None

    @property
    def store(self) -> PhaseStore:
        if self._store is None:
            self._store = PhaseStore(self.path / "checkpoints")
        return self._store

    def prune_metrics(self) -> None:
        """Before a resume: drop the metrics.jsonl records of phases that did not finish (they run again and
        write their records again), so no epoch is listed twice."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        streamed: dict[str, set[str]] = {}  # per phase, the edges its running checkpoint holds
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                phase = _STORED_AS.get(record["phase"], record["phase"])
                if phase not in streamed:
                    running = self.store.load_running(phase, with_tensors=False)
                    streamed[phase] = set(running[0]["records"]) if running is not None else set()
                finished = (self.store.has(phase) or self.store.has(f"{phase}/{record['participant']}")
                            or record["participant"] in streamed[phase])
            except (ValueError, KeyError, TypeError):
                finished = False  # a line cut short by the interruption
            if finished:
                kept.append(line + "\n")
        write_text_atomic(path, "".join(kept))

    def emit(self, record: Mapping[str, Any]) -> None:
        """One metrics.jsonl line (a participant's epoch or phase figures), then passed to each follower."""
        with (self.path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        for follower in self._followers:
            follower(record)

    def follow(self, follower: Callable[[Mapping[str, Any]], None]) -> None:
        """``follower(record)`` is called with every record emitted from now on (a live tracker)."""
        self._followers.append(follower)

    def records(self) -> list[dict[str, Any]]:
        """The records metrics.jsonl holds (a resumed run's finished phases, after ``prune_metrics``)."""
        path = self.path / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def write_failure(self, error: BaseException, **details: Any) -> None:
        write_text_atomic(self.path / FAILURE_FILE, json.dumps({
            "error": f"{type(error).__name__}: {error}",
            **details,
            "note": "finished phases are kept in checkpoints/; continue with `ecavg run --resume` (embedded) or "
                    "submit the run again",
        }, indent=2) + "\n")


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK | os.X_OK)


def execute(cfg: dict[str, Any], pool: EdgePool, server: ServerWorker, run_dir: RunDirectory, *, runtime: str,
            device: torch.device, load_s: float,
            failure_details: Callable[[], dict[str, Any]] = dict,
            extra_results: Callable[[], dict[str, Any]] = dict) -> dict[str, Any]:
    """Run the configured strategy against ``pool`` and write the run's outputs; returns the results dict.

    A failure writes ``failure.json`` (what happened, plus ``failure_details()``) and is raised again. The
    configured tracker (``tracking.backend``) follows every record ``run_dir`` emits; a resumed run's finished
    phases are replayed to it first.
    """
    tracker = make_tracker(cfg)
    tracker.start(cfg, run_dir.path, resumed=run_dir.resumed)
    for record in run_dir.records():
        tracker.log(record)
    run_dir.follow(tracker.log)
    ctx = RunContext(cfg=cfg, pool=pool, server=server, store=run_dir.store, emit=run_dir.emit)
    try:
        outcome = run_strategy(ctx)
    except KeyboardInterrupt:
        tracker.fail("KILLED")
        raise
    except Exception as error:
        run_dir.write_failure(error, **failure_details())
        tracker.fail("FAILED")
        log.error("run failed: %s", error)
        raise
    results = build_results(cfg, outcome, runtime=runtime, device=str(device), data_load_s=load_s,
                            **extra_results())
    write_outputs(run_dir.path, results, outcome)
    tracker.finish(results)
    (run_dir.path / FAILURE_FILE).unlink(missing_ok=True)
    results["output_dir"] = str(run_dir.path)
    return results
