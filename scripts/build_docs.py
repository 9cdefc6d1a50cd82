"""Build the result documents (docs/reproduction.md, docs/findings.md) from the runs kept under results/.

Every number in those documents comes from a results.json file: the prose lives in docs/src/*.md, and
directives there are replaced by tables, figures and single numbers read from the runs, so nothing is typed in
by hand and a reader can check each figure against its run.

    python scripts/build_docs.py            # rewrite docs/*.md from docs/src/*.md
    python scripts/build_docs.py --check    # exit 1 if a document is not what its source and results give

Directives (paths are relative to the repository root):

``@@strategies DIR [paper_before=X paper_after=Y]`` (a line of its own)
    One row per ``DIR/strategy=*`` run (ecavg, centralized, local, fedavg), the paper's figures as a first row
    when given, then the headline: what ECAvg's fine-tuned server gains over the centralized one.
``@@sweep DIR [DIR ...]`` (a line of its own)
    The runs of one or more ``ecavg sweep`` directories (their ``sweep.csv``) in one table; runs that differ
    only in ``seed`` are one row with mean ± standard deviation.
``@@updates DIR [DIR ...]`` (a line of its own)
    What the update step did to each edge, per run of ``ecavg sweep`` directories that vary ``update.mode``:
    the mean and worst edge's change on the edges' own test partitions, the mean on the full test set, which
    candidate each edge kept and the samples the edges trained on in the update against their pre-training's (the
    edges' extra compute).
``@@server DIR [DIR ...]`` (a line of its own)
    The server side of runs of ``ecavg sweep`` directories (seeds pooled): the edges' mean before the update, the
    averaged model as averaged and with BatchNorm statistics recomputed, its gap to the edges, the edges'
    ensemble (``server.objective = "distill"``'s teacher), the fine-tuned server and the edges after the update.
``@@conditions DIR [DIR ...]`` (a line of its own)
    Deployed runs over emulated links (``scripts/edge_conditions.py``): per run its links, codec and weights sent
    per edge, each phase's measured seconds with measured / predicted by its ``plan.json`` (made from the
    calibration runs alone), the round's total both ways and the edges' accuracy after the update.
``@@crossover DIR`` (a line of its own)
    The paper question's answer from ``ecavg plan --json`` files ``DIR/TASK,codec=C.json`` (each planned at one
    link rate for every edge): per task and codec the weights per transfer, the round's compute, the link rate
    below which transfers outweigh compute, and the round at 100, 10 and 1 Mbit/s (transfer time scales with
    1/rate; compute and Flower's overhead do not).
``@@config RUN`` (a line of its own)
    The hyperparameters of one run, from its resolved config.
``@@curve RUN IMAGE`` (a line of its own)
    Draws the run's per-epoch training curves (metrics.jsonl) into IMAGE and links it.
``{{acc RUN FIELD}}`` (inline)
    One accuracy in % (a RUN with ``*`` in it: the mean over the runs it matches), FIELD one of ``edge_before``,
    ``edge_after`` (means over edges), ``worst_edge_change`` (the least-gaining edge's after minus before),
    ``server_averaged``, ``server_finetuned``, ``edge_after_full`` (the edges' final models on the full test set,
    mean over edges); ``{{time RUN}}`` the run's total seconds, as minutes;
    ``{{epoch_s RUN PHASE}}`` the median seconds of one epoch of PHASE (``pretrain``, ``finetune``,
    ``centralized``, ...).
``{{round RUN}}``, ``{{speedup RUN_A RUN_B}}`` (inline)
    A deployed run's measured round (the phases of its plan) in seconds; A's round over B's.
``{{pp RUN_A FIELD_A RUN_B FIELD_B}}`` (inline)
    A minus B in percentage points, signed.
``{{bytes RUN_A RUN_B}}``, ``{{bytes_data RUN_A RUN_B}}`` (inline)
    The weights A sent (both ways, results.json ``bytes``), or the training data its edges uploaded (a deployed
    run's ``deploy.data_bytes_up``), as a share of B's, in %.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ecavg.core.strategies import STRATEGIES  # noqa: E402
from ecavg.formatting import percent, percent_spread, transfer_label  # noqa: E402
from ecavg.plan import measured_phases  # noqa: E402
from ecavg.sweep import run_summary  # noqa: E402  (the same per-run figures as `ecavg sweep` tables)

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCES = REPO_ROOT / "docs" / "src"
OUTPUT_DIR = REPO_ROOT / "docs"

FIELDS = ("edge_before", "edge_after", "worst_edge_change", "server_averaged", "server_finetuned")
# Inline only: the edges' final models on the full test set (the server's test set), to set against
# server_finetuned where the edges' copies differ from the server's model (a lossy transfer.codec).
INLINE_FIELDS = (*FIELDS, "edge_after_full")
FIELD_TITLES = {
    "edge_before": "edge acc. before update",
    "edge_after": "edge acc. after update",
    "worst_edge_change": "worst edge's change (pp)",
    "server_averaged": "server, averaged",
    "server_finetuned": "server, fine-tuned/trained",
}
STRATEGY_ORDER = STRATEGIES.names()
STRATEGY_TITLES = {strategy.name: strategy.title for strategy in STRATEGIES}


CHECK_ONLY = False  # set by --check: nothing is written


class DocError(RuntimeError):
    """A directive that cannot be rendered (missing run, unknown field); the message names it."""


def load_results(run: Path) -> dict[str, Any]:
    path = run / "results.json"
    if not path.is_file():
        raise DocError(f"no results.json in {run.relative_to(REPO_ROOT) if run.is_absolute() else run}")
    return json.loads(path.read_text())


def figures(results: dict[str, Any]) -> dict[str, float | None]:
    """A run's figures for the tables: ``ecavg sweep``'s summary plus the change the update brought to the edge
    that gained least (negative: the update hurt that edge), which a mean over edges hides."""
    changes = [e["accuracy_after"] - e["accuracy_before"] for e in results["edges"]
               if e["accuracy_after"] is not None and e["accuracy_before"] is not None]
    full = [e["accuracy_after_full"] for e in results["edges"] if e.get("accuracy_after_full") is not None]
    return {**run_summary(results), "worst_edge_change": min(changes) if changes else None,
            "edge_after_full": statistics.fmean(full) if full else None}


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def rel(path: Path) -> str:
    return path.resolve().relative_to(REPO_ROOT).as_posix()


def render_strategies(args: list[str]) -> str:
    directory = REPO_ROOT / args[0]
    paper = dict(a.split("=", 1) for a in args[1:])
    runs = {}
    for strategy in STRATEGY_ORDER:
        run = directory / f"strategy={strategy}"
        if run.is_dir():
            runs[strategy] = (run, figures(load_results(run)))
    if not runs:
        raise DocError(f"no strategy=* runs in {args[0]}")
    lines = [
        "| strategy | " + " | ".join(FIELD_TITLES[f] for f in FIELDS) + " | wall time | run |",
        "|---|" + "---:|" * len(FIELDS) + "---:|---|",
    ]
    if paper:
        cells = [paper.get("paper_before", "-"), paper.get("paper_after", "-"), "-", "-", "-"]
        lines.append("| paper (ECAvg) | " + " | ".join(cells) + " | - | - |")
    for strategy, (run, s) in runs.items():
        lines.append(f"| {STRATEGY_TITLES[strategy]} | " + " | ".join(percent(s[f]) for f in FIELDS)
                     + f" | {duration(s['total_s'])} | [{run.name}](../{rel(run)}/results.md) |")
    lines.append("")
    lines.append("Accuracies in %; edges on their own test partitions (mean over edges), the server on the full "
                 "test set.")
    if "ecavg" in runs and "centralized" in runs:
        gain = runs["ecavg"][1]["server_finetuned"] - runs["centralized"][1]["server_finetuned"]
        lines.append(f"**What ECAvg adds** (fine-tuned server from the averaged weights minus the centralized "
                     f"server, same server epochs): **{100 * gain:+.2f} pp**.")
    return "\n".join(lines)


def _read_sweep(directory: Path) -> tuple[list[str], list[dict[str, str]]]:
    path = directory / "sweep.csv"
    if not path.is_file():
        raise DocError(f"no sweep.csv in {rel(directory)} (has the sweep finished?)")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0].keys()) if rows else []
    keys = header[: header.index("run")] if "run" in header else []
    return keys, rows


def _grouped_runs(args: list[str], summarise: Any) -> tuple[list, list[str], dict[tuple, list[dict[str, Any]]]]:
    """The runs of the sweep directories ``args``, summarised and grouped by sweep and grid point (seeds pooled);
    the grid keys of all sweeps (but ``seed``) are the columns."""
    sweeps = [(REPO_ROOT / a, *_read_sweep(REPO_ROOT / a)) for a in args]
    columns: list[str] = []
    for _, keys, _ in sweeps:
        columns += [k for k in keys if k != "seed" and k not in columns]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for directory, _keys, rows in sweeps:
        for row in rows:
            ident = (rel(directory),) + tuple(row.get(k, "") for k in columns)
            groups.setdefault(ident, []).append(summarise(load_results(directory / row["run"])))
    return sweeps, columns, groups


def render_sweep(args: list[str]) -> str:
    """Sweeps side by side; their grid keys become columns (blank where a sweep does not vary one)."""
    sweeps, columns, groups = _grouped_runs(args, figures)
    with_seeds = any("seed" in keys for _, keys, _ in sweeps)
    lines = [
        "| " + " | ".join(columns + (["seeds"] if with_seeds else []) + [FIELD_TITLES[f] for f in FIELDS])
        + " | wall time |",
        "|" + "---|" * len(columns) + ("---:|" if with_seeds else "") + "---:|" * (len(FIELDS) + 1),
    ]
    for ident, members in groups.items():
        cells = list(ident[1:]) + ([str(len(members))] if with_seeds else [])
        cells += [percent_spread([m[f] for m in members]) for f in FIELDS]
        cells.append(duration(statistics.fmean(m["total_s"] for m in members)))
        lines.append("| " + " | ".join(c or "·" for c in cells) + " |")
    lines.append("")
    lines.append("Accuracies in %" + ("; mean ± standard deviation over seeds" if with_seeds else "")
                 + "; wall time per run. Runs: " + ", ".join(f"`{rel(d)}/`" for d, _, _ in sweeps) + ".")
    return "\n".join(lines)


def pp(values: list[float | None]) -> str:
    """Changes (fractions) as signed percentage points, mean ± standard deviation where there are several."""
    present = [100 * v for v in values if v is not None]
    if not present:
        return "-"
    mean, std = statistics.fmean(present), statistics.pstdev(present)
    return f"{mean:+.2f}" + (f" ± {std:.2f}" if len(present) > 1 else "")


def update_figures(results: dict[str, Any]) -> dict[str, Any]:
    """What the update step gave one run's edges (see ``@@updates``)."""
    edges = [e for e in results["edges"] if e["accuracy_after"] is not None and e["accuracy_before"] is not None]
    changes = [e["accuracy_after"] - e["accuracy_before"] for e in edges]
    full = [e["accuracy_after_full"] for e in edges if e.get("accuracy_after_full") is not None]
    kept: dict[str, int] = {}
    for e in edges:
        kept[e.get("update_kept") or "server"] = kept.get(e.get("update_kept") or "server", 0) + 1
    pretrained = sum(e["train_samples"] * results["config"]["edge"]["epochs"] for e in edges)
    return {
        "before": statistics.fmean(e["accuracy_before"] for e in edges) if edges else None,
        "change": statistics.fmean(changes) if changes else None,
        "worst": min(changes) if changes else None,
        "full": statistics.fmean(full) if full else None,
        "kept": ", ".join(f"{name} {n}" for name, n in sorted(kept.items())),
        # The edges' extra compute, in samples trained: wall times of resumed or disturbed runs would mislead.
        "update_cost": sum(e["update_train_samples"] or 0 for e in edges) / pretrained if pretrained else None,
    }


