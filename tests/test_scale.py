"""Many edges in flat memory and disk: no model kept per edge, one running-sum checkpoint instead of K models.

Runs are tiny (a quarter of the shipped MNIST sample split among up to 8 edges, a narrow MLP, one epoch, one
thread); ``bench/run.py --sections scale`` measures the same at K = 10, 100 and 1,000 on full MNIST.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from interrupt import run_interrupted_in_finetune
from tiny_config import with_overrides

from ecavg.core import phases
from ecavg.core.averaging import StreamingAverager
from ecavg.core.participants import EdgeWorker
from ecavg.core.serialization import decode_state_dict, encode_state_dict, load_state_dict
from ecavg.errors import AggregationError
from ecavg.experiment import run_experiment

BASE = {
    "seed": 3,
    "threads": 1,
    "eval_each_epoch": False,
    "data": {"dataset": "mnist-sample", "train_fraction": 0.25, "num_edges": 6},
    "model": {"name": "mlp", "hidden": 32},
    "edge": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    "server": {"epochs": 1, "batch_size": 32, "lr": 0.05},
}


def config(**top) -> dict:
    return with_overrides(BASE, **top)


def deterministic(results: dict) -> tuple:
    return results["edges"], results["server"], results["bytes"]


def model_bytes(out: Path) -> int:
    return (out / "server.safetensors").stat().st_size


# ---------------------------------------------------------------------------------------------------
# The averager's state
# ---------------------------------------------------------------------------------------------------


def _edge(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {"w": torch.randn(4, 3, generator=g), "h": torch.randn(5, generator=g).half(),
            "d": torch.randn(2, generator=g, dtype=torch.float64), "n": torch.tensor(7 * i + 1),
            "m": torch.tensor([i, 2 * i], dtype=torch.int32), "b": torch.tensor([True, False])}


def test_averager_state_round_trip_continues_bit_for_bit():
    reference = StreamingAverager()
    for i in range(5):
        reference.add(_edge(i), 1000 + 37 * i, name=f"edge-{i}")
    first = StreamingAverager()
    for i in range(2):
        first.add(_edge(i), 1000 + 37 * i, name=f"edge-{i}")
    description, tensors = first.state()
    # Through JSON and safetensors, as the running checkpoint stores it.
    restored = StreamingAverager.from_state(json.loads(json.dumps(description)),
                                            decode_state_dict(encode_state_dict(tensors), name="checkpoint"))
    assert restored.names == ("edge-0", "edge-1") and restored.total_weight == first.total_weight
    for i in range(2, 5):
        restored.add(_edge(i), 1000 + 37 * i, name=f"edge-{i}")
    expected, got = reference.result(), restored.result()
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
    with pytest.raises(AggregationError, match="already added"):
        restored.add(_edge(0), 5, name="edge-0")


def test_averager_state_refuses_a_mismatched_checkpoint():
    averager = StreamingAverager()
    averager.add(_edge(0), 10, name="edge-0")
    description, tensors = averager.state()
    with pytest.raises(AggregationError, match="'sum/w'"):
        StreamingAverager.from_state(description, {k: v for k, v in tensors.items() if k != "sum/w"})
    with pytest.raises(AggregationError, match="unreadable description"):
        StreamingAverager.from_state({"template": [["w", [4, 3], "float32"]]}, tensors)
    with pytest.raises(AggregationError, match="nothing|no running sum"):
        StreamingAverager().state()


# ---------------------------------------------------------------------------------------------------
# Memory: an edge keeps no model after replying
# ---------------------------------------------------------------------------------------------------


def test_edges_hold_no_models_after_replying(tmp_path, monkeypatch):
    """At the last edge's update every other edge has trained and been updated, yet only a few MLPs are alive
    (the server's, the one being evaluated), not one per edge."""
    live_at_last_update: list[int] = []
    real_update = EdgeWorker.update

    def counting(self, weights):
        if self.name == "edge-7":
            gc.collect()
            live_at_last_update.append(sum(type(o).__name__ == "MLP" for o in gc.get_objects()))
        return real_update(self, weights)

    monkeypatch.setattr(EdgeWorker, "update", counting)
    run_experiment(config(data={"num_edges": 8}), output_dir=tmp_path / "run")
    assert live_at_last_update and live_at_last_update[0] <= 2, live_at_last_update


# ---------------------------------------------------------------------------------------------------
# Disk: one running sum, not K models
# ---------------------------------------------------------------------------------------------------


def test_average_checkpoints_stay_within_three_models(tmp_path):
    out = tmp_path / "run"
    run_experiment(config(), output_dir=out)
    files = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert not [f for f in files if f.startswith("pretrain__")], files  # no per-edge checkpoint
    assert sum(p.stat().st_size for p in (out / "checkpoints").iterdir()) <= 3 * model_bytes(out) + 64 * 1024
    running = out / "checkpoints" / "pretrain.running.safetensors"
    # After aggregation the running sum is released: only the six edges' records are left.
    assert load_state_dict(running) == {} and running.stat().st_size < 16 * 1024


@pytest.mark.parametrize("strategy, extra", [("local", {}), ("ecavg", {"update": {"mode": "personal"}})])
def test_runs_that_need_each_edges_weights_keep_them_per_edge(tmp_path, strategy, extra):
    out = tmp_path / "run"
    run_experiment(config(strategy=strategy, **extra), output_dir=out)
    for k in range(6):
        assert (out / "checkpoints" / f"pretrain__edge-{k}.safetensors").exists()
    assert not (out / "checkpoints" / "pretrain.running.safetensors").exists()


# ---------------------------------------------------------------------------------------------------
# Resume from the running sum
# ---------------------------------------------------------------------------------------------------


def test_resume_mid_pretraining_trains_only_the_edges_not_in_the_running_sum(tmp_path, monkeypatch):
    reference_dir = tmp_path / "reference"
    reference = run_experiment(config(), output_dir=reference_dir)

    out = tmp_path / "run"
    real_fit = EdgeWorker.fit
    trained: list[str] = []

    def interrupted(self, weights, *, phase, epochs=None):
        if self.name == "edge-3":
            raise KeyboardInterrupt
        return real_fit(self, weights, phase=phase, epochs=epochs)

    monkeypatch.setattr(EdgeWorker, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config(), output_dir=out)
    running = out / "checkpoints" / "pretrain.running.safetensors"
    assert running.exists() and not (out / "checkpoints" / "pretrain__edge-0.json").exists()

    def recording(self, weights, *, phase, epochs=None):
        trained.append(self.name)
        return real_fit(self, weights, phase=phase, epochs=epochs)

    monkeypatch.setattr(EdgeWorker, "fit", recording)
    resumed = run_experiment(resume=out)
    assert trained == ["edge-3", "edge-4", "edge-5"]  # edges 0-2 came back from the running sum
    assert deterministic(resumed) == deterministic(reference)
    assert (out / "server.safetensors").read_bytes() == (reference_dir / "server.safetensors").read_bytes()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["participant"], r["phase"], r.get("epoch")) for r in records]
    assert len(keys) == len(set(keys)), "a phase's metrics were written twice"
    assert {r["participant"] for r in records if r["phase"] == "pretrain"} == {f"edge-{k}" for k in range(6)}


