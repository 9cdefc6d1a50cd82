"""Section ``scale``: one ECAvg run with K = 10, 100, 1,000 edges (full MNIST, MLP, 1 + 1 epochs, one thread).

Each K is one ``ecavg run`` in a fresh subprocess (``OMP_NUM_THREADS=1``), so that its peak resident memory is its
own: the kernel's ``ru_maxrss`` of that child alone (``os.wait4``). While it runs, a sampler thread reads every
0.2 s the size on disk of its ``checkpoints/`` (st_blocks, as ``du`` counts) and the proportional set size (PSS,
``/proc/<pid>/smaps_rollup``) summed over the child's process tree: the only memory figure that covers a Flower
simulation, whose edges run in Ray worker processes. Reported per K: wall time, peak RSS, peak tree PSS (sampled),
checkpoint disk at the end and its sampled peak, both also in models (``server.safetensors``'s size), and the
ratios to K = 10 measured in the same section run (the machine is shared; absolute figures move with its load).

The Flower simulation runtime (``--runtime flower-sim``, the deployment's code path with Ray actors as edges) is
measured the same way at the K values of ``--scale-sim-ks`` (default 10 and 100; empty: none).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from bench.common import REPO_ROOT, load_average, print_table

DEFAULT_KS = (10, 100, 1000)
DEFAULT_SIM_KS = (10, 100)
SAMPLE_S = 0.2


def run_command(k: int, data_dir: Path, out: Path, runtime: str, dataset: str = "mnist") -> list[str]:
    return [sys.executable, "-m", "ecavg.cli", "run", "--config", str(REPO_ROOT / "configs" / "quickstart.toml"),
            "--data-dir", str(data_dir), "--set", f"data.dataset={dataset}", "--set", f"data.num_edges={k}",
            "--set", "edge.epochs=1", "--set", "server.epochs=1", "--set", "threads=1", "--runtime", runtime,
            "--output", str(out), "--no-report"]


def disk_bytes(root: Path) -> int:
    """Bytes allocated on disk under ``root`` (what ``du`` reports), 0 when it does not exist yet."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:  # an atomic write's temporary file, renamed meanwhile
                pass
    return total


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_pss_bytes(pid: int) -> int:
    """Proportional set size of ``pid`` and all its descendants (shared pages counted once in all)."""
    tree, total, todo = _children(), 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(tree.get(current, []))
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def measure(k: int, data_dir: Path, workdir: Path, runtime: str = "embedded", dataset: str = "mnist") -> dict[str, Any]:
    """One run with ``k`` edges in a fresh subprocess (``dataset``: the smoke test's is ``mnist-sample``)."""
    out = workdir / f"{runtime}-k{k}"
    command = run_command(k, data_dir, out, runtime, dataset)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    load_before = load_average()
    started = time.perf_counter()
    log = (workdir / f"{runtime}-k{k}.log").open("w")
    child = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    peaks = {"disk": 0, "pss": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peaks["disk"] = max(peaks["disk"], disk_bytes(out / "checkpoints"))
            peaks["pss"] = max(peaks["pss"], tree_pss_bytes(child.pid))
            done.wait(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    log.close()
    code = os.waitstatus_to_exitcode(status)
    child.returncode = code  # reaped by wait4: keep Popen from waiting again
    result: dict[str, Any] = {"k": k, "runtime": runtime, "exit_code": code, "seconds": seconds,
                              "load_average_before": load_before, "load_average_after": load_average(),
                              "command": " ".join(["OMP_NUM_THREADS=1", "python", *command[1:]])}
    if code != 0:
        tail = (workdir / f"{runtime}-k{k}.log").read_text(errors="replace")[-2000:]
        return {**result, "error": tail}
    final_disk = disk_bytes(out / "checkpoints")
    model_bytes = (out / "server.safetensors").stat().st_size
    result.update({
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # this child's own high-water mark (Linux: KiB)
        "peak_tree_pss_bytes": peaks["pss"],
        "checkpoint_bytes": final_disk, "checkpoint_peak_bytes": max(peaks["disk"], final_disk),
        "model_bytes": model_bytes, "checkpoint_models": final_disk / model_bytes,
        "checkpoint_peak_models": max(peaks["disk"], final_disk) / model_bytes,
        "checkpoint_files": len(list((out / "checkpoints").iterdir())),
    })
    shutil.rmtree(out, ignore_errors=True)  # 1,000 edges' outputs are links to one file, but their names add up
    return result


def _ratios(rows: list[dict[str, Any]]) -> None:
    base = next((r for r in rows if r["k"] == min(x["k"] for x in rows) and "error" not in r), None)
    for row in rows:
        if base is None or "error" in row:
            continue
        row["peak_rss_over_smallest_k"] = row["peak_rss_bytes"] / base["peak_rss_bytes"]
        row["peak_tree_pss_over_smallest_k"] = (row["peak_tree_pss_bytes"] / base["peak_tree_pss_bytes"]
                                                if base["peak_tree_pss_bytes"] else None)
        row["seconds_over_smallest_k"] = row["seconds"] / base["seconds"]


def run(data_dir: Path, ks: Sequence[int] = DEFAULT_KS, sim_ks: Sequence[int] = DEFAULT_SIM_KS) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="ecavg-bench-scale-"))
    try:
        embedded = [measure(k, data_dir, workdir) for k in ks]
        simulation = [measure(k, data_dir, workdir, runtime="flower-sim") for k in sim_ks]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for rows in (embedded, simulation):
        _ratios(rows)
    mib = 2**20
    for title, rows in (("embedded", embedded), ("Flower simulation", simulation)):
        if not rows:
            continue
        print_table(
            f"Scale in edges, {title} (full MNIST, MLP, 1 + 1 epochs, threads 1)",
            ["K", "wall s", "peak RSS MiB", "RSS / K=min", "tree PSS MiB", "ckpt end MiB", "ckpt peak MiB",
             "ckpt peak, models", "load"],
            [[r["k"], r.get("seconds"), r.get("peak_rss_bytes", 0) / mib, r.get("peak_rss_over_smallest_k"),
              r.get("peak_tree_pss_bytes", 0) / mib, r.get("checkpoint_bytes", 0) / mib,
              r.get("checkpoint_peak_bytes", 0) / mib, r.get("checkpoint_peak_models"),
              r["load_average_after"]] if "error" not in r else [r["k"], "failed", r["error"][-200:], "", "", "", "",
                                                                 "", ""]
             for r in rows])
    ok = [r for r in embedded if "error" not in r]
    summary = {
        "embedded_peak_rss_ratio_largest_over_smallest_k": (ok[-1]["peak_rss_bytes"] / ok[0]["peak_rss_bytes"]
                                                            if len(ok) > 1 else None),
        "embedded_checkpoint_peak_models_max": max((r["checkpoint_peak_models"] for r in ok), default=None),
    }
    return {"config": "configs/quickstart.toml + data.dataset=mnist, edge.epochs=1, server.epochs=1, threads=1",
            "summary": summary, "embedded": embedded, "simulation": simulation}
