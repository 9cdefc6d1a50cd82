"""``ecavg sweep``: run a grid of experiments from one config and collect them in one table and one plot.

Each grid point is an ordinary run in its own sub-directory, so an interrupted sweep continues where it
stopped (finished points are read back, unfinished ones resumed). When ``seed`` is one of the grid keys, the
table gives the mean and spread over seeds of each remaining grid point.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from ecavg.config import ConfigError, apply_overrides, parse_override, resolve_config
from ecavg.experiment import run_experiment
from ecavg.fileio import atomic_path, write_text_atomic
from ecavg.formatting import mean_std, percent
from ecavg.runtime.setup import RUN_CONFIG
from ecavg.tracking import require_backend

log = logging.getLogger("ecavg")

METRICS = ("edge_before", "edge_after", "server_averaged", "server_finetuned", "total_s")
METRIC_TITLES = {
    "edge_before": "edge acc. before",
    "edge_after": "edge acc. after",
    "server_averaged": "server averaged",
    "server_finetuned": "server fine-tuned",
    "total_s": "time (s)",
}


def split_values(text: str) -> list[str]:
    """Split ``a,b,[1, 2],"x,y"`` on the commas that are not inside brackets or quotes."""
    parts, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    if any(not p for p in parts):
        raise ConfigError(f"--grid has an empty value in {text!r}")
    return parts


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["data.alpha=100,1,0.1"]`` -> [("data.alpha", ["100", "1", "0.1"])] (values kept as text for --set)."""
    grid = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid expects key=v1,v2,..., got {item!r}")
        key, values = item.split("=", 1)
        key = key.strip()
        if any(k == key for k, _ in grid):
            raise ConfigError(f"--grid names {key!r} twice")
        grid.append((key, split_values(values)))
    return grid


def point_name(assignment: Sequence[tuple[str, str]]) -> str:
    text = ",".join(f"{k}={v}" for k, v in assignment)
    return "".join(c if c.isalnum() or c in "=,.-_" else "_" for c in text)


