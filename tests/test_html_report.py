"""report.html without a browser: what a run or sweep page holds, the static fallback, bad input, --version.

tests/test_report_browser.py opens the pages in a real headless browser.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ecavg import html_report
from ecavg.cli import main
from ecavg.errors import ConfigError
from ecavg.html_report import chart_count, read_metrics, write_report
from ecavg.report_charts import epoch_series

REPO = Path(__file__).resolve().parents[1]
# A real four-strategy sweep (CIFAR-10 / MobileNetV2) kept in results/: copied before a report is written into it.
PAPER_SWEEP = REPO / "results" / "cifar10_mobilenetv2" / "paper"
needs_plotly = pytest.mark.skipif(not html_report.plotly_available(), reason="plotly is not installed")


def copy_sweep(tmp_path: Path) -> Path:
    if not (PAPER_SWEEP / "sweep.csv").exists():
        pytest.skip(f"{PAPER_SWEEP} is not in this checkout")
    return Path(shutil.copytree(PAPER_SWEEP, tmp_path / "sweep"))


def table_rows(page: str, cls: str) -> list[str]:
    match = re.search(rf'<table class="[^"]*\b{cls}\b[^"]*">.*?<tbody>(.*?)</tbody>', page, re.S)
    assert match, f"no table of class {cls}"
    return re.findall(r"<tr>(.*?)</tr>", match.group(1), re.S)


def embedded_figures(page: str) -> list[dict]:
    match = re.search(r'<script type="application/json" id="ecavg-figures">(.*?)</script>', page, re.S)
    assert match, "no figures in the page"
    return json.loads(match.group(1))


def panel_axis(figure: dict, title: str) -> str:
    """The x axis name ('x', 'x2', ...) of the subplot with this title."""
    titles = [a["text"] for a in figure["layout"]["annotations"]]
    n = titles.index(title) + 1
    return "x" if n == 1 else f"x{n}"


@needs_plotly
def test_sweep_page_has_sortable_table_and_curves_of_every_point(tmp_path):
    sweep = copy_sweep(tmp_path)
    page = write_report(sweep).read_text()
    points = list(csv.DictReader((sweep / "sweep.csv").open()))
    rows = table_rows(page, "sweep")
    assert len(rows) == len(points)
    for point, row in zip(points, rows):
        assert f">{point['run']}</a>" in row  # a link to the point's results.md (or its report.html)
        total = float(point["total_s"])
        assert f'data-sort="{total}">{total:.1f}</td>' in row
    assert 'class="sortable sweep"' in page
    # plotly.js is inline; nothing is fetched when the page is viewed.
    assert "Plotly" in page and not re.search(r'src="(https?:)?//', page)

    figures = embedded_figures(page)
    assert chart_count(page) == len(figures) == 2
    summary, curves = (f["figure"] for f in figures)
    assert [t["name"] for t in summary["data"]][:2] == ["edge acc. before", "edge acc. after"]
    assert [a["text"] for a in curves["layout"]["annotations"]] == [f"strategy={p['strategy']}" for p in points]
    assert len({t.get("xaxis") for t in curves["data"]}) == len(points)  # one panel per point
    # Every training epoch of the FedAvg point is drawn: 2 edges x 8 rounds x 3 epochs.
    fedavg_axis = panel_axis(curves, "strategy=fedavg")
    drawn = sum(len(t["x"]) for t in curves["data"] if t["xaxis"] == fedavg_axis and t["mode"] == "lines")
    records = read_metrics(sweep / "strategy=fedavg" / "metrics.jsonl")
    assert drawn == sum(1 for r in records if r.get("train_accuracy") is not None) == 48


def test_static_page_without_plotly(tmp_path, monkeypatch):
    sweep = copy_sweep(tmp_path)
    monkeypatch.setattr(html_report, "plotly_available", lambda: False)
    page = write_report(sweep).read_text()
    assert "plotly is not installed" in page and 'data-charts-rendered="0"' in page
    assert "Plotly.newPlot(" not in page and chart_count(page) == 0
    assert '<img alt="sweep summary" src="data:image/png;base64,' in page
    run_page = write_report(sweep / "strategy=ecavg").read_text()
    assert '<img alt="accuracy per participant" src="data:image/png;base64,' in run_page
    assert len(table_rows(run_page, "edges")) == 2


@needs_plotly
def test_run_page_shows_extra_edge_measures_and_every_phase(tmp_path):
    run = Path(shutil.copytree(PAPER_SWEEP / "strategy=fedavg", tmp_path / "run")) if PAPER_SWEEP.exists() else None
    if run is None:
        pytest.skip(f"{PAPER_SWEEP} is not in this checkout")
    results = json.loads((run / "results.json").read_text())
    # The full-test-set figures a personalised update reports beside the own-test-data ones (issue 13).
    for i, edge in enumerate(results["edges"]):
        edge.update(accuracy_before_full=0.4 + i / 100, accuracy_after_full=0.6, kept="server")
    results["host"] = {"cpu": "Some <CPU>", "cpu_capability": "AVX512", "torch": "2.14.1"}
    (run / "results.json").write_text(json.dumps(results))
    page = write_report(run).read_text()
    assert "(Some &lt;CPU&gt;, AVX512 kernels, PyTorch 2.14.1)" in page
    assert "before (full test set)" in page and "change (full test set)" in page and "<th>kept</th>" in page
    rows = table_rows(page, "edges")
    assert len(rows) == 2 and "+20.00 pp" in rows[0] and "+19.00 pp" in rows[1]
    figures = [f["figure"] for f in embedded_figures(page)]
    assert chart_count(page) == 4
    accuracy, protocol, per_epoch, timing = figures
    assert "edge after update (full test set)" in {t["name"] for t in accuracy["data"]}
    server = next(t for t in protocol["data"] if t["name"] == "server")
    assert server["x"] == [f"round{k}" for k in range(1, 9)]
    assert {t["name"] for t in per_epoch["data"]} == {"edge-0 rounds", "edge-1 rounds"}
    assert max(max(t["x"]) for t in per_epoch["data"]) == 24  # epochs numbered across the 8 rounds
    assert "pretrain" in timing["data"][0]["y"]
    config_rows = table_rows(page, "config")
    assert len(config_rows) == len(html_report.flatten(results["config"]))


def test_unfinished_run_reports_its_curves_so_far(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": {"name": "q", "strategy": "ecavg",
                                                            "data": {"dataset": "mnist-sample"}}}))
    lines = [{"participant": "edge-0", "phase": "pretrain", "epoch": e, "train_loss": 1.0 / e,
              "train_accuracy": 0.5} for e in (1, 2)]
    # Interrupted in epoch 2 and resumed: the phase restarts, and the last line was cut short by the kill.
    lines += [{"participant": "edge-0", "phase": "pretrain", "epoch": e, "train_loss": 0.9 / e,
               "train_accuracy": 0.6} for e in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + '\n{"participant": "ed')
    records = read_metrics(run / "metrics.jsonl")
    assert len(records) == 5
    series = epoch_series(records)
    assert [(r["x"], r["train_accuracy"]) for r in series[("edge-0", "pretrain")]] == [(1, 0.6), (2, 0.6), (3, 0.6)]
    page = write_report(run).read_text()
    assert "q: ecavg on mnist-sample (unfinished)" in page and "ecavg run --resume" in page


def test_bad_directory_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="not a directory"):
        write_report(tmp_path / "missing")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not an ecavg run directory" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "sweep.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="no 'run' column"):
        write_report(tmp_path)


def test_version_does_not_import_torch():
    code = ("import sys\nfrom ecavg.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    import ecavg

    assert out.splitlines() == [f"ecavg {ecavg.__version__}", "False"]


def test_run_with_no_report_skips_it_and_a_failing_report_only_warns(tmp_path, monkeypatch, capsys):
    import ecavg.cli as cli

    monkeypatch.setattr(html_report, "write_report", lambda d: pytest.fail("--no-report wrote a report"))
    out = tmp_path / "run"
    code = main(["run", "--config", str(REPO / "configs" / "quickstart.toml"), "--output", str(out), "--no-report",
                 "--set", "data.train_fraction=0.1", "--set", "model.hidden=16", "--set", "edge.epochs=1",
                 "--set", "server.epochs=1", "--set", "eval_each_epoch=false"])
    assert code == 0 and (out / "results.json").exists() and not (out / "report.html").exists()
    assert "report.html" not in capsys.readouterr().out

    def broken(directory):
        raise ValueError("bad figure")

    monkeypatch.setattr(html_report, "write_report", broken)
    assert cli.write_report_or_warn(out) is False  # the finished run keeps exit code 0; the user is told what to run
    assert f"report.html not written (ValueError: bad figure); try `ecavg report {out}`" in capsys.readouterr().err