def test_running_sum_is_rewritten_as_edges_reply(tmp_path, monkeypatch):
    """With a zero interval every reply rewrites the checkpoint: when edge-k starts, it holds edges 0..k-1."""
    monkeypatch.setattr(phases, "RUNNING_CHECKPOINT_INTERVAL_S", 0.0)
    out = tmp_path / "run"
    seen: list[list[str]] = []
    real_fit = EdgeWorker.fit

    def watching(self, weights, *, phase, epochs=None):
        path = out / "checkpoints" / "pretrain.running.safetensors"
        if path.exists():
            from ecavg.core.checkpoint import PhaseStore

            description, _ = PhaseStore(out / "checkpoints").load_running("pretrain", with_tensors=False)
            seen.append(sorted(description["records"]))
        else:
            seen.append([])
        return real_fit(self, weights, phase=phase, epochs=epochs)

    monkeypatch.setattr(EdgeWorker, "fit", watching)
    run_experiment(config(data={"num_edges": 4}), output_dir=out)
    assert seen == [[f"edge-{i}" for i in range(k)] for k in range(4)]


def test_resume_after_aggregation_needs_no_running_sum(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_interrupted_in_finetune(monkeypatch, config(), out)

    def must_not_train(self, *args, **kwargs):
        raise AssertionError("a finished edge was trained again on resume")

    monkeypatch.setattr(EdgeWorker, "fit", must_not_train)
    resumed = run_experiment(resume=out)
    assert all(e["accuracy_before"] is not None and e["accuracy_after"] is not None for e in resumed["edges"])