def run_summary(results: Mapping[str, Any]) -> dict[str, float | None]:
    """The accuracies of one run (edge figures: the mean over edges; None where the strategy has none) and its
    wall time."""
    def mean(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return sum(present) / len(present) if present else None

    return {
        "edge_before": mean([e["accuracy_before"] for e in results["edges"]]),
        "edge_after": mean([e["accuracy_after"] for e in results["edges"]]),
        "server_averaged": results["server"]["accuracy_averaged"],
        "server_finetuned": results["server"]["accuracy_finetuned"],
        "total_s": results["timing_s"]["total"],
    }


def run_sweep(
    base: Mapping[str, Any], grid: list[tuple[str, list[str]]], *, output_dir: str | Path,
    data_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Run every grid point (skipping finished ones) and write sweep.md, sweep.csv and sweep.png."""
    if not grid:
        raise ConfigError("give at least one --grid key=v1,v2,...")
    out = Path(output_dir)
    points = [list(zip([k for k, _ in grid], combo)) for combo in itertools.product(*[v for _, v in grid])]
    # Check every point's config before running any, so a typo in the last value does not waste hours.
    configs = []
    for assignment in points:
        user = apply_overrides(base, [f"{k}={v}" for k, v in assignment])
        require_backend(resolve_config(user))
        configs.append(user)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (assignment, user) in enumerate(zip(points, configs), 1):
        run_dir = out / point_name(assignment)
        log.info("sweep point %d/%d: %s", i, len(points), ", ".join(f"{k}={v}" for k, v in assignment))
        if (run_dir / "results.json").exists():
            results = json.loads((run_dir / "results.json").read_text())
        elif (run_dir / RUN_CONFIG).exists():
            results = run_experiment(data_dir=data_dir, resume=run_dir)
        else:
            results = run_experiment(user, data_dir=data_dir, output_dir=run_dir)
        rows.append({"point": {k: parse_override(f"{k}={v}")[1] for k, v in assignment}, "run": run_dir.name,
                     **run_summary(results)})
    # Described from the first point: the base alone need not be a valid config (e.g. --set pretrained=FILE with
    # --grid init=pretrained), only every point must be.
    write_sweep_outputs(out, [k for k, _ in grid], rows, configs[0])
    return rows


def group_over_seeds(keys: list[str], rows: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows averaged over the ``seed`` grid key: each metric becomes (mean, std, n)."""
    group_keys = [k for k in keys if k != "seed"]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(json.dumps(row["point"][k]) for k in group_keys), []).append(row)
    grouped = []
    for members in groups.values():
        entry: dict[str, Any] = {"point": {k: members[0]["point"][k] for k in group_keys}, "n": len(members)}
        for m in METRICS:
            entry[m] = mean_std(r[m] for r in members)
        grouped.append(entry)
    return group_keys, grouped


def format_metric(metric: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        mean, std = value
        return f"{mean:.1f} ± {std:.1f}" if metric == "total_s" else f"{percent(mean)} ± {percent(std)}"
    return f"{value:.1f}" if metric == "total_s" else percent(value)


def format_grid_value(v: Any) -> str:
    """A grid value as it is written in --grid / TOML (true, [0.7, 0.3], resnet18)."""
    return json.dumps(v) if isinstance(v, (list, bool)) else str(v)


def write_sweep_outputs(out: Path, keys: list[str], rows: list[dict[str, Any]], base: Mapping[str, Any]) -> None:
    by_seed = "seed" in keys and len({json.dumps(r["point"]["seed"]) for r in rows}) > 1
    shown_keys, shown_rows = group_over_seeds(keys, rows) if by_seed else (keys, rows)

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*keys, "run", *METRICS])
    for r in rows:
        writer.writerow([format_grid_value(r["point"][k]) for k in keys] + [r["run"]]
                        + ["" if r[m] is None else r[m] for m in METRICS])
    write_text_atomic(out / "sweep.csv", buf.getvalue())

    resolved = resolve_config(base)
    lines = [
        f"# Sweep over {', '.join(keys)}",
        "",
        f"Base: strategy `{resolved['strategy']}`, dataset `{resolved['data']['dataset']}`, model "
        f"`{resolved['model']['name']}`, {resolved['data']['num_edges']} edges, "
        f"edge epochs {resolved['edge']['epochs']}, "
        f"server epochs {resolved['server']['epochs']}, train fraction {resolved['data']['train_fraction']}. "
        "Accuracies in %, edge figures are the mean over edges" + ("; mean ± std over seeds." if by_seed else "."),
        "",
        "| " + " | ".join(shown_keys + (["seeds"] if by_seed else []) + [METRIC_TITLES[m] for m in METRICS]) + " |",
        "|" + "---|" * len(shown_keys) + ("---:|" if by_seed else "") + "---:|" * len(METRICS),
    ]
    for r in shown_rows:
        cells = [format_grid_value(r["point"][k]) for k in shown_keys] + ([str(r["n"])] if by_seed else [])
        lines.append("| " + " | ".join(cells + [format_metric(m, r[m]) for m in METRICS]) + " |")
    write_text_atomic(out / "sweep.md", "\n".join(lines) + "\n")
    _plot(out / "sweep.png", shown_keys, shown_rows)


def _plot(path: Path, keys: list[str], rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [", ".join(f"{k.split('.')[-1]}={format_grid_value(r['point'][k])}" for k in keys) or "all" for r in rows]
    metrics = METRICS[:-1]
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.0))
    for j, m in enumerate(metrics):
        means = [(r[m][0] if isinstance(r[m], tuple) else r[m]) for r in rows]
        errs = [(r[m][1] if isinstance(r[m], tuple) else 0.0) for r in rows]
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [100 * (v or 0) for v in means], width, yerr=[100 * e for e in errs], label=METRIC_TITLES[m])
    crowded = len(rows) > 4
    ax.set_xticks(range(len(rows)), labels, rotation=30 if crowded else 0, ha="right" if crowded else "center",
                  fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    # Below the axes, so that it never hides a bar.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(rows) > 4 else -0.12), ncol=4,
              frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
