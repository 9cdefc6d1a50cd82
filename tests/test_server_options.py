"""The server-side options (ECAvg+): aggregation = "match" and "match_activations", server.objective = "distill",
server_data_fraction."""


import pytest
import torch
from interrupt import run_interrupted_in_finetune
from tiny_config import with_overrides

from ecavg.config import ConfigError, resolve_config
from ecavg.core.participants import ServerWorker
from ecavg.experiment import run_experiment

QUICK = {
    "seed": 3,
    "eval_each_epoch": False,
    "threads": 1,
    "data": {"dataset": "mnist-sample", "train_fraction": 0.5},
    "model": {"name": "mlp", "hidden": 64},
    "edge": {"epochs": 2, "batch_size": 32, "lr": 0.05},
    "server": {"epochs": 1, "batch_size": 32, "lr": 0.05},
}


def quick(**top) -> dict:
    return with_overrides(QUICK, **top)


def test_matched_average_beats_the_plain_one_from_independent_inits(tmp_path):
    plain = run_experiment(quick(shared_init=False), output_dir=tmp_path / "plain")
    matched = run_experiment(quick(shared_init=False, aggregation="match"), output_dir=tmp_path / "match")
    # Same edges (the aggregation happens after pre-training), so the difference is the alignment alone.
    assert [e["accuracy_before"] for e in plain["edges"]] == [e["accuracy_before"] for e in matched["edges"]]
    assert matched["server"]["accuracy_averaged"] > plain["server"]["accuracy_averaged"] + 0.01


def test_activation_matching_beats_the_plain_average_and_reads_only_its_share_of_images(tmp_path, monkeypatch):
    from ecavg.core import aggregation

    seen = []
    real = aggregation.match_activations

    def spy(spec, reference, other, batches):
        batches = list(batches)
        seen.append(sum(len(b) for b in batches))
        return real(spec, reference, other, batches)

    monkeypatch.setattr(aggregation, "match_activations", spy)
    plain = run_experiment(quick(shared_init=False), output_dir=tmp_path / "plain")
    matched = run_experiment(quick(shared_init=False, aggregation="match_activations", matching={"samples": 500}),
                             output_dir=tmp_path / "match")
    assert [e["accuracy_before"] for e in plain["edges"]] == [e["accuracy_before"] for e in matched["edges"]]
    assert matched["server"]["accuracy_averaged"] > plain["server"]["accuracy_averaged"] + 0.01
    assert seen == [500]  # one edge matched to the reference, on 500 of the server's images


@pytest.mark.parametrize("aggregation", ["match", "match_activations"])
def test_matching_refuses_a_model_it_cannot_permute(aggregation):
    with pytest.raises(ConfigError, match=f"aggregation = \"{aggregation}\".*shufflenet"):
        resolve_config({"aggregation": aggregation, "model": {"name": "shufflenet_v2_x0_5"}})


def test_activation_matching_needs_server_data():
    with pytest.raises(ConfigError, match="strategy = \"fedavg\" gives the server none"):
        resolve_config({"aggregation": "match_activations", "strategy": "fedavg"})
    with pytest.raises(ConfigError, match="server_data_fraction = 0 .* aggregation = \"match_activations\" uses it"):
        resolve_config({"aggregation": "match_activations", "server_data_fraction": 0})
    with pytest.raises(ConfigError, match="matching.samples"):
        resolve_config({"aggregation": "match_activations", "matching": {"samples": 0}})


def test_distillation_reports_its_teacher_and_trains_with_the_kl_term(tmp_path, monkeypatch):
    losses = []
    real_train = ServerWorker.train

    def spy(self, *args, **kwargs):
        losses.append(kwargs.get("loss"))
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(ServerWorker, "train", spy)
    results = run_experiment(quick(server={"objective": "distill", "temperature": 2.0}), output_dir=tmp_path / "d")
    ensemble = results["server"]["accuracy_ensemble"]
    assert 0.5 < ensemble <= 1.0
    assert losses and losses[-1] is not None and losses[-1].__self__.name == "distill"
    logits, targets = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    objective = losses[-1].__self__
    # With distill_weight = 0 the loss is plain cross-entropy; with 1 it is the KL term alone (0 for a perfect copy).
    objective._weight = 0.0
    assert torch.allclose(objective.loss(logits, torch.zeros(4, 1, 28, 28), targets),
                          torch.nn.functional.cross_entropy(logits, targets))


