"""What every run leaves in its output directory: results.json, results.md, accuracy.png, weights."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from ecavg.core.records import KEPT_AT_EDGE, SAME_AS_SERVER, Outcome
from ecavg.core.serialization import save_state_dict
from ecavg.fileio import atomic_path, write_text_atomic
from ecavg.formatting import change_pp, percent
from ecavg.host import host_info

SCHEMA_VERSION = 1
# accuracy.png: its width in inches (1.2 per edge below this) and how many edges at most are named on its axis.
ACCURACY_PLOT_MAX_WIDTH_IN = 24.0
ACCURACY_PLOT_MAX_EDGE_LABELS = 20


def build_results(cfg: Mapping[str, Any], outcome: Outcome, *, runtime: str, device: str, data_load_s: float,
                  **extra: Any) -> dict[str, Any]:
    """The results.json document of one run (the contract in the README), whatever runtime made it."""
    return {
        "schema": SCHEMA_VERSION,
        "strategy": cfg["strategy"],
        "dataset": cfg["data"]["dataset"],
        "model": cfg["model"]["name"],
        "partition": cfg["data"]["partition"],
        "num_edges": cfg["data"]["num_edges"],
        **outcome.results,
        "runtime": runtime,
        "device": device,
        "data_load_s": round(data_load_s, 3),
        # The same config gives the same numbers only on the same kind of CPU with the same PyTorch (ecavg.host).
        "host": host_info(),
        **extra,
        "config": cfg,
    }


def results_table(results: Mapping[str, Any]) -> str:
    """A readable markdown summary of one results dict."""
    cfg = results.get("config", {})
    lines = [
        f"# {cfg.get('name') or 'ecavg run'}: {results['strategy']} on {results['dataset']} with {results['model']}",
        "",
        f"{results['num_edges']} edges, partition `{results['partition']}`, init `{cfg.get('init')}`"
        f"{'' if cfg.get('shared_init', True) else ' (independent per edge)'}, seed {cfg.get('seed')}, "
        f"edge epochs {cfg.get('edge', {}).get('epochs')}, server epochs {cfg.get('server', {}).get('epochs')}"
        f"{', fedavg rounds ' + str(cfg.get('fedavg', {}).get('rounds')) if results['strategy'] == 'fedavg' else ''}.",
        "",
        "| participant | train samples | test samples | accuracy before | accuracy after | change |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    # Modes other than the paper's replace say which model each edge kept and how it does on the full test set.
    mode = cfg.get("update", {}).get("mode", "replace")
    if mode != "replace":
        lines[-2] += " kept | after, full test set |"
        lines[-1] += "---|---:|"
        lines[2] = lines[2][:-1] + f", update `{mode}`."
    for e in results["edges"]:
        row = (f"| {e['name']} | {e['train_samples']} | {e['test_samples']} | {percent(e['accuracy_before'], '%')} | "
               f"{percent(e['accuracy_after'], '%')} | {change_pp(e['accuracy_after'], e['accuracy_before'])} |")
        if mode != "replace":
            row += f" {e.get('update_kept') or '-'} | {percent(e.get('accuracy_after_full'), '%')} |"
        lines.append(row)
    s = results["server"]
    lines += [
        "",
        "| server (full test set) | accuracy |",
        "|---|---:|",
        f"| averaged weights | {percent(s.get('accuracy_averaged'), '%')} |",
    ]
    if "accuracy_averaged_before_bn_recalibration" in s:
        before = percent(s["accuracy_averaged_before_bn_recalibration"], "%")
        lines.append(f"| averaged, before BatchNorm recalibration | {before} |")
    if s.get("accuracy_ensemble") is not None:
        lines.append(f"| edges' ensemble (distillation teacher) | {percent(s['accuracy_ensemble'], '%')} |")
    lines.append(f"| fine-tuned / trained | {percent(s.get('accuracy_finetuned'), '%')} |")
    t, b = results["timing_s"], results["bytes"]
    lines += [
        "",
        "Time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()) + ".",
        f"Bytes: uplink {b['uplink']:,}, downlink {b['downlink']:,}.",
    ]
    return "\n".join(lines) + "\n"


def plot_accuracy(results: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, before, after = [], [], []
    for e in results["edges"]:
        labels.append(e["name"])
        before.append(e["accuracy_before"])
        after.append(e["accuracy_after"])
    s = results["server"]
    # 1.2 inches per edge up to ACCURACY_PLOT_MAX_WIDTH_IN: uncapped, 1,000 edges drew a 132,000-pixel-wide
    # figure whose rendering alone took ~450 MB, a third of the run's peak memory.
    fig, ax = plt.subplots(figsize=(min(ACCURACY_PLOT_MAX_WIDTH_IN, max(5.0, 1.2 * (len(labels) + 2))), 3.6))
    xs = list(range(len(labels)))
    width = 0.38
    ax.bar([x - width / 2 for x in xs], [100 * (v or 0) for v in before], width, label="edge before update",
           color="#9ecae1")
    ax.bar([x + width / 2 for x in xs], [100 * (v or 0) for v in after], width, label="edge after update",
           color="#3182bd")
    sx = len(labels)
    ax.bar([sx - width / 2], [100 * (s.get("accuracy_averaged") or 0)], width, label="server averaged", color="#fdae6b")
    ax.bar([sx + width / 2], [100 * (s.get("accuracy_finetuned") or 0)], width, label="server fine-tuned",
           color="#e6550d")
    step = max(1, math.ceil(len(labels) / ACCURACY_PLOT_MAX_EDGE_LABELS))  # every step-th edge named
    ax.set_xticks(xs[::step] + [sx], labels[::step] + ["server"])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{results['strategy']}: {results['dataset']} / {results['model']}")
    # Below the axes, so that it never hides a bar.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4, frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Edges whose final weights equal the server's get a hard link, not a second copy of the bytes."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_outputs(out_dir: Path, results: Mapping[str, Any], outcome: Outcome) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    server_path = out_dir / "server.safetensors"
    if outcome.server_weights is not None:
        save_state_dict(server_path, outcome.server_weights)
    for name, weights in outcome.edge_weights.items():
        path = out_dir / f"{name}.safetensors"
        if weights is KEPT_AT_EDGE:  # a deployed edge's own final model stays on the edge
            path.unlink(missing_ok=True)
        elif weights is SAME_AS_SERVER:
            _link_or_copy(server_path, path)
        else:
            save_state_dict(path, weights)
    write_text_atomic(out_dir / "results.md", results_table(results))
    plot_accuracy(results, out_dir / "accuracy.png")
    # Last: results.json says the run is finished (sweeps read it back, `deploy local` stops the processes).
    write_results(out_dir, results)


def write_results(out_dir: Path, results: Mapping[str, Any]) -> None:
    """results.json, atomically (a reader sees the old document or the whole new one)."""
    write_text_atomic(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
