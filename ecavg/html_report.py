"""``ecavg report``: one self-contained ``report.html`` for a run or a sweep directory.

Charts are plotly figures drawn by plotly.js, which is embedded once in the page, so the file opens offline and
can be mailed as it is. Tables are plain HTML; the only hand-written JavaScript records errors, draws the figures
(setting ``data-charts-rendered`` on <body> when every one is drawn, which the browser test waits for) and sorts a
table by the clicked column. Without plotly installed the page is static: the tables plus the run's PNG plots.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from ecavg.errors import ConfigError
from ecavg.fileio import write_text_atomic
from ecavg.formatting import change_pp, percent
from ecavg.report_charts import (
    accuracy_figure,
    epoch_figure,
    protocol_figure,
    suffix_label,
    sweep_curves_figure,
    sweep_summary_figure,
    timing_figure,
)

REPORT_NAME = "report.html"

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em}td.num{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f4f4f4}table.sortable th{cursor:pointer}table.sortable th:after{content:" \\2195";color:#aaa}
.chart{width:100%;min-height:380px}.note{background:#fff7e0;border:1px solid #eed;padding:.5em 1em}
.up{color:#1a7f37}.down{color:#b42318}details{margin:.5em 0}
"""

# Recorded in the DOM so that a headless browser (and the test) can tell a page that drew from one that failed.
ERROR_HOOK = """
window.ecavgErrors=[];
const ecavgRecord=m=>{window.ecavgErrors.push(String(m));document.documentElement.dataset.jsErrors=
  window.ecavgErrors.join(" | ");};
window.addEventListener("error",e=>ecavgRecord(e.message));
window.addEventListener("unhandledrejection",e=>ecavgRecord(e.reason));
const ecavgConsoleError=console.error;console.error=(...a)=>{ecavgRecord(a.join(" "));ecavgConsoleError(...a);};
"""

DRAW = """
const ecavgFigures=JSON.parse(document.getElementById("ecavg-figures").textContent);
Promise.all(ecavgFigures.map(f=>Plotly.newPlot(f.id,f.figure.data,f.figure.layout,{responsive:true})))
  .then(()=>{document.body.dataset.chartsRendered=String(ecavgFigures.length);},ecavgRecord);
"""

# Sorts numerically by data-sort when both cells have one, else as text; empty cells go last either way.
SORT = """
document.querySelectorAll("table.sortable th").forEach((th,col)=>th.addEventListener("click",()=>{
  const body=th.closest("table").tBodies[0],dir=th.dataset.dir==="asc"?-1:1;th.dataset.dir=dir>0?"asc":"desc";
  const key=r=>{const c=r.cells[col];return c.dataset.sort!==undefined?c.dataset.sort:c.textContent;};
  [...body.rows].sort((a,b)=>{const x=key(a),y=key(b);if(x===""||y==="")return (x==="")-(y==="");
    const nx=Number(x),ny=Number(y);return dir*(isNaN(nx)||isNaN(ny)?x.localeCompare(y):nx-ny);})
    .forEach(r=>body.appendChild(r));}));
"""


def plotly_available() -> bool:
    try:
        import plotly  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- reading a run


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a last line cut short by an interrupted run is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def read_run(run_dir: Path) -> tuple[dict[str, Any] | None, dict[str, Any], list[dict[str, Any]]]:
    """(results or None for an unfinished run, config, metrics records) of one run directory."""
    results = _read_json(run_dir / "results.json") if (run_dir / "results.json").exists() else None
    if results is not None:
        config = results.get("config", {})
    elif (run_dir / "config.json").exists():
        config = _read_json(run_dir / "config.json").get("config", {})
    else:
        config = {}
    return results, config, read_metrics(run_dir / "metrics.jsonl")


# ---------------------------------------------------------------- HTML pieces


def esc(value: Any) -> str:
    return html.escape(str(value))