def render_updates(args: list[str]) -> str:
    """One row per run (seeds pooled): the edges' mean and worst change from the update, and what it cost."""
    sweeps, columns, groups = _grouped_runs(args, update_figures)
    lines = [
        "| " + " | ".join(columns) + " | runs | local-only (own test) | mean change (pp) | worst edge's change (pp) "
        "| after, full test set | kept | update training / pre-training |",
        "|" + "---|" * len(columns) + "---:|" * 5 + "---|---:|",
    ]

    for ident, members in groups.items():
        kept = "; ".join(dict.fromkeys(m["kept"] for m in members))
        costs = [m["update_cost"] for m in members if m["update_cost"] is not None]
        cells = list(ident[1:]) + [str(len(members)), percent_spread([m["before"] for m in members]),
                                   pp([m["change"] for m in members]),
                                   pp([min(m["worst"] for m in members)] if members[0]["worst"] is not None else []),
                                   percent_spread([m["full"] for m in members]), kept,
                                   f"{statistics.fmean(costs):.2f}" if costs else "-"]
        lines.append("| " + " | ".join(c or "·" for c in cells) + " |")
    lines.append("")
    lines.append("Edge accuracies in %, means over edges (and over seeds: mean ± std); the worst edge's change is the "
                 "lowest over every edge of every seed. *kept*: how many edges ended with each candidate; the last "
                 "column counts samples trained. Runs: "
                 + ", ".join(f"`{rel(d)}/`" for d, _, _ in sweeps) + ".")
    return "\n".join(lines)


