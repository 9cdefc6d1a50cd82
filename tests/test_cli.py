"""End to end on the shipped MNIST sample: the CLI, every strategy, resume, outputs."""

import json
from pathlib import Path

import pytest
import torch
from interrupt import run_interrupted_in_finetune
from tiny_config import with_overrides

import ecavg
from ecavg.cli import main
from ecavg.core.participants import EdgeWorker
from ecavg.core.serialization import load_state_dict
from ecavg.experiment import run_experiment

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.toml"

# A small, fast variant of the quickstart: a quarter of the sample, a narrow MLP.
QUICK = {
    "seed": 1,
    "eval_each_epoch": False,
    "data": {"dataset": "mnist-sample", "train_fraction": 0.25},
    "model": {"name": "mlp", "hidden": 64},
    "edge": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    "server": {"epochs": 1, "batch_size": 32, "lr": 0.05},
}


def quick(**top) -> dict:
    return with_overrides(QUICK, **top)


def _check_contract(results):
    assert results["schema"] == 1
    for key in ("strategy", "dataset", "model", "partition", "num_edges", "edges", "server", "timing_s", "bytes",
                "config"):
        assert key in results
    assert set(results["timing_s"]) >= {"pretrain", "aggregate", "finetune", "update", "total"}
    for edge in results["edges"]:
        assert set(edge) >= {"name", "train_samples", "test_samples", "accuracy_before", "accuracy_after"}
        for k in ("accuracy_before", "accuracy_after"):
            assert edge[k] is None or 0.0 <= edge[k] <= 1.0
    for k in ("accuracy_averaged", "accuracy_finetuned"):
        assert results["server"][k] is None or 0.0 <= results["server"][k] <= 1.0


