"""report.html in a real headless browser (Debian's chromium; .ci/run installs it): the page's JavaScript runs
without an error, every chart is drawn, the tables have their rows, and the column sort works.

The page records errors (window errors, rejected promises, console.error) in ``data-js-errors`` on <html> and sets
``data-charts-rendered`` on <body> once plotly has drawn every chart; the DOM is read back with --dump-dom.
Screenshots are kept beside the report; with ECAVG_ARTIFACT_DIR set (CI), the run is made there to be kept.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ecavg import html_report
from ecavg.cli import main
from ecavg.html_report import chart_count, flatten, write_report

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.toml"
PAPER_SWEEP = REPO / "results" / "cifar10_mobilenetv2" / "paper"
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    if os.environ.get("ECAVG_CHROMIUM"):
        return os.environ["ECAVG_CHROMIUM"]
    return next((path for name in BROWSER_NAMES if (path := shutil.which(name))), None)


BROWSER = find_browser()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(BROWSER is None, reason="no chromium on PATH (.ci/run installs Debian's chromium with "
                                               "apt-get; or set ECAVG_CHROMIUM to a Chrome/Chromium binary)"),
    pytest.mark.skipif(not html_report.plotly_available(), reason="plotly is not installed (static report)"),
]


def headless(page: Path, profile: Path, *mode: str) -> str:
    """Run the browser on a local file until its virtual time budget is spent (all scripts done) and return
    stdout; ``mode`` is --dump-dom or --screenshot=PATH."""
    args = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={profile}", "--virtual-time-budget=30000", "--window-size=1280,2600", *mode,
            page.resolve().as_uri()]
    done = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{BROWSER} failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


def rendered_dom(page: Path, tmp_path: Path) -> str:
    dom = headless(page, tmp_path / "profile", "--dump-dom")
    assert "<body" in dom, "the browser returned no DOM"
    errors = re.search(r'data-js-errors="([^"]*)"', dom)
    assert errors is None, f"JavaScript errors in {page}: {errors.group(1)}"
    return dom


def screenshot(page: Path, tmp_path: Path) -> Path:
    shot = page.with_name("report.png")
    headless(page, tmp_path / "profile", f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    return shot


def body_rows(dom: str, cls: str) -> list[str]:
    match = re.search(rf'<table class="[^"]*\b{cls}\b[^"]*">.*?<tbody>(.*?)</tbody>', dom, re.S)
    assert match, f"no table of class {cls} in the rendered page"
    return re.findall(r"<tr>(.*?)</tr>", match.group(1), re.S)


def drawn_traces_match(html: str, dom: str) -> None:
    """Every trace of every embedded figure became an SVG group in the browser."""
    figures = json.loads(re.search(r'<script type="application/json" id="ecavg-figures">(.*?)</script>', html,
                                   re.S).group(1))
    expected = sum(len(f["figure"]["data"]) for f in figures)
    assert len(re.findall(r'<g class="trace (?:bars|scatter)', dom)) == expected


def artifact_dir(tmp_path: Path) -> Path:
    base = os.environ.get("ECAVG_ARTIFACT_DIR")
    return Path(base) if base else tmp_path


def test_report_of_a_real_quickstart_run_renders(tmp_path):
    out = artifact_dir(tmp_path) / "report-quickstart"
    shutil.rmtree(out, ignore_errors=True)
    code = main(["run", "--config", str(QUICKSTART), "--set", "edge.epochs=1", "--set", "server.epochs=1",
                 "--output", str(out)])
    assert code == 0
    page = out / "report.html"  # written by `ecavg run` itself
    html = page.read_text()
    # accuracy per participant, test accuracy through the protocol, per-epoch curves, time per phase
    assert chart_count(html) == 4

    dom = rendered_dom(page, tmp_path)
    assert re.search(r'<body[^>]* data-charts-rendered="4"', dom), "plotly did not finish drawing every chart"
    assert len(re.findall(r'class="chart js-plotly-plot"', dom)) == 4
    assert len(re.findall(r'<svg class="main-svg"', dom)) >= 4
    drawn_traces_match(html, dom)
    results = json.loads((out / "results.json").read_text())
    assert len(body_rows(dom, "edges")) == results["num_edges"] == 2
    assert len(body_rows(dom, "server")) == len(results["server"])
    assert len(body_rows(dom, "timing")) == len(results["timing_s"]) + 1
    assert len(body_rows(dom, "config")) == len(flatten(results["config"]))
    screenshot(page, tmp_path)


def test_sweep_report_renders_and_sorts_in_the_browser(tmp_path):
    if not (PAPER_SWEEP / "sweep.csv").exists():
        pytest.skip(f"{PAPER_SWEEP} is not in this checkout")
    sweep = Path(shutil.copytree(PAPER_SWEEP, artifact_dir(tmp_path) / "report-sweep", dirs_exist_ok=True))
    page = write_report(sweep)
    screenshot(page, tmp_path)
    # Two clicks on "server averaged": descending, with the points that have no value kept last.
    clicked = page.with_name("clicked.html")
    click = ('<script>const th=[...document.querySelectorAll("table.sweep th")].find(h=>h.textContent.startsWith('
             '"server averaged"));th.click();th.click();</script></body>')
    clicked.write_text(page.read_text().replace("</body>", click))
    dom = rendered_dom(clicked, tmp_path)
    assert re.search(r'<body[^>]* data-charts-rendered="2"', dom)
    assert len(re.findall(r'class="chart js-plotly-plot"', dom)) == 2
    drawn_traces_match(page.read_text(), dom)
    shown = [re.search(r">([^<>]+)</a>", row).group(1) for row in body_rows(dom, "sweep")]
    points = list(csv.DictReader((sweep / "sweep.csv").open()))
    measured = sorted((p for p in points if p["server_averaged"]), key=lambda p: -float(p["server_averaged"]))
    expected = [p["run"] for p in measured] + [p["run"] for p in points if not p["server_averaged"]]
    assert shown == expected and len(shown) == len(points)