def server_figures(results: dict[str, Any]) -> dict[str, Any]:
    """What the server made of one run's edges (see ``@@server``)."""
    server, summary = results["server"], run_summary(results)
    recalibrated = "accuracy_averaged_before_bn_recalibration" in server
    averaged = server["accuracy_averaged_before_bn_recalibration"] if recalibrated else server["accuracy_averaged"]
    best = server["accuracy_averaged"]
    before = summary["edge_before"]
    return {"before": before, "averaged": averaged, "recalibrated": best if recalibrated else None,
            "gap": best - before if best is not None and before is not None else None,
            "ensemble": server.get("accuracy_ensemble"), "finetuned": summary["server_finetuned"],
            "after": summary["edge_after"], "total_s": summary["total_s"]}


def render_server(args: list[str]) -> str:
    """One row per grid point (seeds pooled): what averaging, recalibration and fine-tuning made of the edges."""
    sweeps, columns, groups = _grouped_runs(args, server_figures)
    titles = ["edges before update", "averaged", "averaged, BN recomputed", "best average - edges (pp)",
              "edges' ensemble", "server fine-tuned/trained", "edges after update"]
    lines = ["| " + " | ".join(columns) + " | runs | " + " | ".join(titles) + " | wall time |",
             "|" + "---|" * len(columns) + "---:|" * (len(titles) + 2)]
    for ident, members in groups.items():
        cells = list(ident[1:]) + [str(len(members))]
        for key in ("before", "averaged", "recalibrated"):
            cells.append(percent_spread([m[key] for m in members]))
        cells.append(pp([m["gap"] for m in members]))
        for key in ("ensemble", "finetuned", "after"):
            cells.append(percent_spread([m[key] for m in members]))
        cells.append(duration(statistics.fmean(m["total_s"] for m in members)))
        lines.append("| " + " | ".join(c or "·" for c in cells) + " |")
    lines += ["", "Accuracies in % on the full test set (the edges': on their own test partitions, mean over edges); "
                  "mean ± standard deviation over seeds where there are several; *best average*: the recomputed one "
                  "where the run recomputed BatchNorm statistics; wall time per run. Runs: "
                  + ", ".join(f"`{rel(d)}/`" for d, _, _ in sweeps) + "."]
    return "\n".join(lines)


