"""Bad input to the CLI: one line on stderr naming the problem, exit status 2, and nothing written."""

import json
from pathlib import Path

import pytest

from ecavg.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.toml"
SMALL = ["--set", "data.train_fraction=0.25", "--set", "edge.epochs=1", "--set", "server.epochs=1",
         "--set", "eval_each_epoch=false"]


def _run(argv, capsys):
    status = main(argv)
    err = capsys.readouterr().err.strip()
    return status, err


def _files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


BAD_SETTINGS = {
    "more edges than samples": (["--set", "data.num_edges=5000"], "data.partition"),
    "labels_per_edge above the class count": (["--set", "data.partition=shards", "--set", "data.labels_per_edge=11"],
                                              "labels_per_edge"),
    "a ratio share that leaves an edge empty": (["--set", "data.partition=ratio", "--set", "data.num_edges=2",
                                                 "--set", "data.ratios=[0.9999,0.0001]"], "without samples"),
    "a Dirichlet draw that leaves an edge without test data": (
        ["--set", "data.partition=dirichlet", "--set", "data.alpha=0.01", "--set", "data.num_edges=8",
         "--set", "data.train_fraction=1.0"], "no test samples"),
    "cuda without a GPU": (["--set", "device=cuda"], "device"),
    "a device that is no device": (["--set", 'device="cuda:x"'], "device"),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_bad_setting_is_one_line_and_leaves_nothing(case, tmp_path, capsys):
    extra, named = BAD_SETTINGS[case]
    if case == "cuda without a GPU":
        torch = pytest.importorskip("torch")
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    status, err = _run(["run", "--config", str(QUICKSTART), "--output", str(out), *SMALL, *extra], capsys)
    assert status == 2, err
    assert err.startswith("ecavg: error: ") and "\n" not in err and named in err, err
    assert _files_under(out) == []


def test_directory_as_config(tmp_path, capsys):
    status, err = _run(["run", "--config", str(tmp_path), "--output", str(tmp_path / "out")], capsys)
    assert status == 2 and "is a directory" in err and "\n" not in err


def test_existing_file_as_output(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("mine")
    status, err = _run(["run", "--config", str(QUICKSTART), "--output", str(target), *SMALL], capsys)
    assert status == 2 and "is a file" in err
    assert target.read_text() == "mine"


def test_unwritable_output(tmp_path, capsys):
    status, err = _run(["run", "--config", str(QUICKSTART), "--output", "/dev/null/run", *SMALL], capsys)
    assert status == 2 and "/dev/null" in err and "\n" not in err


def test_non_empty_directory_that_is_not_a_run_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    status, err = _run(["run", "--config", str(QUICKSTART), "--output", str(tmp_path), *SMALL], capsys)
    assert status == 2 and "not empty" in err
    assert _files_under(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize("content", ["{not json", json.dumps({"config": {"strategy": "nope"}}), json.dumps([1, 2])])
def test_corrupt_config_json_under_resume(content, tmp_path, capsys):
    (tmp_path / "config.json").write_text(content)
    status, err = _run(["run", "--resume", str(tmp_path)], capsys)
    assert status == 2 and "cannot resume" in err and "\n" not in err


def test_corrected_command_runs_after_a_bad_one(tmp_path, capsys):
    out = tmp_path / "out"
    status, _ = _run(["run", "--config", str(QUICKSTART), "--output", str(out), *SMALL, "--set", "data.num_edges=5000"],
                     capsys)
    assert status == 2
    status, err = _run(["run", "--config", str(QUICKSTART), "--output", str(out), *SMALL], capsys)
    assert status == 0, err
    assert (out / "results.json").is_file()
