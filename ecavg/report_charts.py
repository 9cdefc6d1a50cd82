"""The plotly figures of ``report.html`` (see ecavg/html_report.py), built from results.json and metrics.jsonl.

plotly is imported inside each function, so that the report module loads (and falls back to a static page)
where plotly is not installed. Accuracies are shown in percent; each participant keeps one colour everywhere.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

# plotly's default qualitative palette, written out so that colours do not depend on the plotly version.
PALETTE = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880", "#ff97ff",
           "#fecb52")
SERVER_COLOUR = "#222222"
DASHES = ("solid", "dash", "dot", "dashdot", "longdash")
EPOCH_METRICS = (("train_loss", "train loss", 1.0), ("train_accuracy", "train accuracy (%)", 100.0),
                 ("test_accuracy", "test accuracy (%)", 100.0))
LAYOUT = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 50, "b": 50}, "hovermode": "closest"}


def colour(participant: str) -> str:
    match = re.fullmatch(r"edge-(\d+)", participant)
    if match:
        return PALETTE[int(match.group(1)) % len(PALETTE)]
    return SERVER_COLOUR if participant == "server" else PALETTE[hash(participant) % len(PALETTE)]


def phase_group(phase: str) -> str:
    """FedAvg's round1, round2, ... are one curve."""
    return "rounds" if re.fullmatch(r"round\d+", phase) else phase