def _conditions_label(results: dict[str, Any]) -> tuple[str, str]:
    """(links, CPU) of a deployed run as ``deploy local`` recorded them in its results.json."""
    deploy = results.get("deploy", {})
    edges = (deploy.get("links") or {}).get("edges") or {}
    rates = {name: link.get("rate", "unshaped") for name, link in sorted(edges.items())}
    links = ("all " + next(iter(rates.values())) if len(set(rates.values())) == 1
             else ", ".join(f"{n} {r}" for n, r in rates.items())) if rates else "loopback, unshaped"
    cpu = ", ".join(f"{n} {share:g} core" for n, share in sorted((deploy.get("edge_cpu") or {}).items()))
    return links, cpu or "-"


def load_plan(run: Path) -> dict[str, Any] | None:
    """The plan.json beside a deployed run (None: it has none)."""
    return json.loads((run / "plan.json").read_text()) if (run / "plan.json").is_file() else None


def round_seconds(measured: dict[str, float], plan: dict[str, Any] | None) -> float:
    """Seconds a deployed run spent in the phases its plan lists (every exchange and server step), as measured."""
    if plan is not None:
        return sum(measured.get(ph["phase"], 0.0) for ph in plan["phases"])
    return sum(measured.values())


def measured_round(run: Path) -> float:
    return round_seconds(measured_phases(load_results(run)), load_plan(run))


