"""Live tracking (tracking.backend): what TensorBoard's and MLflow's own readers see equals metrics.jsonl.

Each backend test interrupts a run after the server's first fine-tuning epoch was logged, then resumes it: the
tracker must have logged live, and after the resume hold exactly metrics.jsonl (the interrupted epoch once).
Run with OMP_NUM_THREADS=1 on small machines; the backend tests skip when `ecavg[tracking]` is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest

from ecavg.config import resolve_config
from ecavg.errors import ConfigError
from ecavg.experiment import run_experiment
from ecavg.runtime.setup import RunDirectory
from ecavg.tracking import INSTALL_HINT, MlflowTracker, Tracker, require_backend, result_scalars

# A few hundred MNIST-sample digits, a narrow MLP, two server epochs (the interruption falls between them).
TINY = {
    "name": "tracktest",
    "seed": 2,
    "data": {"dataset": "mnist-sample", "train_fraction": 0.1},
    "model": {"name": "mlp", "hidden": 16},
    "edge": {"epochs": 2, "batch_size": 32},
    "server": {"epochs": 2, "batch_size": 32},
}


def tiny(**tracking):
    cfg = json.loads(json.dumps(TINY))
    cfg["tracking"] = tracking
    return cfg


def have(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed ({INSTALL_HINT})")


def expected_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every numeric field of metrics.jsonl as tag -> [(step, value)], written out independently of ecavg."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for field, value in record.items():
            if field in ("participant", "phase", "epoch") or isinstance(value, bool) or \
                    not isinstance(value, (int, float)):
                continue
            tag = f"{record['participant']}/{record['phase']}/{field}"
            out.setdefault(tag, []).append((record.get("epoch", 0), float(value)))
    return out


def same_float32(events, expected) -> bool:
    """TensorBoard's (step, value) events equal (step, value) pairs; event files hold float32."""
    got = [(e.step, e.value) for e in events]
    return [s for s, _ in got] == [s for s, _ in expected] and \
        [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)


def run_interrupted_then_resumed(cfg, out: Path, monkeypatch, between) -> dict:
    """Stop the run right after the server's first fine-tuning epoch is written, call ``between()``, resume."""
    real_emit = RunDirectory.emit

    def emit_then_stop(self, record):
        real_emit(self, record)
        if record.get("phase") == "finetune" and record.get("epoch") == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDirectory, "emit", emit_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, output_dir=out)
    monkeypatch.setattr(RunDirectory, "emit", real_emit)
    between()
    return run_experiment(resume=out)


def test_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"tracking.backend.*none, tensorboard, mlflow"):
        resolve_config({"tracking": {"backend": "wandb"}})
    with pytest.raises(ConfigError, match="tracking.dir"):
        resolve_config({"tracking": {"dir": 3}})


