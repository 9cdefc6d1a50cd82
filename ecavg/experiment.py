"""``run_experiment``: one experiment from config to output directory, in the embedded runtime.

The CLI (``ecavg run``) and notebooks call this same function.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import torch

from ecavg.config import ConfigError, model_options, resolve_config
from ecavg.core.checkpoint import PhaseStore, write_text_atomic
from ecavg.core.participants import DataSpec, EdgeWorker, ModelFactory, ServerWorker, derive_seed, resolve_device
from ecavg.core.protocol import RunContext, run_strategy
from ecavg.core.training import TrainingSettings
from ecavg.data import DatasetSplits, ImageDataset, load_dataset, partition_indices, partition_test_like
from ecavg.report import build_results, write_outputs
from ecavg.runtime.embedded import EmbeddedEdgePool

log = logging.getLogger("ecavg")

RUN_CONFIG = "config.json"  # the resolved config and data dir, written when a run starts; --resume reads it


def augmentation(cfg: Mapping[str, Any], splits: DatasetSplits) -> tuple[int, bool]:
    """(crop padding, flip) for the configured augmentation; ``auto`` crops and flips colour images only
    (flipping digits changes what they are)."""
    mode = cfg["data"]["augment"]
    if mode == "auto":
        mode = "crop+flip" if splits.train.images.shape[1] == 3 else "none"
    size = splits.train.images.shape[-1]
    padding = max(1, size // 8) if "crop" in mode else 0
    return padding, "flip" in mode


def _train_subset(data: ImageDataset, fraction: float, seed: int) -> ImageDataset:
    """A seeded, class-stratified share of the training set (for quick runs)."""
    if fraction >= 1.0:
        return data
    g = torch.Generator().manual_seed(derive_seed(seed, "train-subset"))
    keep = []
    for c in range(data.num_classes):
        idx = (data.labels == c).nonzero().flatten()
        n = int(round(len(idx) * fraction))
        keep.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return data.subset(torch.cat(keep).sort().values)


def build_edges_and_server(cfg: dict[str, Any], splits: DatasetSplits, device: torch.device,
                           ) -> tuple[list[EdgeWorker], ImageDataset, ServerWorker]:
    """Partition the data and make the participants of one run (shared by every runtime)."""
    data_cfg = cfg["data"]
    train = _train_subset(splits.train, data_cfg["train_fraction"], cfg["seed"])
    parts = partition_indices(
        train.labels, data_cfg["num_edges"], data_cfg["partition"], seed=cfg["seed"],
        ratios=data_cfg["ratios"] or None, alpha=data_cfg["alpha"], labels_per_edge=data_cfg["labels_per_edge"],
    )
    test_parts = partition_test_like([train.labels[p] for p in parts], splits.test.labels, train.num_classes,
                                     seed=cfg["seed"])
    padding, flip = augmentation(cfg, splits)
    spec = DataSpec(
        num_classes=train.num_classes, in_channels=int(train.images.shape[1]), image_size=int(train.images.shape[-1]),
        mean=tuple(splits.mean), std=tuple(splits.std), crop_padding=padding, flip=flip,
    )
    factory = ModelFactory(cfg["model"]["name"], model_options(cfg), spec, device, pretrained=cfg["pretrained"])
    edge_settings = TrainingSettings.from_config(cfg["edge"])
    edges = [
        EdgeWorker(f"edge-{k}", k, train.subset(parts[k]), splits.test.subset(test_parts[k]), factory, edge_settings,
                   cfg["seed"], eval_each_epoch=cfg["eval_each_epoch"])
        for k in range(data_cfg["num_edges"])
    ]
    union = train.subset(torch.cat(parts).sort().values)
    server = ServerWorker(factory, TrainingSettings.from_config(cfg["server"]), splits.test, cfg["seed"],
                          eval_each_epoch=cfg["eval_each_epoch"])
    return edges, union, server


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


def _prepare_output(cfg: dict[str, Any], output_dir: Path | None, data_dir: str | None) -> Path:
    out = Path(output_dir) if output_dir is not None else default_output_dir(cfg)
    if (out / RUN_CONFIG).exists():
        raise ConfigError(f"{out} already holds a run; continue it with `ecavg run --resume {out}` "
                          "or choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / RUN_CONFIG, json.dumps({"config": cfg, "data_dir": data_dir}, indent=2))
    return out


def load_run_config(run_dir: str | Path) -> tuple[dict[str, Any], str | None]:
    path = Path(run_dir) / RUN_CONFIG
    if not path.exists():
        raise ConfigError(f"cannot resume {run_dir}: it has no {RUN_CONFIG} (is it an ecavg output directory?)")
    saved = json.loads(path.read_text())
    return resolve_config(saved["config"]), saved.get("data_dir")


def run_experiment(
    config: Mapping[str, Any] | None = None,
    *,
    data_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    resume: str | Path | None = None,
) -> dict[str, Any]:
    """Run one experiment in the embedded runtime and return its results dict (as written to results.json).

    ``config`` is a dict as read from a TOML file (missing keys take defaults). With ``resume``, the run in that
    directory continues from its last finished phase, with the config and data dir it started with.
    """
    if resume is not None:
        cfg, saved_data_dir = load_run_config(resume)
        data_dir = data_dir if data_dir is not None else saved_data_dir
        out = Path(resume)
        log.info("resuming %s", out)
    else:
        cfg = resolve_config(config)
        out = _prepare_output(cfg, Path(output_dir) if output_dir else None,
                              str(data_dir) if data_dir is not None else None)
    device, splits, load_s = prepare_compute(cfg, data_dir)
    edges, union, server = build_edges_and_server(cfg, splits, device)
    pool = EmbeddedEdgePool(edges, union)
    metrics_path = out / "metrics.jsonl"

    def emit(record: dict[str, Any]) -> None:
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    ctx = RunContext(cfg=cfg, pool=pool, server=server, store=PhaseStore(out / "checkpoints"), emit=emit)
    log.info("%s: %s, %d edges, %s on %s, output %s", cfg["strategy"], cfg["data"]["dataset"],
             cfg["data"]["num_edges"], cfg["model"]["name"], device, out)
    outcome = run_strategy(ctx)
    results = build_results(cfg, outcome, runtime="embedded", device=str(device), data_load_s=load_s)
    write_outputs(out, results, outcome)
    results["output_dir"] = str(out)
    return results