def render_conditions(args: list[str]) -> str:
    """Deployed runs beside their plans: one row per run, phases measured (and measured / predicted)."""
    lines = []
    for arg in args:
        directory = REPO_ROOT / arg
        runs = sorted((d for d in directory.iterdir() if (d / "results.json").is_file()),
                      key=lambda d: (not d.name.startswith("calibration"), d.name.startswith("straggler"), d.name))
        if not runs:
            raise DocError(f"no deployed runs in {rel(directory)}")
        plans = {run: load_plan(run) for run in runs}
        phases: list[str] = []
        for plan in plans.values():
            phases += [ph["phase"] for ph in (plan or {}).get("phases", []) if ph["phase"] not in phases]
        lines += ["| run | links | CPU | codec | weights sent per edge | data sent per edge | " + " | ".join(phases)
                  + " | round, measured | round, planned | edge acc. after |",
                  "|---|---|---|---|---:|---:|" + "---:|" * (len(phases) + 3)]
        for run in runs:
            results = load_results(run)
            measured = measured_phases(results)
            plan = plans[run]
            planned = {ph["phase"]: ph["total_s"] for ph in plan["phases"]} if plan else {}
            codec = transfer_label(results.get("transfer", {}))
            data = results.get("deploy", {}).get("data_bytes_up") or 0
            sent = weight_bytes(run) / max(1, len(results["edges"]))
            cells = [run.name, *_conditions_label(results), codec, f"{sent / 1e6:.2f} MB",
                     f"{data / max(1, len(results['edges'])) / 1e6:.2f} MB"]
            for phase in phases:
                m = measured.get(phase)
                # A ratio of sub-second steps (the averaging) says nothing about the model: shown from 1 s.
                cells.append("-" if m is None else f"{m:.1f} s" + (f" (x{m / planned[phase]:.2f})"
                                                                   if planned.get(phase, 0) >= 1.0 else ""))
            total = round_seconds(measured, plan)
            cells.append(f"{total:.1f} s")
            cells.append(f"{plan['summary']['total_s']:.1f} s (x{total / plan['summary']['total_s']:.2f})"
                         if plan else "-")
            cells.append(percent_spread([statistics.fmean(e["accuracy_after"] for e in results["edges"])]))
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Seconds per phase as the server measured them (exchanges: from sending to the last reply); "
                      "(x*r*): measured / predicted by `ecavg plan` from the two unshaped `calibration` runs alone "
                      "(nothing of the run itself; shown where the plan gives a phase 1 s or more). Weights sent "
                      "per edge: both directions, in the run's codec; data: the edge's training share "
                      "(`share_data = \"full\"`), uncompressed. "
                      f"Runs: `{rel(directory)}/`.", ""]
    return "\n".join(lines).rstrip("\n")


