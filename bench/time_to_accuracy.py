"""Section ``time-to-accuracy``: the wall time of a whole ECAvg run of ``configs/fast/<task>.toml`` until every
edge's after-update accuracy reaches the paper's figure, and the centralized baseline with the same recipe.

Each run is one ``ecavg run`` in a fresh subprocess (Python start, imports and the dataset's load included: what a
user waits for), nothing else meant to be on the machine. The after-update accuracy exists only when a run ends,
so a run's time to the paper's figure is its whole wall time when every edge reaches it, and "not reached"
otherwise. The centralized baseline (``--set strategy=centralized``: the server trains from the same start with the
same recipe, no edge pre-training, then every edge evaluates the server's model) is judged the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from bench.common import REPO_ROOT, load_average, now_iso, print_table
from ecavg.host import host_info

# The paper's after-update edge accuracy per task, and the wall-time goal on the 2-core CPU.
TARGETS = {"cifar10_mobilenetv2": (0.8116, 12 * 60), "cifar100_resnet50": (0.5156, 40 * 60)}
DEFAULT_TASKS = ("cifar10_mobilenetv2",)
STRATEGIES = ("ecavg", "centralized")


def run_command(task: str, strategy: str, data_dir: Path, out: Path, config_dir: Path) -> list[str]:
    return [sys.executable, "-m", "ecavg.cli", "run", "--config", str(config_dir / f"{task}.toml"),
            "--data-dir", str(data_dir), "--set", f"strategy={strategy}", "--output", str(out), "--no-report"]


def measure(task: str, strategy: str, data_dir: Path, out: Path, config_dir: Path) -> dict[str, Any]:
    """One run in a fresh subprocess; its wall time, its edges' after-update accuracies, and whether every edge
    reached the task's target."""
    target, goal_s = TARGETS[task]
    command = run_command(task, strategy, data_dir, out, config_dir)
    load_before = load_average()
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    row: dict[str, Any] = {"task": task, "strategy": strategy, "measured_at": now_iso(), "machine": host_info(),
                           "exit_code": done.returncode, "seconds": seconds,
                           "load_average_before": load_before, "load_average_after": load_average(),
                           "command": " ".join(["python", *command[1:]]), "target": target, "goal_seconds": goal_s}
    if done.returncode != 0:
        return {**row, "error": (done.stdout + done.stderr)[-2000:]}
    return {**row, **judge(json.loads((out / "results.json").read_text()), seconds, target, goal_s),
            "server_samples_per_s": server_rate(out / "metrics.jsonl")}


def server_rate(metrics: Path) -> float | None:
    """The median training samples/s of the run's server epochs: the machine's speed on this task, so that wall
    times measured on different machines can be compared (MobileNetV2 on CIFAR-10: 540 samples/s on a 2-core
    AVX2 host, 1,782 on the AVX-512 one of the paper run)."""
    rates = [record["samples_per_s"] for record in map(json.loads, metrics.read_text().splitlines())
             if record.get("participant") == "server" and "samples_per_s" in record]
    return statistics.median(rates) if rates else None


def judge(results: dict[str, Any], seconds: float, target: float, goal_s: float) -> dict[str, Any]:
    """A finished run (its results.json) against the target: reached when its worst edge is at or above it."""
    after = [edge["accuracy_after"] for edge in results["edges"]]
    reached = min(after) >= target
    return {
        "edges_accuracy_after": after, "worst_edge_accuracy_after": min(after),
        "mean_edge_accuracy_after": sum(after) / len(after),
        "server_accuracy_finetuned": results["server"].get("accuracy_finetuned"),
        "timing_s": results["timing_s"], "data_load_s": results.get("data_load_s"),
        "reached": reached, "seconds_to_target": seconds if reached else None,
        "within_goal": reached and seconds <= goal_s,
    }


def run(data_dir: Path, tasks: Sequence[str] = DEFAULT_TASKS, *, keep_runs: Path | None = None,
        config_dir: Path = REPO_ROOT / "configs" / "fast") -> dict[str, Any]:
    """Each task's fast config as ECAvg, then as the centralized baseline. ``keep_runs``: keep the run
    directories as ``<keep_runs>/<task>/fast/strategy=<strategy>`` (the layout of the paper runs in results/)."""
    unknown = [t for t in tasks if t not in TARGETS]
    if unknown:
        raise SystemExit(f"time-to-accuracy: unknown task(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    workdir = Path(tempfile.mkdtemp(prefix="ecavg-bench-tta-"))
    rows = []
    try:
        for task in tasks:
            for strategy in STRATEGIES:
                base = workdir if keep_runs is None else keep_runs / task / "fast"
                out = base / f"strategy={strategy}"
                if out.exists():
                    raise SystemExit(f"time-to-accuracy: {out} already exists; move it away to measure again")
                rows.append(measure(task, strategy, data_dir, out, config_dir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(
        "Time to the paper's after-update accuracy (fresh process per run, whole wall time)",
        ["task", "strategy", "wall s", "worst edge", "mean edge", "target", "reached", "within goal", "load"],
        [[r["task"], r["strategy"], r["seconds"], r.get("worst_edge_accuracy_after"),
          r.get("mean_edge_accuracy_after"), r["target"], r.get("reached"), r.get("within_goal"),
          r["load_average_after"]] for r in rows])
    summary = {}
    for task in tasks:
        by = {r["strategy"]: r for r in rows if r["task"] == task}
        ecavg, central = by["ecavg"], by["centralized"]
        summary[task] = {
            "ecavg_seconds": ecavg["seconds"], "ecavg_reached": ecavg.get("reached"),
            "ecavg_worst_edge": ecavg.get("worst_edge_accuracy_after"), "ecavg_within_goal": ecavg.get("within_goal"),
            "centralized_seconds": central["seconds"], "centralized_reached": central.get("reached"),
            "centralized_worst_edge": central.get("worst_edge_accuracy_after"),
            "ecavg_over_centralized_seconds": ecavg["seconds"] / central["seconds"],
        }
    return {"configs": {t: f"configs/fast/{t}.toml" for t in tasks}, "summary": summary, "runs": rows}


def keep_other_tasks(body: dict[str, Any], earlier: dict[str, Any] | None) -> dict[str, Any]:
    """``body`` with the tasks that an earlier run of this section measured and this one did not (a task's runs
    take from twenty minutes to hours, so they are measured one task at a time). Each run row says when and on
    which machine it was measured; rows of earlier runs that predate those fields get the earlier section's."""
    if not earlier:
        return body
    measured = set(body["summary"])
    stamp = {"measured_at": earlier.get("measured_at"), "machine": earlier.get("machine")}
    kept_runs = [{**stamp, **row} for row in earlier.get("runs", []) if row.get("task") not in measured]
    return {
        **body,
        "configs": {**{t: c for t, c in earlier.get("configs", {}).items() if t not in measured}, **body["configs"]},
        "summary": {**{t: v for t, v in earlier.get("summary", {}).items() if t not in measured}, **body["summary"]},
        "runs": kept_runs + body["runs"],
    }