def test_cli_quickstart_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--config", str(QUICKSTART), "--output", str(out), "--set", "edge.epochs=2",
                 "--set", "server.epochs=2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "edge-0" in printed and "averaged weights" in printed
    results = json.loads((out / "results.json").read_text())
    _check_contract(results)
    assert results["strategy"] == "ecavg" and results["num_edges"] == 2
    assert results["config"]["edge"]["epochs"] == 2
    edges = results["edges"]
    assert [e["name"] for e in edges] == ["edge-0", "edge-1"]
    assert sum(e["train_samples"] for e in edges) == 4000
    assert sum(e["test_samples"] for e in edges) == 1000
    for e in edges:
        # ECAvg with a shared init: the fine-tuned global model beats each edge's own.
        assert e["accuracy_after"] > e["accuracy_before"], e
        assert e["accuracy_before"] > 0.5
    assert results["server"]["accuracy_finetuned"] > 0.8
    assert results["bytes"]["uplink"] > 0 and results["bytes"]["downlink"] > 0
    # What the numbers depend on besides the config: the CPU's kernels and PyTorch (bit-for-bit only on the same).
    assert results["host"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert results["host"]["torch"] == torch.__version__
    for name in ("results.md", "accuracy.png", "metrics.jsonl", "server.safetensors", "edge-0.safetensors",
                 "edge-1.safetensors"):
        assert (out / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["participant"] for r in records} >= {"edge-0", "edge-1", "server"}
    assert all("train_loss" in r for r in records if r["phase"] == "pretrain")
    server = load_state_dict(out / "server.safetensors")
    assert torch.equal(server["classifier.weight"], load_state_dict(out / "edge-1.safetensors")["classifier.weight"])


@pytest.mark.parametrize("strategy", ["local", "centralized", "fedavg"])
def test_baseline_strategies(tmp_path, strategy):
    results = run_experiment(quick(strategy=strategy, fedavg={"rounds": 2}), output_dir=tmp_path / strategy)
    _check_contract(results)
    edges, server = results["edges"], results["server"]
    if strategy == "local":
        assert all(e["accuracy_before"] > 0.5 and e["accuracy_after"] is None for e in edges)
        assert server == {"accuracy_averaged": None, "accuracy_finetuned": None}
        assert not (tmp_path / strategy / "server.safetensors").exists()
        assert (tmp_path / strategy / "edge-0.safetensors").exists()
    if strategy == "centralized":
        assert all(e["accuracy_before"] is None and e["accuracy_after"] > 0.5 for e in edges)
        assert server["accuracy_averaged"] is None and server["accuracy_finetuned"] > 0.5
    if strategy == "fedavg":
        assert all(e["accuracy_before"] > 0.5 and e["accuracy_after"] > 0.5 for e in edges)
        assert server["accuracy_averaged"] > 0.5 and server["accuracy_finetuned"] is None
        # Two rounds: the global model goes down to each edge twice and once more for the update.
        assert results["bytes"]["downlink"] > results["bytes"]["uplink"]


def test_same_seed_same_results(tmp_path):
    a = run_experiment(quick(), output_dir=tmp_path / "a")
    b = run_experiment(quick(), output_dir=tmp_path / "b")
    assert a["edges"] == b["edges"] and a["server"] == b["server"]


@pytest.mark.slow
def test_independent_inits_and_bn_recalibration(tmp_path):
    results = run_experiment(quick(shared_init=False), output_dir=tmp_path / "indep")
    assert results["edges"][0]["accuracy_before"] > 0.5
    cnn = quick(bn_recalibration=True, model={"name": "cnn", "width": 8})
    del cnn["model"]["hidden"]
    results = run_experiment(cnn, output_dir=tmp_path / "bn")
    assert "accuracy_averaged_before_bn_recalibration" in results["server"]


def test_resume_skips_finished_phases(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_interrupted_in_finetune(monkeypatch, quick(), out)
    assert (out / "checkpoints" / "averaged.json").exists()
    assert not (out / "results.json").exists()

    # A killed atomic write leaves its temporary file behind; the resume removes it.
    (out / "checkpoints" / ".finetune.safetensors.123.tmp").write_bytes(b"partial")

    def must_not_train(self, *args, **kwargs):
        raise AssertionError("a finished edge was trained again on resume")

    monkeypatch.setattr(EdgeWorker, "fit", must_not_train)
    assert main(["run", "--resume", str(out)]) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert all(e["accuracy_after"] is not None for e in resumed["edges"])
    assert resumed["timing_s"]["pretrain"] > 0
    assert not list((out / "checkpoints").glob(".*.tmp"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["participant"], r["phase"], r.get("epoch")) for r in records]
    assert len(keys) == len(set(keys)), "a phase's metrics were written twice"
    assert {"aggregate", "finetune", "update"} <= {r["phase"] for r in records}


def test_output_dir_of_an_existing_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    run_experiment(quick(), output_dir=out)
    assert main(["run", "--config", str(QUICKSTART), "--output", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_cli_rejects_bad_config_with_named_key(tmp_path, capsys):
    assert main(["run", "--config", str(QUICKSTART), "--output", str(tmp_path / "x"), "--set", "edge.lr=-1"]) == 2
    assert "edge.lr" in capsys.readouterr().err
    assert main(["run", "--config", str(QUICKSTART), "--output", str(tmp_path / "y"), "--set", "model.name=nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_cli_reports_missing_data(tmp_path, capsys):
    code = main(["run", "--config", str(QUICKSTART), "--output", str(tmp_path / "x"), "--set", "data.dataset=mnist",
                 "--data-dir", str(tmp_path / "empty")])
    assert code == 2
    assert "mnist" in capsys.readouterr().err


def test_python_api_average_state_dicts():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(8)}
    avg = ecavg.average_state_dicts([a, b], [1, 3])
    assert torch.allclose(avg["w"], torch.tensor([2.5, 5.0]))
    assert avg["n"].dtype == torch.int64


def test_pretrained_init_loads_body_and_replaces_head(tmp_path):
    from ecavg.models import build_model

    source = build_model("mlp", num_classes=5, in_channels=1, image_size=28, options={"hidden": 64})
    torch.save(source.state_dict(), tmp_path / "other-task.pth")
    out = tmp_path / "run"
    results = run_experiment(quick(init="pretrained", pretrained=str(tmp_path / "other-task.pth"), strategy="local"),
                             output_dir=out)
    init = load_state_dict(out / "checkpoints" / "init.safetensors")
    assert torch.equal(init["hidden.weight"], source.state_dict()["hidden.weight"])
    assert init["classifier.weight"].shape == (10, 64)  # head replaced: 5 classes there, 10 here
    assert results["edges"][0]["accuracy_before"] > 0.5


def test_missing_pretrained_file_is_a_clear_error(tmp_path, capsys):
    code = main(["run", "--config", str(QUICKSTART), "--output", str(tmp_path / "x"), "--set", "init=pretrained",
                 "--set", f"pretrained={json.dumps(str(tmp_path / 'nope.pth'))}"])
    assert code == 2
    assert "nope.pth" in capsys.readouterr().err


def test_warmup_init_trains_the_shared_start(tmp_path):
    out = tmp_path / "run"
    run_experiment(quick(init="warmup", warmup={"epochs": 1, "data_fraction": 0.5}, strategy="local"), output_dir=out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    warmup = [r for r in records if r["phase"] == "warmup"]
    assert len(warmup) == 1 and warmup[0]["participant"] == "server" and warmup[0]["test_accuracy"] > 0.5
