"""scripts/build_docs.py: result documents rendered from real (tiny) runs, and the committed docs up to date."""

import importlib.util
import json
from pathlib import Path

import pytest

from ecavg.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = REPO_ROOT / "configs" / "quickstart.toml"


def load_build_docs():
    spec = importlib.util.spec_from_file_location("build_docs", REPO_ROOT / "scripts" / "build_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    out = root / "results" / "tiny"
    assert main(["sweep", "--config", str(QUICKSTART), "--output", str(out), "--set", "data.train_fraction=0.2",
                 "--set", "model.hidden=32", "--set", "edge.epochs=1", "--set", "server.epochs=1",
                 "--grid", "strategy=ecavg,centralized,local", "--grid", "seed=0,1"]) == 0
    return root


def results_of(root, run):
    return json.loads((root / "results" / "tiny" / run / "results.json").read_text())


@pytest.mark.slow
def test_renders_every_directive_from_the_runs(tiny_sweep, monkeypatch):
    build_docs = load_build_docs()
    monkeypatch.setattr(build_docs, "REPO_ROOT", tiny_sweep)
    # The strategies table reads DIR/strategy=*; give it one seed's runs under those names.
    strategies = tiny_sweep / "results" / "by_strategy"
    for name in ("ecavg", "centralized", "local"):
        (strategies / f"strategy={name}").mkdir(parents=True, exist_ok=True)
        for f in ("results.json", "metrics.jsonl"):
            src = tiny_sweep / "results" / "tiny" / f"strategy={name},seed=0" / f
            (strategies / f"strategy={name}" / f).write_bytes(src.read_bytes())
    source = tiny_sweep / "docs" / "src" / "doc.md"
    source.parent.mkdir(parents=True)
    source.write_text(
        "# Title\n"
        "@@strategies results/by_strategy paper_before=38.86 paper_after=81.16\n"
        "@@sweep results/tiny\n"
        "@@config results/tiny/strategy=ecavg,seed=0\n"
        "@@curve results/tiny/strategy=ecavg,seed=0 docs/img/curve.png\n"
        "after {{acc results/tiny/strategy=ecavg,seed=0 edge_after}}, "
        "gain {{pp results/tiny/strategy=ecavg,seed=0 server_finetuned results/tiny/strategy=centralized,seed=0 "
        "server_finetuned}}\n"
    )
    text = build_docs.render(source)

    ecavg = results_of(tiny_sweep, "strategy=ecavg,seed=0")
    central = results_of(tiny_sweep, "strategy=centralized,seed=0")
    gain = 100 * (ecavg["server"]["accuracy_finetuned"] - central["server"]["accuracy_finetuned"])
    after = 100 * sum(e["accuracy_after"] for e in ecavg["edges"]) / len(ecavg["edges"])
    assert "| paper (ECAvg) | 38.86 | 81.16 |" in text
    assert f"**What ECAvg adds** (fine-tuned server from the averaged weights minus the centralized server, same " \
           f"server epochs): **{gain:+.2f} pp**." in text
    assert f"after {after:.2f}%, gain {gain:+.2f} pp" in text
    # One sweep row per strategy, two seeds each, with a spread.
    rows = [line for line in text.splitlines() if line.startswith("| ecavg |") or line.startswith("| local |")]
    assert len(rows) == 2 and all("| 2 |" in r and "±" in r for r in rows)
    assert "- model: `mlp` (hidden 32)" in text
    assert (tiny_sweep / "docs" / "img" / "curve.png").stat().st_size > 0
    assert "![training curves of results/tiny/strategy=ecavg,seed=0](img/curve.png)" in text


@pytest.mark.slow
def test_missing_run_and_bad_directive_are_named(tiny_sweep, monkeypatch):
    build_docs = load_build_docs()
    monkeypatch.setattr(build_docs, "REPO_ROOT", tiny_sweep)
    source = tiny_sweep / "docs" / "src" / "bad.md"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text("{{acc results/nowhere edge_after}}\n")
    with pytest.raises(build_docs.DocError, match="results/nowhere"):
        build_docs.render(source)
    source.write_text("{{acc results/tiny/strategy=local,seed=0 server_finetuned}}\n")
    with pytest.raises(build_docs.DocError, match="has no server_finetuned"):
        build_docs.render(source)
    source.write_text("@@table x\n")
    with pytest.raises(build_docs.DocError, match="unknown directive @@table"):
        build_docs.render(source)


def test_committed_documents_match_their_results():
    """docs/*.md built from docs/src and results/ must be what is committed: nothing typed in by hand."""
    build_docs = load_build_docs()
    if not any((REPO_ROOT / "docs" / "src").glob("*.md")):
        pytest.skip("no generated documents yet")
    assert build_docs.main(["--check"]) == 0
