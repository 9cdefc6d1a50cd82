"""Config search for the end-to-end target: which ECAvg configs reach 81.16% after-update edge accuracy.

Accuracy does not depend on the machine (the same seeds give statistically the same training), so candidates may be
screened wherever it is quickest, an accelerator included (``--device cuda``), and only the chosen config timed on
the CPU (``bench/run.py --e2e``). Each candidate runs ``run_experiment`` in its own process; ``--parallel`` of them
at a time.

    python -m bench.tune --data-dir /work/shared/datasets --device cpu --candidates paper,long
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, print_table

BASE: dict[str, Any] = {
    "strategy": "ecavg", "seed": 0, "init": "random", "shared_init": True, "eval_each_epoch": False,
    "data": {"dataset": "cifar10", "partition": "iid", "num_edges": 2},
    "model": {"name": "mobilenet_v2"},
    "edge": {"epochs": 5, "batch_size": 128, "lr": 0.1, "label_smoothing": 0.1},
    "server": {"epochs": 10, "batch_size": 128, "lr": 0.1, "label_smoothing": 0.1},
}


def _variant(edge_epochs: int, server_epochs: int, *, model: dict | None = None, batch: int = 128,
             lr: float = 0.1, label_smoothing: float = 0.1, weight_decay: float = 5e-4,
             **top_level: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(BASE)
    cfg.update(copy.deepcopy(top_level))
    if model:
        cfg["model"].update(model)
    for section, epochs in (("edge", edge_epochs), ("server", server_epochs)):
        cfg[section].update({"epochs": epochs, "batch_size": batch, "lr": lr, "label_smoothing": label_smoothing,
                             "weight_decay": weight_decay})
    return cfg


# Cost on the CPU in 50,000-sample passes: edge epochs + server epochs (x ~4 with the stride-1 CIFAR stem).
CANDIDATES: dict[str, dict[str, Any]] = {
    "paper": _variant(5, 10),
    "e5s15": _variant(5, 15),
    "e8s16": _variant(8, 16),
    "e5s20": _variant(5, 20),
    "e10s20": _variant(10, 20),
    "e8s16-b256": _variant(8, 16, batch=256, lr=0.2),
    "stem-e2s4": _variant(2, 4, model={"cifar_stem": True}),
    "stem-e3s5": _variant(3, 5, model={"cifar_stem": True}),
    "stem-e3s6-b256": _variant(3, 6, model={"cifar_stem": True}, batch=256, lr=0.2),
    # Second round: larger batches (faster on the CPU), longer server phases, averaging made to work.
    "b256-e5s25": _variant(5, 25, batch=256, lr=0.2),
    "b256-e8s22": _variant(8, 22, batch=256, lr=0.2),
    "b256-e5s30": _variant(5, 30, batch=256, lr=0.2),
    "b256-e10s20-bnr": _variant(10, 20, batch=256, lr=0.2, bn_recalibration=True),
    "b256-warm2-e8s14-bnr": _variant(8, 14, batch=256, lr=0.2, bn_recalibration=True, init="warmup",
                                     warmup={"epochs": 2, "data_fraction": 1.0}),
    "b256-e8s20-nodrop": _variant(8, 20, batch=256, lr=0.2, model={"dropout": 0.0}),
    "b256-e8s16-ls0": _variant(8, 16, batch=256, lr=0.2, label_smoothing=0.0),
    "b512-e8s20": _variant(8, 20, batch=512, lr=0.4),
    "b512-e10s25": _variant(10, 25, batch=512, lr=0.4),
    # Third round: fewer passes (24-25), so that the CPU run fits in 30 minutes.
    "b256-e2s22-nodrop": _variant(2, 22, batch=256, lr=0.2, model={"dropout": 0.0}),
    "b256-e3s22-nodrop": _variant(3, 22, batch=256, lr=0.2, model={"dropout": 0.0}),
    "b256-e5s20-nodrop": _variant(5, 20, batch=256, lr=0.2, model={"dropout": 0.0}),
    "b256-e3s22": _variant(3, 22, batch=256, lr=0.2),
}


def run_one(name: str, config: dict[str, Any], data_dir: str, out_dir: Path, device: str) -> dict[str, Any]:
    import logging

    from ecavg.experiment import run_experiment

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(message)s")
    cfg = {**copy.deepcopy(config), "device": device}
    started = time.perf_counter()
    results = run_experiment(cfg, data_dir=data_dir, output_dir=out_dir / name)
    edges = results["edges"]
    summary = {
        "name": name, "seconds": time.perf_counter() - started, "timing_s": results["timing_s"],
        "edges_before": [e["accuracy_before"] for e in edges], "edges_after": [e["accuracy_after"] for e in edges],
        "averaged": results["server"]["accuracy_averaged"], "server": results["server"]["accuracy_finetuned"],
        "config": config, "device": device,
    }
    (out_dir / f"{name}.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "tune")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one candidate in this process
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        run_one(args.one, CANDIDATES[args.one], args.data_dir, args.out, args.device)
        return
    # Decode the dataset once before the candidates start, so they share the cache instead of racing to fill it.
    from ecavg.data import load_dataset

    load_dataset(BASE["data"]["dataset"], args.data_dir)
    names = [n for n in args.candidates.split(",") if n]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    pending, running = list(names), []
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            log = (args.out / f"{name}.log").open("w")
            running.append((name, subprocess.Popen(
                [sys.executable, "-m", "bench.tune", "--one", name, "--data-dir", args.data_dir, "--device",
                 args.device, "--out", str(args.out)], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(2)
        running = [(n, p) for n, p in running if p.poll() is None]
    rows = []
    for name in names:
        path = args.out / f"{name}.json"
        if not path.exists():
            rows.append([name, None, None, None, None, "failed: see log"])
            continue
        r = json.loads(path.read_text())
        rows.append([name, r["seconds"], sum(r["edges_before"]) / 2, r["averaged"], r["server"],
                     sum(r["edges_after"]) / 2])
    print_table(f"Config search ({args.device})", ["candidate", "seconds", "edges before", "averaged", "server",
                                                   "edges after"], rows)


if __name__ == "__main__":
    main()