def test_missing_package_is_a_config_error_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(MlflowTracker, "requires", ("mlflow", "ecavg_no_such_module"))
    cfg = tiny(backend="mlflow")
    with pytest.raises(ConfigError) as error:
        require_backend(resolve_config(cfg))
    assert "ecavg_no_such_module" in str(error.value) and INSTALL_HINT in str(error.value)
    with pytest.raises(ConfigError, match="ecavg_no_such_module"):
        run_experiment(cfg, output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    require_backend(resolve_config(tiny(backend="none")))  # needs nothing


def test_results_are_named_by_edge_and_figure():
    results = {"schema": 1, "config": {"seed": 0}, "output_dir": "x", "runtime": "embedded",
               "edges": [{"name": "edge-0", "accuracy_before": 0.5, "accuracy_after": 0.75, "test_samples": 10}],
               "server": {"accuracy_averaged": 0.25, "accuracy_finetuned": None}, "bytes": {"uplink": 7}}
    assert result_scalars(results) == {"results/edges/edge-0/accuracy_before": 0.5,
                                       "results/edges/edge-0/accuracy_after": 0.75,
                                       "results/edges/edge-0/test_samples": 10.0,
                                       "results/server/accuracy_averaged": 0.25, "results/bytes/uplink": 7.0}


def test_a_failing_backend_is_warned_about_once_and_the_run_goes_on(tmp_path, caplog):
    class Broken(Tracker):
        name = "broken"
        calls = 0

        def write_scalars(self, values, step):
            Broken.calls += 1
            raise OSError("disk full")

    tracker = Broken(resolve_config({}))
    tracker.start(resolve_config({}), tmp_path)
    with caplog.at_level(logging.WARNING, logger="ecavg"):
        for epoch in (1, 2):
            tracker.log({"participant": "edge-0", "phase": "pretrain", "epoch": epoch, "train_loss": 1.0})
        tracker.finish({"server": {"accuracy_averaged": 0.5}})
    assert Broken.calls == 1
    assert [r.getMessage() for r in caplog.records if "tracking" in r.getMessage()] == [
        "tracking (broken) stopped: OSError: disk full; the run continues, metrics.jsonl has every record"]


@have("tensorboard")
def test_tensorboard_holds_metrics_jsonl_hparams_and_results(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    out = tmp_path / "run"

    def read():
        acc = EventAccumulator(str(out / "tracking"), size_guidance={"scalars": 0})
        acc.Reload()
        return acc

    def logged_live():
        acc = read()
        tag = "server/finetune/train_loss"
        assert same_float32(acc.Scalars(tag), expected_scalars(out)[tag])

    results = run_interrupted_then_resumed(tiny(backend="tensorboard"), out, monkeypatch, logged_live)
    acc = read()
    expected = expected_scalars(out)
    assert len(expected["server/finetune/train_loss"]) == 2 and expected["edge-1/pretrain/test_accuracy"]
    tags = set(acc.Tags()["scalars"])
    assert {t for t in tags if not t.startswith("results/")} == set(expected)
    for tag, values in expected.items():
        assert same_float32(acc.Scalars(tag), values), tag
    for edge in results["edges"]:
        for figure in ("accuracy_before", "accuracy_after"):
            [event] = acc.Scalars(f"results/edges/{edge['name']}/{figure}")
            assert event.value == pytest.approx(edge[figure], rel=1e-6)
    [event] = acc.Scalars("results/bytes/uplink")
    assert event.value == pytest.approx(results["bytes"]["uplink"], rel=1e-6)
    plugin = {tag: HParamsPluginData.FromString(content)
              for tag, content in acc.PluginTagToContent("hparams").items()}
    hparams = plugin["_hparams_/session_start_info"].session_start_info.hparams
    assert hparams["edge.epochs"].number_value == 2 and hparams["model.name"].string_value == "mlp"
    assert hparams["tracking.backend"].string_value == "tensorboard"
    assert "_hparams_/session_end_info" in plugin


@pytest.mark.slow
@have("mlflow", "sqlalchemy", "alembic")
def test_mlflow_holds_metrics_jsonl_params_and_results(tmp_path, monkeypatch):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    out, store = tmp_path / "run", tmp_path / "shared-store"
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")

    def runs():
        experiment = client.get_experiment_by_name("tracktest")  # the config's name
        return client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL)

    def logged_live():
        [run] = runs()
        assert run.info.status == "KILLED" and run.info.run_name == "run"
        history = client.get_metric_history(run.info.run_id, "server/finetune/train_loss")
        assert [(m.step, m.value) for m in history] == expected_scalars(out)["server/finetune/train_loss"]

    results = run_interrupted_then_resumed(tiny(backend="mlflow", dir=str(store)), out, monkeypatch, logged_live)
    # The interrupted MLflow run is deleted; the resumed run replayed metrics.jsonl and went on.
    [old, new] = sorted(runs(), key=lambda r: r.info.start_time)
    assert old.info.lifecycle_stage == "deleted" and new.info.lifecycle_stage == "active"
    assert new.info.status == "FINISHED"
    expected = expected_scalars(out)
    assert len(expected["server/finetune/train_loss"]) == 2
    assert {t for t in new.data.metrics if not t.startswith("results/")} == set(expected)
    for tag, values in expected.items():
        history = client.get_metric_history(new.info.run_id, tag)
        assert sorted((m.step, m.value) for m in history) == sorted(values), tag
    for edge in results["edges"]:
        assert new.data.metrics[f"results/edges/{edge['name']}/accuracy_after"] == edge["accuracy_after"]
    assert new.data.metrics["results/server/accuracy_finetuned"] == results["server"]["accuracy_finetuned"]
    assert new.data.metrics["results/timing_s/total"] == results["timing_s"]["total"]
    params = new.data.params
    assert params["edge.epochs"] == "2" and params["data.dataset"] == "mnist-sample"
    assert params["tracking.dir"] == str(store)
    [artifact] = client.list_artifacts(new.info.run_id)
    assert artifact.path == "results.json"
