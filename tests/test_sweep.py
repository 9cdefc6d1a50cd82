import csv
import json
import re
from pathlib import Path

import pytest

from ecavg.cli import main
from ecavg.config import ConfigError
from ecavg.sweep import parse_grid, split_values

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.toml"


def test_split_values_respects_brackets_and_quotes():
    assert split_values("1,2.5,x") == ["1", "2.5", "x"]
    assert split_values("[0.5, 0.5],[0.7, 0.3]") == ["[0.5, 0.5]", "[0.7, 0.3]"]
    assert split_values('"a,b",c') == ['"a,b"', "c"]
    with pytest.raises(ConfigError):
        split_values("1,,2")


def test_parse_grid_errors():
    assert parse_grid(["data.alpha=1,0.1"]) == [("data.alpha", ["1", "0.1"])]
    with pytest.raises(ConfigError):
        parse_grid(["data.alpha"])
    with pytest.raises(ConfigError):
        parse_grid(["seed=1", "seed=2"])


def test_sweep_runs_grid_over_seeds_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    args = ["sweep", "--config", str(QUICKSTART), "--output", str(out), "--set", "data.train_fraction=0.2",
            "--set", "model.hidden=32", "--set", "edge.epochs=1", "--set", "server.epochs=1",
            "--set", "eval_each_epoch=false", "--grid", "strategy=ecavg,local", "--grid", "seed=0,1"]
    assert main(args) == 0
    table = (out / "sweep.md").read_text()
    assert "| ecavg | 2 |" in table and "| local | 2 |" in table and "±" in table
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == 4 and {r["strategy"] for r in rows} == {"ecavg", "local"}
    assert all(float(r["edge_before"]) > 0.5 for r in rows)
    assert all(r["edge_after"] == "" for r in rows if r["strategy"] == "local")
    assert (out / "sweep.png").stat().st_size > 0
    report = (out / "report.html").read_text()  # written by `ecavg sweep` at the end
    assert "Mean ± std over seeds" in report and len(re.findall(r'<td><a href="[^"]+/results.md">', report)) == 4
    before = {p.name: json.loads((p / "results.json").read_text()) for p in out.iterdir() if p.is_dir()}
    assert len(before) == 4

    # A second invocation reads the finished points back instead of training again.
    import ecavg.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "run_experiment", lambda *a, **k: pytest.fail("re-ran a finished point"))
    assert main(args) == 0


def test_sweep_checks_every_point_before_running(tmp_path, capsys):
    code = main(["sweep", "--config", str(QUICKSTART), "--output", str(tmp_path / "s"),
                 "--grid", "data.partition=iid,nonsense"])
    assert code == 2
    assert "data.partition" in capsys.readouterr().err
    assert not any((tmp_path / "s").glob("*/results.json"))


def test_sweep_base_need_not_be_valid_alone(tmp_path):
    """--set pretrained=FILE is only valid with init = "pretrained", which the grid sets for every point."""
    from ecavg.core.serialization import save_state_dict
    from ecavg.models import build_model

    weights = tmp_path / "start.safetensors"
    save_state_dict(weights, build_model("mlp", num_classes=10, in_channels=1, image_size=28,
                                         options={"hidden": 32}).state_dict())
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(QUICKSTART), "--output", str(out), "--set", "data.train_fraction=0.2",
                 "--set", "model.hidden=32", "--set", "edge.epochs=1", "--set", "server.epochs=1",
                 "--set", f"pretrained={weights}", "--grid", "init=pretrained", "--grid", "strategy=ecavg,local"]) == 0
    assert "| pretrained | ecavg |" in (out / "sweep.md").read_text()