def deduplicate(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The last record of each (participant, phase, epoch): a phase redone after ``--resume`` replaces the
    epochs it logged before the interruption."""
    last: dict[tuple, int] = {}
    for i, r in enumerate(records):
        last[(r.get("participant"), r.get("phase"), r.get("epoch"))] = i
    return [records[i] for i in sorted(last.values())]


def epoch_series(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Per (participant, phase group), the training-epoch records with ``x``: the participant's epoch counted
    across all its phases (so FedAvg's rounds and ECAvg's pre-train then update follow on)."""
    counters: dict[str, int] = {}
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in deduplicate(records):
        if "epoch" not in r or "participant" not in r:
            continue
        counters[r["participant"]] = counters.get(r["participant"], 0) + 1
        series.setdefault((r["participant"], phase_group(str(r.get("phase")))), []).append(
            {**r, "x": counters[r["participant"]]})
    return series


def suffix_label(suffix: str) -> str:
    """What an extra before/after pair of an edge measures: ``accuracy_before_full`` -> "full test set"."""
    return "full test set" if "full" in suffix else suffix.strip("_").replace("_", " ")


def accuracy_figure(results: Mapping[str, Any], suffixes: Sequence[str] = ()) -> Any:
    """Each edge before and after the update (on its own test data, and for each extra measured pair named by
    its key suffix), and the server's averaged and fine-tuned models."""
    import plotly.graph_objects as go

    edges = results["edges"]
    names = [e["name"] for e in edges]
    fig = go.Figure()
    for suffix in ("", *suffixes):
        label = suffix_label(suffix) if suffix else "own test data"
        for when, shade in (("before", 0.55), ("after", 1.0)):
            values = [e.get(f"accuracy_{when}{suffix}") for e in edges]
            fig.add_bar(name=f"edge {when} update ({label})", x=names, opacity=shade,
                        y=[None if v is None else 100 * v for v in values],
                        hovertemplate="%{x}: %{y:.2f}%<extra>%{fullData.name}</extra>")
    s = results["server"]
    for key, label in (("accuracy_averaged", "server averaged"), ("accuracy_finetuned", "server fine-tuned")):
        if s.get(key) is not None:
            fig.add_bar(name=label, x=["server"], y=[100 * s[key]],
                        hovertemplate="%{x}: %{y:.2f}%<extra>%{fullData.name}</extra>")
    fig.update_layout(**LAYOUT, title="Test accuracy per participant", barmode="group",
                      yaxis={"title": "test accuracy (%)", "range": [0, 100]})
    return fig


def protocol_figure(records: Sequence[Mapping[str, Any]]) -> Any:
    """Each participant's last test accuracy in each phase, phases in the order the run went through them."""
    import plotly.graph_objects as go

    phases: list[str] = []
    last: dict[str, dict[str, float]] = {}
    for r in deduplicate(records):
        if r.get("test_accuracy") is None or "participant" not in r:
            continue
        phase = str(r.get("phase"))
        if phase not in phases:
            phases.append(phase)
        last.setdefault(r["participant"], {})[phase] = 100 * r["test_accuracy"]
    if not last:
        return None
    fig = go.Figure()
    for participant, by_phase in last.items():
        xs = [p for p in phases if p in by_phase]
        fig.add_scatter(name=participant, x=xs, y=[by_phase[p] for p in xs], mode="lines+markers",
                        line={"color": colour(participant)},
                        hovertemplate="%{x}: %{y:.2f}%<extra>%{fullData.name}</extra>")
    fig.update_layout(**LAYOUT, title="Test accuracy through the protocol",
                      xaxis={"title": "phase", "categoryorder": "array", "categoryarray": phases},
                      yaxis={"title": "test accuracy (%)"})
    return fig


def epoch_figure(records: Sequence[Mapping[str, Any]]) -> Any:
    """Train loss, train accuracy and (where measured) test accuracy per epoch, one trace per participant and
    phase; a legend entry hides or shows that trace in all three panels."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    series = epoch_series(records)
    metrics = [m for m in EPOCH_METRICS if any(r.get(m[0]) is not None for rs in series.values() for r in rs)]
    if not metrics:
        return None
    fig = make_subplots(rows=len(metrics), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=[title for _, title, _ in metrics])
    phase_dash: dict[str, str] = {}
    for (participant, group), rows in series.items():
        dash = phase_dash.setdefault(group, DASHES[len(phase_dash) % len(DASHES)])
        name = f"{participant} {group}"
        shown = False
        for i, (key, title, scale) in enumerate(metrics, 1):
            points = [r for r in rows if r.get(key) is not None]
            if not points:
                continue
            fig.add_trace(go.Scatter(
                name=name, legendgroup=name, showlegend=not shown, x=[r["x"] for r in points],
                y=[scale * r[key] for r in points], mode="lines+markers",
                line={"color": colour(participant), "dash": dash}, marker={"size": 5},
                customdata=[[r.get("phase"), r.get("epoch"), r.get("seconds")] for r in points],
                hovertemplate=("%{fullData.name}<br>phase %{customdata[0]}, epoch %{customdata[1]}<br>"
                               + title + ": %{y:.4g}<extra></extra>"),
            ), row=i, col=1)
            shown = True
    fig.update_layout(**LAYOUT, title="Per epoch", height=260 * len(metrics) + 120)
    fig.update_xaxes(title_text="epoch (of this participant, across phases)", row=len(metrics), col=1)
    return fig


def timing_figure(results: Mapping[str, Any]) -> Any:
    import plotly.graph_objects as go

    timing = {k: v for k, v in results.get("timing_s", {}).items() if k != "total"}
    if not timing:
        return None
    fig = go.Figure(go.Bar(x=list(timing.values()), y=list(timing), orientation="h",
                           hovertemplate="%{y}: %{x:.1f} s<extra></extra>"))
    fig.update_layout(**LAYOUT, title=f"Wall time per phase (total {results['timing_s'].get('total', 0):.1f} s)",
                      xaxis={"title": "seconds"}, yaxis={"autorange": "reversed"}, height=120 + 40 * len(timing))
    return fig


def sweep_summary_figure(labels: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Any:
    import plotly.graph_objects as go

    from ecavg.sweep import METRIC_TITLES, METRICS

    fig = go.Figure()
    for m in METRICS[:-1]:
        fig.add_bar(name=METRIC_TITLES[m], x=list(labels), y=[None if r[m] is None else 100 * r[m] for r in rows],
                    hovertemplate="%{x}: %{y:.2f}%<extra>%{fullData.name}</extra>")
    fig.update_layout(**LAYOUT, title="Accuracy per point", barmode="group",
                      yaxis={"title": "test accuracy (%)", "range": [0, 100]})
    return fig


def sweep_curves_figure(points: Sequence[tuple[str, Sequence[Mapping[str, Any]]]]) -> Any:
    """One panel per point: each participant's training accuracy per epoch (all phases, one line) and its test
    accuracy where measured (markers)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not points:
        return None
    cols = min(3, len(points))
    rows = math.ceil(len(points) / cols)
    fig = make_subplots(rows=rows, cols=cols, shared_yaxes=True, subplot_titles=[label for label, _ in points],
                        vertical_spacing=min(0.12, 0.5 / rows), horizontal_spacing=0.04)
    in_legend: set[str] = set()
    for n, (_, records) in enumerate(points):
        row, col = n // cols + 1, n % cols + 1
        per_participant: dict[str, list[dict[str, Any]]] = {}
        for (participant, _), rs in epoch_series(records).items():
            per_participant.setdefault(participant, []).extend(rs)
        for participant, rs in per_participant.items():
            rs.sort(key=lambda r: r["x"])
            for key, mode, suffix in (("train_accuracy", "lines", "train"), ("test_accuracy", "markers", "test")):
                pts = [r for r in rs if r.get(key) is not None]
                if not pts:
                    continue
                fig.add_trace(go.Scatter(
                    name=participant, legendgroup=participant, showlegend=participant not in in_legend,
                    x=[r["x"] for r in pts], y=[100 * r[key] for r in pts], mode=mode,
                    line={"color": colour(participant)}, marker={"color": colour(participant), "size": 7},
                    customdata=[[r.get("phase"), r.get("epoch")] for r in pts],
                    hovertemplate=(f"%{{fullData.name}} {suffix}<br>phase %{{customdata[0]}}, epoch "
                                   "%{customdata[1]}: %{y:.2f}%<extra></extra>"),
                ), row=row, col=col)
                in_legend.add(participant)
    fig.update_yaxes(range=[0, 100])
    fig.update_yaxes(title_text="accuracy (%)", col=1)
    fig.update_layout(**LAYOUT, title="Learning curves, one panel per point", height=300 * rows + 120)
    return fig