def table(headers: Iterable[str], rows: Iterable[Iterable[Any]], *, sortable: bool = False, cls: str = "") -> str:
    """A table; a cell is text, or (text, sort value) for a right-aligned number, or a dict of td attributes plus
    ``html`` for markup that is already escaped."""
    classes = " ".join(c for c in ("sortable" if sortable else "", cls) if c)
    out = [f'<table class="{classes}">' if classes else "<table>", "<thead><tr>"]
    out += [f"<th>{esc(h)}</th>" for h in headers]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>")
        for cell in row:
            if isinstance(cell, tuple):
                text, sort = cell
                sort_attr = "" if sort is None else str(sort)
                out.append(f'<td class="num" data-sort="{esc(sort_attr)}">{esc(text)}</td>')
            elif isinstance(cell, dict):
                attrs = "".join(f' {k}="{esc(v)}"' for k, v in cell.items() if k != "html")
                out.append(f"<td{attrs}>{cell['html']}</td>")
            else:
                out.append(f"<td>{esc(cell)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def change_cell(after: float | None, before: float | None) -> dict[str, str]:
    text = change_pp(after, before)
    cls = "num" if after is None or before is None else ("num up" if after >= before else "num down")
    sort = "" if after is None or before is None else f"{after - before:.6f}"
    return {"class": cls, "data-sort": sort, "html": esc(text)}


def pct_cell(value: float | None) -> tuple[str, float | None]:
    return percent(value, "%"), value


def flatten(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in config.items():
        if isinstance(value, Mapping):
            items += flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def config_table(config: Mapping[str, Any]) -> str:
    rows = [(k, json.dumps(v) if isinstance(v, (list, bool)) or v is None else v) for k, v in flatten(config)]
    return table(["key", "value"], rows, cls="config")


def image_data_uri(path: Path) -> str | None:
    if not path.exists():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


class Page:
    """Sections of HTML and the plotly figures they refer to, assembled into one self-contained document."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []
        self.figures: list[dict[str, Any]] = []
        self.interactive = plotly_available()

    def add(self, markup: str) -> None:
        self.parts.append(markup)

    def chart(self, figure: Any, caption: str = "") -> None:
        """A plotly figure (skipped in a static page, whose caller embeds PNGs instead)."""
        if not self.interactive or figure is None:
            return
        div_id = f"chart-{len(self.figures)}"
        self.figures.append({"id": div_id, "figure": json.loads(figure.to_json())})
        self.parts.append(f'<div class="chart" id="{div_id}"></div>')
        if caption:
            self.parts.append(f"<p><small>{esc(caption)}</small></p>")

    def render(self) -> str:
        head = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(self.title)}</title>",
                f"<style>{STYLE}</style><script>{ERROR_HOOK}</script>"]
        scripts = []
        if self.interactive and self.figures:
            from plotly.offline import get_plotlyjs

            head.append(f"<script>{get_plotlyjs()}</script>")
            figures = json.dumps(self.figures).replace("</", "<\\/")
            scripts.append(f'<script type="application/json" id="ecavg-figures">{figures}</script>')
            scripts.append(f"<script>{DRAW}</script>")
        body_attrs = "" if self.interactive and self.figures else ' data-charts-rendered="0"'
        scripts.append(f"<script>{SORT}</script>")
        return "".join(head) + f"</head><body{body_attrs}>" + "\n".join(self.parts) + "".join(scripts) + \
            "</body></html>\n"


def static_note(page: Page) -> None:
    if not page.interactive:
        page.add('<p class="note">plotly is not installed, so this page is static: tables and the PNG plots only. '
                 "Install it (<code>pip install plotly</code>) and run <code>ecavg report DIR</code> again for "
                 "interactive learning curves.</p>")


# ---------------------------------------------------------------- one run


def edge_columns(edges: list[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """Suffixes of the extra before/after pairs (``accuracy_before_full`` ...) and the other extra keys."""
    standard = {"name", "train_samples", "test_samples", "accuracy_before", "accuracy_after"}
    keys: list[str] = []
    for e in edges:
        keys += [k for k in e if k not in standard and k not in keys]
    suffixes = [k[len("accuracy_before"):] for k in keys
                if k.startswith("accuracy_before") and "accuracy_after" + k[len("accuracy_before"):] in keys]
    paired = {f"accuracy_{w}{s}" for s in suffixes for w in ("before", "after")}
    return suffixes, [k for k in keys if k not in paired]


def edge_table(edges: list[Mapping[str, Any]]) -> str:
    suffixes, others = edge_columns(edges)
    headers = ["participant", "train samples", "test samples", "before (own test data)", "after (own test data)",
               "change"]
    for s in suffixes:
        headers += [f"before ({suffix_label(s)})", f"after ({suffix_label(s)})", f"change ({suffix_label(s)})"]
    headers += [k.replace("_", " ") for k in others]
    rows = []
    for e in edges:
        row: list[Any] = [e["name"], (f"{e['train_samples']:,}", e["train_samples"]),
                          (f"{e['test_samples']:,}", e["test_samples"]), pct_cell(e["accuracy_before"]),
                          pct_cell(e["accuracy_after"]), change_cell(e["accuracy_after"], e["accuracy_before"])]
        for s in suffixes:
            before, after = e.get(f"accuracy_before{s}"), e.get(f"accuracy_after{s}")
            row += [pct_cell(before), pct_cell(after), change_cell(after, before)]
        row += [json.dumps(e[k]) if not isinstance(e.get(k), str) else e[k] for k in others]
        rows.append(row)
    return table(headers, rows, sortable=True, cls="edges")


def server_table(server: Mapping[str, Any]) -> str:
    rows = []
    for key, value in server.items():
        label = key.removeprefix("accuracy_").replace("_", " ")
        rows.append((label, pct_cell(value) if isinstance(value, (float, int)) or value is None else str(value)))
    return table(["server (full test set)", "accuracy"], rows, cls="server")


def summary(results: Mapping[str, Any]) -> str:
    """What the strategy added, in a sentence or two."""
    edges = results["edges"]
    changes = [(e["accuracy_after"] - e["accuracy_before"], e["name"]) for e in edges
               if e["accuracy_after"] is not None and e["accuracy_before"] is not None]
    lines = []
    if changes:
        mean = sum(c for c, _ in changes) / len(changes)
        worst, worst_name = min(changes)
        lines.append(f"Edges after the update: mean change {change_pp(mean, 0.0)} on their own test data, "
                     f"worst {change_pp(worst, 0.0)} ({esc(worst_name)}).")
    s = results["server"]
    if s.get("accuracy_averaged") is not None and s.get("accuracy_finetuned") is not None:
        lines.append(f"Server on the full test set: averaged weights {percent(s['accuracy_averaged'], '%')}, "
                     f"after fine-tuning {percent(s['accuracy_finetuned'], '%')} "
                     f"({change_pp(s['accuracy_finetuned'], s['accuracy_averaged'])}).")
    elif s.get("accuracy_finetuned") is not None or s.get("accuracy_averaged") is not None:
        final = s.get("accuracy_finetuned") if s.get("accuracy_finetuned") is not None else s["accuracy_averaged"]
        lines.append(f"Server on the full test set: {percent(final, '%')}.")
    return "<p>" + " ".join(lines) + "</p>" if lines else ""


def timing_tables(results: Mapping[str, Any]) -> str:
    t = results.get("timing_s", {})
    rows = [(k, (f"{v:.1f}", v)) for k, v in t.items()]
    if "data_load_s" in results:
        rows.append(("data load (not in total)", (f"{results['data_load_s']:.1f}", results["data_load_s"])))
    out = table(["phase", "seconds"], rows, cls="timing")
    b = results.get("bytes", {})
    if b:
        out += table(["direction", "bytes", "MiB"],
                     [(k, (f"{v:,}", v), (f"{v / 2**20:.2f}", v)) for k, v in b.items()], cls="bytes")
    return out


def run_title(results: Mapping[str, Any] | None, config: Mapping[str, Any], run_dir: Path) -> str:
    name = config.get("name") or run_dir.name
    if results is not None:
        return f"{name}: {results['strategy']} on {results['dataset']} with {results['model']}"
    if config:
        return f"{name}: {config.get('strategy')} on {config.get('data', {}).get('dataset')} (unfinished)"
    return f"{name} (unfinished)"


def host_phrase(host: Any) -> str:
    """The run's CPU, its kernels and PyTorch version: what its numbers depend on besides the config."""
    if not isinstance(host, dict):
        return ""  # results written before results.json recorded its host
    return (f" ({esc(host.get('cpu', '?'))}, {esc(host.get('cpu_capability', '?'))} kernels, "
            f"PyTorch {esc(host.get('torch', '?'))})")


def run_page(run_dir: Path) -> Page:
    results, config, records = read_run(run_dir)
    if results is None and not records:
        raise ConfigError(f"{run_dir} has neither results.json nor metrics.jsonl: not an ecavg run directory "
                          "(or a sweep without sweep.csv yet)")
    page = Page(run_title(results, config, run_dir))
    page.add(f"<h1>{esc(page.title)}</h1>")
    static_note(page)
    if results is None:
        page.add('<p class="note">No results.json yet: the run is still going or was interrupted '
                 f"(continue it with <code>ecavg run --resume {esc(run_dir)}</code>). Curves so far:</p>")
    else:
        page.add(f"<p>{results['num_edges']} edges, partition <code>{esc(results['partition'])}</code>, "
                 f"runtime {esc(results.get('runtime', '-'))} on {esc(results.get('device', '-'))}"
                 f"{host_phrase(results.get('host'))}.</p>")
        page.add(summary(results))
        page.add("<h2>Accuracy</h2>" + edge_table(results["edges"]) + server_table(results["server"]))
        page.chart(accuracy_figure(results, edge_columns(results["edges"])[0]))
        if not page.interactive and (uri := image_data_uri(run_dir / "accuracy.png")):
            page.add(f'<img alt="accuracy per participant" src="{uri}">')
    if page.interactive and records:
        page.add("<h2>Learning curves</h2><p>Hover for values; click a legend entry to hide or show it "
                 "(double-click: that one alone).</p>")
        page.chart(protocol_figure(records), "Test accuracy at the end of each phase, per participant.")
        page.chart(epoch_figure(records), "Per training epoch, numbered across phases for each participant.")
    if results is not None:
        page.add("<h2>Time and bytes</h2>" + timing_tables(results))
        page.chart(timing_figure(results))
    if config:
        page.add(f"<h2>Config</h2><details open><summary>{len(flatten(config))} keys</summary>"
                 f"{config_table(config)}</details>")
    return page


# ---------------------------------------------------------------- a sweep


def read_sweep(sweep_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(grid keys, one row per point: point values, run directory name and metrics) from sweep.csv."""
    from ecavg.config import parse_override
    from ecavg.sweep import METRICS

    with (sweep_dir / "sweep.csv").open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or "run" not in header:
            raise ConfigError(f"{sweep_dir / 'sweep.csv'} has no 'run' column: not a sweep.csv written by ecavg")
        keys = header[:header.index("run")]
        rows = []
        for values in reader:
            cells = dict(zip(header, values))
            rows.append({
                "point": {k: parse_override(f"{k}={cells[k]}")[1] for k in keys},
                "run": cells["run"],
                **{m: float(cells[m]) if cells.get(m) else None for m in METRICS},
            })
    return keys, rows


def point_label(keys: list[str], row: Mapping[str, Any]) -> str:
    from ecavg.sweep import format_grid_value

    return ", ".join(f"{k.split('.')[-1]}={format_grid_value(row['point'][k])}" for k in keys) or row["run"]


def sweep_table(sweep_dir: Path, keys: list[str], rows: list[dict[str, Any]]) -> str:
    from ecavg.sweep import METRIC_TITLES, METRICS, format_grid_value, format_metric

    headers = [*keys, "run", *(METRIC_TITLES[m] + ("" if m == "total_s" else " (%)") for m in METRICS)]
    body = []
    for r in rows:
        target = next((f"{r['run']}/{name}" for name in (REPORT_NAME, "results.md")
                       if (sweep_dir / r["run"] / name).exists()), None)
        run_cell: Any = {"html": f'<a href="{esc(target)}">{esc(r["run"])}</a>'} if target else r["run"]
        body.append([format_grid_value(r["point"][k]) for k in keys] + [run_cell]
                    + [(format_metric(m, r[m]), r[m]) for m in METRICS])
    return table(headers, body, sortable=True, cls="sweep")


def sweep_page(sweep_dir: Path) -> Page:
    from ecavg.sweep import METRIC_TITLES, METRICS, format_grid_value, format_metric, group_over_seeds

    keys, rows = read_sweep(sweep_dir)
    runs = {r["run"]: read_run(sweep_dir / r["run"]) for r in rows}
    first = next((res for res, _, _ in runs.values() if res is not None), None)
    page = Page(f"Sweep over {', '.join(keys)}: {sweep_dir.name}")
    page.add(f"<h1>{esc(page.title)}</h1>")
    static_note(page)
    if first is not None:
        c = first["config"]
        page.add(f"<p>Base (first point): strategy <code>{esc(c['strategy'])}</code>, dataset "
                 f"<code>{esc(c['data']['dataset'])}</code>, model <code>{esc(c['model']['name'])}</code>, "
                 f"{c['data']['num_edges']} edges, edge epochs {c['edge']['epochs']}, server epochs "
                 f"{c['server']['epochs']}. Edge figures are the mean over edges. Click a column title to sort."
                 "</p>")
    page.add(f"<h2>Points ({len(rows)})</h2>" + sweep_table(sweep_dir, keys, rows))
    if "seed" in keys and len({json.dumps(r["point"]["seed"]) for r in rows}) > 1:
        shown_keys, grouped = group_over_seeds(keys, rows)
        page.add("<h2>Mean ± std over seeds</h2>" + table(
            [*shown_keys, "seeds", *(METRIC_TITLES[m] for m in METRICS)],
            [[format_grid_value(g["point"][k]) for k in shown_keys] + [(str(g["n"]), g["n"])]
             + [(format_metric(m, g[m]), None if g[m] is None else g[m][0]) for m in METRICS] for g in grouped],
            sortable=True, cls="seeds"))
    page.chart(sweep_summary_figure([point_label(keys, r) for r in rows], rows))
    if not page.interactive and (uri := image_data_uri(sweep_dir / "sweep.png")):
        page.add(f'<img alt="sweep summary" src="{uri}">')
    if page.interactive:
        labelled = [(point_label(keys, r), runs[r["run"]][2]) for r in rows]
        page.add("<h2>Learning curves of every point</h2><p>Training accuracy per epoch (lines) and test accuracy "
                 "where measured (markers); a legend entry toggles that participant in every panel.</p>")
        page.chart(sweep_curves_figure(labelled))
    return page


# ---------------------------------------------------------------- entry points


def write_report(directory: str | Path) -> Path:
    """Write ``report.html`` into a run or sweep directory and return its path."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"{d} is not a directory")
    page = sweep_page(d) if (d / "sweep.csv").exists() else run_page(d)
    path = d / REPORT_NAME
    write_text_atomic(path, page.render())
    return path


def chart_count(page_html: str) -> int:
    """The number of chart placeholders in a written report (for tests and checks)."""
    return len(re.findall(r'<div class="chart" id="chart-\d+">', page_html))


__all__ = ["REPORT_NAME", "chart_count", "plotly_available", "read_metrics", "write_report"]