def render_crossover(args: list[str]) -> str:
    """Per task and codec: where communication starts to dominate an ECAvg round, and the round at three rates."""
    directory = REPO_ROOT / args[0]
    plans = sorted(directory.glob("*,codec=*.json"))
    if not plans:
        raise DocError(f"no TASK,codec=C.json plans in {rel(directory)}")
    rates = (100e6, 10e6, 1e6)
    lines = ["| task | codec | weights per transfer | compute per round | transfers outweigh compute below | "
             + " | ".join(f"round at {r / 1e6:g} Mbit/s" for r in rates) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(rates)]
    fp32_rounds: dict[str, list[float]] = {}
    for path in plans:
        task, codec = path.stem.split(",codec=")
        plan = json.loads(path.read_text())
        planned_rates = {e["rate_bps"] for e in plan["edges"]}
        if len(planned_rates) != 1 or None in planned_rates:
            raise DocError(f"{rel(path)}: plan every edge at one link rate (--link all=RATE)")
        (planned_rate,) = planned_rates
        summary = plan["summary"]
        fixed = summary["compute_s"] + summary["overhead_s"]
        rounds = [fixed + summary["communication_s"] * planned_rate / r for r in rates]
        if codec == "fp32":
            fp32_rounds[task] = rounds
        cells = [task, codec, f"{plan['payloads']['whole'] / 1e6:.2f} MB", duration(summary["compute_s"]),
                 f"{plan['crossover_rate_bps'] / 1e6:.2g} Mbit/s" if plan["crossover_rate_bps"] else "-"]
        for k, seconds in enumerate(rounds):
            base = fp32_rounds.get(task)
            cells.append(duration(seconds) + (f" ({base[k] / seconds:.2f}x)" if base and codec != "fp32" else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Planned by `ecavg plan` from each task's measured compute (the paper run named in each plan's "
                  "`compute_source`) with the per-message overhead given in its `message_overhead_s`; a task named "
                  "`-data-on-server` has `deploy.share_data = \"none\"` (the server fine-tunes on its own copy of "
                  "the data), the others upload each edge's training data with its pre-trained model; (*n*x): the "
                  f"round's speed-up over fp32. Plans: `{rel(directory)}/`."]
    return "\n".join(lines)


def render_config(args: list[str]) -> str:
    cfg = load_results(REPO_ROOT / args[0])["config"]
    data, model = cfg["data"], cfg["model"]

    def training(section: dict[str, Any]) -> str:
        text = (f"{section['epochs']} epochs, batch {section['batch_size']}, {section['optimizer']} lr "
                f"{section['lr']} ({section['schedule']})")
        if section["optimizer"] == "sgd":
            text += f", momentum {section['momentum']}{' Nesterov' if section['nesterov'] else ''}"
        text += f", weight decay {section['weight_decay']}, label smoothing {section['label_smoothing']}"
        return text

    options = ", ".join(f"{k} {v}" for k, v in model.items() if k != "name")
    partition = data["partition"] + (f" {data['ratios']}" if data["partition"] == "ratio" else "") + (
        f" alpha {data['alpha']}" if data["partition"] == "dirichlet" else "") + (
        f" {data['labels_per_edge']} labels per edge" if data["partition"] == "shards" else "")
    init = cfg["init"] + ("" if cfg["shared_init"] else " (independent per edge)")
    if cfg["init"] == "warmup":
        init += f" ({cfg['warmup']['epochs']} epochs on {cfg['warmup']['data_fraction']} of the data)"
    if cfg["init"] == "pretrained":
        init += f" (`{cfg['pretrained']}`)"
    items = [
        f"data: `{data['dataset']}`, {data['num_edges']} edges, partition {partition}, augmentation "
        f"{data['augment']}, train fraction {data['train_fraction']}",
        f"model: `{model['name']}`" + (f" ({options})" if options else ""),
        f"shared start: {init}; BatchNorm recalibration after averaging: {cfg['bn_recalibration']}; seed "
        f"{cfg['seed']}",
        f"edges: {training(cfg['edge'])}",
        f"server: {training(cfg['server'])}",
        f"FedAvg: {cfg['fedavg']['rounds']} rounds of the edge settings",
    ]
    return "\n".join(f"- {item}" for item in items)


def render_curve(args: list[str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run, image = REPO_ROOT / args[0], REPO_ROOT / args[1]
    link = f"![training curves of {rel(run)}]({os.path.relpath(image, REPO_ROOT / 'docs')})"
    if CHECK_ONLY:
        # The text is what --check compares (pixels may differ between matplotlib versions); a missing image is
        # an error rather than something --check would write.
        if not image.is_file():
            raise DocError(f"{args[1]} is missing (run python scripts/build_docs.py)")
        return link
    metrics_path = run / "metrics.jsonl"
    if not metrics_path.is_file():
        raise DocError(f"no metrics.jsonl in {args[0]}")
    series: dict[str, list[tuple[int, float, float | None]]] = {}
    for line in metrics_path.read_text().splitlines():
        m = json.loads(line)
        if "epoch" not in m:  # one-off evaluations (the average, the update) are in the tables
            continue
        series.setdefault(f"{m['participant']} {m['phase']}", []).append(
            (m["epoch"], m["train_accuracy"], m.get("test_accuracy")))
    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    offset = 0
    for label, points in series.items():
        # Phases follow each other: the server's epochs are drawn after the edges'.
        start = offset if "edge" not in label else 0
        xs = [start + e for e, _, _ in points]
        ax.plot(xs, [100 * a for _, a, _ in points], marker=".", label=f"{label} (train)")
        tests = [(x, t) for x, (_, _, t) in zip(xs, points) if t is not None]
        if tests:
            ax.plot([x for x, _ in tests], [100 * t for _, t in tests], linestyle="--", marker="x",
                    label=f"{label} (test)")
        if "edge" in label:
            offset = max(offset, xs[-1])
    ax.set_xlabel("epoch (edges' pre-training, then the server's)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    image.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(image, dpi=100)
    plt.close(fig)
    return link


def field_value(run_arg: str, field: str) -> float:
    """FIELD of one run; a RUN with ``*`` (e.g. ``.../seed=*``) gives the mean over the runs it matches."""
    if field not in INLINE_FIELDS:
        raise DocError(f"unknown field {field!r} (one of {', '.join(INLINE_FIELDS)})")
    runs = sorted(REPO_ROOT.glob(run_arg)) if "*" in run_arg else [REPO_ROOT / run_arg]
    if not runs:
        raise DocError(f"no runs match {run_arg}")
    values = [figures(load_results(run))[field] for run in runs]
    if any(v is None for v in values):
        raise DocError(f"{run_arg} has no {field}")
    return statistics.fmean(values)


def median_epoch_seconds(run: Path, phase: str) -> float:
    """Median wall time of one epoch of ``phase`` (pretrain, finetune, ...): robust to a few disturbed epochs."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise DocError(f"no metrics.jsonl in {rel(run)}")
    seconds = [m["seconds"] for m in map(json.loads, path.read_text().splitlines())
               if m.get("phase") == phase and "seconds" in m]
    if not seconds:
        raise DocError(f"{rel(run)} has no {phase} epochs")
    return statistics.median(seconds)


def data_bytes(run: Path) -> int:
    """The training data a deployed run's edges uploaded (results.json ``deploy.data_bytes_up``)."""
    sent = load_results(run).get("deploy", {}).get("data_bytes_up")
    if not sent:
        raise DocError(f"{rel(run)} uploaded no training data")
    return sent


def weight_bytes(run: Path) -> int:
    """The weights a run sent, both ways (results.json ``bytes``, less a deployment's data upload)."""
    results = load_results(run)
    return sum(results["bytes"].values()) - (results.get("deploy", {}).get("data_bytes_up") or 0)


def render_inline(match: re.Match) -> str:
    verb, *args = match.group(1).split()
    if verb == "acc" and len(args) == 2:
        return f"{100 * field_value(*args):.2f}%"
    if verb == "pp" and len(args) == 4:
        return f"{100 * (field_value(args[0], args[1]) - field_value(args[2], args[3])):+.2f} pp"
    if verb == "epoch_s" and len(args) == 2:
        return f"{median_epoch_seconds(REPO_ROOT / args[0], args[1]):.1f} s"
    if verb == "round" and len(args) == 1:
        return f"{measured_round(REPO_ROOT / args[0]):.0f} s"
    if verb == "speedup" and len(args) == 2:
        return f"{measured_round(REPO_ROOT / args[0]) / measured_round(REPO_ROOT / args[1]):.2f}x"
    if verb == "bytes" and len(args) == 2:
        return f"{100 * weight_bytes(REPO_ROOT / args[0]) / weight_bytes(REPO_ROOT / args[1]):.1f}%"
    if verb == "bytes_data" and len(args) == 2:
        return f"{100 * data_bytes(REPO_ROOT / args[0]) / data_bytes(REPO_ROOT / args[1]):.1f}%"
    if verb == "time" and len(args) == 1:
        return duration(run_summary(load_results(REPO_ROOT / args[0]))["total_s"])
    raise DocError(f"bad inline directive {{{{{match.group(1)}}}}}")


BLOCKS = {"strategies": render_strategies, "sweep": render_sweep, "updates": render_updates,
          "server": render_server, "crossover": render_crossover, "conditions": render_conditions,
          "config": render_config, "curve": render_curve}


def render(source: Path) -> str:
    out = [f"<!-- Generated by scripts/build_docs.py from docs/src/{source.name} and the runs under results/; "
           "edit those, not this file. -->", ""]
    for line in source.read_text().splitlines():
        if line.startswith("@@"):
            verb, *args = line[2:].split()
            if verb not in BLOCKS:
                raise DocError(f"{source.name}: unknown directive @@{verb}")
            out.append(BLOCKS[verb](args))
        else:
            out.append(re.sub(r"\{\{(.+?)\}\}", render_inline, line))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the documents are up to date")
    args = parser.parse_args(argv)
    global CHECK_ONLY
    CHECK_ONLY = args.check
    stale = []
    for source in sorted(SOURCES.glob("*.md")):
        try:
            text = render(source)
        except DocError as exc:
            print(f"error: {source.name}: {exc}", file=sys.stderr)
            return 2
        target = OUTPUT_DIR / source.name
        if args.check:
            if not target.is_file() or target.read_text() != text:
                stale.append(rel(target))
        else:
            target.write_text(text)
            print(f"wrote {rel(target)}")
    if stale:
        print("out of date (run python scripts/build_docs.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