def test_distillation_needs_edge_models():
    with pytest.raises(ConfigError, match="strategy = \"centralized\" has none"):
        resolve_config({"strategy": "centralized", "server": {"objective": "distill"}})


def test_server_data_fraction_gives_the_server_a_stratified_share(tmp_path, monkeypatch):
    seen = []
    real_train = ServerWorker.train

    def spy(self, weights, data, **kwargs):
        seen.append(data)
        return real_train(self, weights, data, **kwargs)

    monkeypatch.setattr(ServerWorker, "train", spy)
    results = run_experiment(quick(server_data_fraction=0.1), output_dir=tmp_path / "tenth")
    union = seen[-1]
    total = sum(e["train_samples"] for e in results["edges"])
    assert abs(len(union) - 0.1 * total) <= 10  # rounded per class and edge
    assert set(union.labels.tolist()) == set(range(10))


def test_server_data_fraction_zero_is_one_shot_averaging(tmp_path, monkeypatch):
    def must_not_train(self, *args, **kwargs):
        raise AssertionError("the server trained without data")

    monkeypatch.setattr(ServerWorker, "train", must_not_train)
    results = run_experiment(quick(server_data_fraction=0.0), output_dir=tmp_path / "none")
    assert results["server"]["accuracy_finetuned"] is None
    assert results["server"]["accuracy_averaged"] is not None
    assert all(e["accuracy_after"] is not None for e in results["edges"])


@pytest.mark.parametrize("extra", [{"strategy": "centralized"}, {"bn_recalibration": True},
                                   {"init": "warmup"}])
def test_server_data_fraction_zero_refuses_what_needs_server_data(extra):
    with pytest.raises(ConfigError, match="server_data_fraction = 0"):
        resolve_config({"server_data_fraction": 0, **extra})


def test_options_lists_activation_matching_with_its_key_and_aligned_summaries(capsys):
    from ecavg.cli import main

    assert main(["options"]) == 0
    lines = capsys.readouterr().out.splitlines()
    plain = next(line for line in lines if line.startswith("  average "))
    matched = next(line for line in lines if line.startswith("  match_activations "))
    assert plain.index("average weighted") == matched.index("permute each")  # the summaries start in one column
    assert any("matching.samples = 5000" in line for line in lines)


def test_resume_of_an_ecavg_plus_run_redoes_none_of_its_finished_steps(tmp_path, monkeypatch):
    """Interrupted in the server's fine-tuning, a run with the warm-up, activation matching, distillation and a
    server share resumes without warming up, training an edge or matching again, and ends as an uninterrupted
    run does."""
    from ecavg.core import aggregation
    from ecavg.core.participants import EdgeWorker

    config = quick(init="warmup", aggregation="match_activations", matching={"samples": 200},
                   server_data_fraction=0.5, server={"objective": "distill"})
    whole = run_experiment(config, output_dir=tmp_path / "whole")
    run_interrupted_in_finetune(monkeypatch, config, tmp_path / "run")
    real_train = ServerWorker.train

    def only_finetune(self, *args, **kwargs):
        assert kwargs.get("phase") == "finetune", f"the {kwargs.get('phase')} step ran again on resume"
        return real_train(self, *args, **kwargs)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished step ran again on resume")

    monkeypatch.setattr(ServerWorker, "train", only_finetune)
    monkeypatch.setattr(EdgeWorker, "fit", must_not_run)
    monkeypatch.setattr(aggregation, "match_activations", must_not_run)
    resumed = run_experiment(resume=tmp_path / "run")
    assert resumed["server"] == whole["server"]  # the ensemble's accuracy included: the edges' models were kept
    assert [e["accuracy_after"] for e in resumed["edges"]] == [e["accuracy_after"] for e in whole["edges"]]
