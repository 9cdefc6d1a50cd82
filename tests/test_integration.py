"""ECAvg on the full real MNIST (skipped when ../shared/datasets is absent)."""

import pytest

from ecavg.experiment import run_experiment


@pytest.mark.integration
def test_ecavg_on_full_mnist(shared_datasets, tmp_path):
    if not (shared_datasets / "mnist").is_dir():
        pytest.skip("no mnist/ in the shared datasets")
    cfg = {
        "eval_each_epoch": False,
        "data": {"dataset": "mnist", "train_fraction": 0.2},
        "model": {"name": "mlp", "hidden": 100},
        "edge": {"epochs": 1, "batch_size": 64},
        "server": {"epochs": 1, "batch_size": 64},
    }
    results = run_experiment(cfg, data_dir=shared_datasets, output_dir=tmp_path / "run")
    edges = results["edges"]
    assert [e["train_samples"] for e in edges] == [6000, 6000]
    assert sum(e["test_samples"] for e in edges) == 10000
    assert all(e["accuracy_after"] > e["accuracy_before"] > 0.85 for e in edges)
    assert results["server"]["accuracy_finetuned"] > 0.9
