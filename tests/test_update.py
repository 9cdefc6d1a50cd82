"""Step 5, ``[update] mode``: replace, finetune, personal and guarded, on the shipped MNIST sample.

Runs are tiny (a quarter of the sample, a narrow MLP, one epoch, one thread). The Flower tests compare a
deployment with the embedded runtime: in process (the real ServerApp and ClientApp, no network) and, marked
``deploy``, with a real SuperLink and SuperNodes, where every message runs in a fresh ClientApp process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ecavg.config import ConfigError, resolve_config
from ecavg.core.participants import EdgeWorker, ServerWorker
from ecavg.core.serialization import load_state_dict
from ecavg.core.training import TrainingSettings
from ecavg.core.update import Guarded, make_update_mode
from ecavg.data import load_dataset
from ecavg.experiment import run_experiment
from ecavg.models import MODELS, ModelSpec, batchnorm_keys, head_keys
from ecavg.runtime.setup import build_participants

BASE = {
    "seed": 1,
    "threads": 1,
    "eval_each_epoch": False,
    "data": {"dataset": "mnist-sample", "train_fraction": 0.25},
    "model": {"name": "mlp", "hidden": 64},
    "edge": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    "server": {"epochs": 1, "batch_size": 32, "lr": 0.05},
}
# Dissimilar edges: each edge holds a few classes only.
SKEWED = {"partition": "shards", "labels_per_edge": 2}


def config(**sections) -> dict:
    cfg = json.loads(json.dumps(BASE))
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict) and key != "model":  # a model: its own options
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def participants(user: dict):
    return build_participants(resolve_config(user), load_dataset("mnist-sample"), torch.device("cpu"))


def own_pretrained(out: Path, k: int) -> dict[str, torch.Tensor]:
    return load_state_dict(out / "checkpoints" / f"pretrain__edge-{k}.safetensors")


def deterministic(results: dict) -> tuple:
    """Everything in a results dict that does not depend on timing."""
    return results["edges"], results["server"], results["bytes"]


def check_figures(user: dict, results: dict, out: Path) -> None:
    """The reported accuracies are those of the written weights, on the edge's test partition and the full test set."""
    made = participants(user)
    for k, edge in enumerate(results["edges"]):
        weights = load_state_dict(out / f"edge-{k}.safetensors")
        assert made.edges[k].evaluate(weights).accuracy == edge["accuracy_after"]
        assert made.server.evaluate(weights) == edge["accuracy_after_full"]


# ---------------------------------------------------------------------------------------------------
# The four modes, embedded
# ---------------------------------------------------------------------------------------------------


def test_replace_is_the_default_and_every_edge_takes_the_server_model(tmp_path):
    default = run_experiment(config(), output_dir=tmp_path / "default")
    replace = run_experiment(config(update={"mode": "replace"}), output_dir=tmp_path / "replace")
    assert default["config"]["update"]["mode"] == "replace"
    assert deterministic(default) == deterministic(replace)
    server = (tmp_path / "default" / "server.safetensors").read_bytes()
    assert (tmp_path / "replace" / "server.safetensors").read_bytes() == server
    for k, edge in enumerate(default["edges"]):
        assert edge["update_kept"] == "server" and edge["update_train_samples"] == 0
        assert edge["weights_at_edge"] is False and edge["update_validation"] is None
        assert edge["accuracy_after_full"] == default["server"]["accuracy_finetuned"]
        assert (tmp_path / "default" / f"edge-{k}.safetensors").read_bytes() == server
    check_figures(config(), default, tmp_path / "default")


def test_finetune_trains_each_edge_from_the_server_model(tmp_path):
    user = config(data=SKEWED, update={"mode": "finetune", "epochs": 1, "lr": 0.02})
    out = tmp_path / "run"
    results = run_experiment(user, output_dir=out)
    server = load_state_dict(out / "server.safetensors")
    for k, edge in enumerate(results["edges"]):
        assert edge["update_kept"] == "finetuned"
        assert edge["update_train_samples"] == edge["train_samples"]  # one epoch over its training data
        weights = load_state_dict(out / f"edge-{k}.safetensors")
        assert any(not torch.equal(weights[key], server[key]) for key in server)
    check_figures(user, results, out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["participant"] for r in records if r["phase"] == "update-finetune"} == {"edge-0", "edge-1"}
    assert "finetuned" in (out / "results.md").read_text()


def test_fedavg_edges_may_finetune_the_global_model(tmp_path):
    user = config(strategy="fedavg", fedavg={"rounds": 1}, update={"mode": "finetune"})
    results = run_experiment(user, output_dir=tmp_path / "run")
    assert [e["update_kept"] for e in results["edges"]] == ["finetuned", "finetuned"]
    check_figures(user, results, tmp_path / "run")


def test_update_training_settings_default_to_the_edge_ones():
    edge = TrainingSettings(epochs=5, batch_size=32, lr=0.05, schedule="onecycle")
    mode = make_update_mode(resolve_config({"update": {"mode": "finetune", "epochs": 2}}))
    assert mode.settings(edge) == TrainingSettings(epochs=2, batch_size=32, lr=0.05, schedule="onecycle")
    mode = make_update_mode(resolve_config({"update": {"mode": "finetune", "lr": 0.01, "batch_size": 8,
                                                       "schedule": "constant"}}))
    assert mode.settings(edge) == TrainingSettings(epochs=1, batch_size=8, lr=0.01, schedule="constant")


@pytest.mark.parametrize("model, keep_local", [({"name": "mlp", "hidden": 64}, ["head"]),
                                               ({"name": "cnn", "width": 4}, ["head", "bn"])])
def test_personal_keeps_the_named_parts_of_the_edge_model_exactly(tmp_path, model, keep_local):
    user = config(data=SKEWED, model=model, update={"mode": "personal", "keep_local": keep_local, "epochs": 0})
    out = tmp_path / "run"
    results = run_experiment(user, output_dir=out)
    built = participants(user).edges[0].new_model()
    local = set(head_keys(built)) | (set(batchnorm_keys(built)) if "bn" in keep_local else set())
    assert {"classifier.weight", "classifier.bias"} <= local
    server = load_state_dict(out / "server.safetensors")
    for k, edge in enumerate(results["edges"]):
        assert edge["update_kept"] == "personal" and edge["update_train_samples"] == 0
        own, final = own_pretrained(out, k), load_state_dict(out / f"edge-{k}.safetensors")
        assert final.keys() == server.keys()
        for key, tensor in final.items():
            assert torch.equal(tensor, (own if key in local else server)[key]), key
        assert not torch.equal(own["classifier.weight"], server["classifier.weight"])
    check_figures(user, results, out)


def test_guarded_edge_keeps_its_own_model_when_the_server_is_worse_on_its_classes(tmp_path):
    # A deliberately poor server: edges start from their own random inits, so their average is noise, and the
    # server does not fine-tune it. Each edge sees on its validation slice that its own model is better.
    user = config(data=SKEWED, shared_init=False, server={"epochs": 0},
                  update={"mode": "guarded", "epochs": 0, "keep_local": []})
    out = tmp_path / "run"
    results = run_experiment(user, output_dir=out)
    assert results["server"]["accuracy_finetuned"] < 0.5
    for k, edge in enumerate(results["edges"]):
        assert edge["update_kept"] == "own"
        assert set(edge["update_validation"]) == {"own", "server"}
        assert edge["update_validation"]["own"] > edge["update_validation"]["server"]
        assert edge["accuracy_after"] == edge["accuracy_before"]  # never worse than it was
        assert edge["update_train_samples"] == 0
        final = load_state_dict(out / f"edge-{k}.safetensors")
        own = own_pretrained(out, k)
        assert all(torch.equal(final[key], own[key]) for key in own)
    check_figures(user, results, out)


def test_guarded_holds_the_validation_slice_out_of_all_training():
    user = config(data=SKEWED)
    plain = participants(user)
    guarded = participants(config(data=SKEWED, update={"mode": "guarded", "validation_fraction": 0.2}))
    for k, (p, g) in enumerate(zip(plain.edges, guarded.edges)):
        assert p.validation_data is None and g.validation_data is not None
        assert len(g.train_data) + len(g.validation_data) == len(p.train_data)
        assert abs(len(g.validation_data) - 0.2 * len(p.train_data)) <= g.train_data.num_classes
        # The edge trains on the rest: its positions are a subset of the plain edge's, the validation the others.
        positions, held_in = plain.positions[k], guarded.positions[k]
        assert bool(torch.isin(held_in, positions).all())
        held_out = ~torch.isin(positions, held_in)
        assert torch.equal(p.train_data.labels[held_out], g.validation_data.labels)
        assert torch.equal(p.train_data.images[held_out], g.validation_data.images)
    # The server's union holds exactly the edges' training samples, none of the validation slices.
    assert len(guarded.union) == sum(len(e.train_data) for e in guarded.edges)
    assert len(guarded.union) + sum(len(e.validation_data) for e in guarded.edges) == len(plain.union)


def test_guarded_tie_keeps_the_edge_own_model():
    user = config(update={"mode": "guarded", "epochs": 0, "keep_local": []})
    made = participants(user)
    edge = made.edges[0]
    server = {k: v.detach().clone() for k, v in made.server.new_model().state_dict().items()}
    edge.pretrained_weights = {k: v.clone() for k, v in server.items()}  # the same model: the same score
    choice = Guarded(resolve_config(user)).choose(edge, server)
    assert choice.kept == "own" and choice.validation["own"] == choice.validation["server"]
    assert choice.weights is edge.pretrained_weights


def check_guarded_choices(results: dict, out: Path) -> None:
    """Each edge kept the best candidate on its validation slice (the earlier one on a tie, its own first) and
    wrote exactly that model."""
    server = (out / "server.safetensors").read_bytes()
    for k, edge in enumerate(results["edges"]):
        scores = edge["update_validation"]
        assert set(scores) == {"own", "server", "finetuned", "personal"}
        best = max(scores.values())
        assert edge["update_kept"] == next(name for name, score in scores.items() if score == best)
        assert edge["update_train_samples"] == 2 * edge["train_samples"]  # fine-tuned and personal, one epoch each
        written = out / f"edge-{k}.safetensors"
        if edge["update_kept"] == "server":
            assert written.read_bytes() == server
        elif edge["update_kept"] == "own":
            own = own_pretrained(out, k)
            assert all(torch.equal(load_state_dict(written)[key], own[key]) for key in own)


def test_resume_after_pretraining_reruns_only_the_update(tmp_path, monkeypatch):
    user = config(data=SKEWED, update={"mode": "guarded"})
    reference = run_experiment(user, output_dir=tmp_path / "reference")
    check_guarded_choices(reference, tmp_path / "reference")
    check_figures(user, reference, tmp_path / "reference")

    out = tmp_path / "run"
    real_update = EdgeWorker.update

    def interrupted(self, weights):
        if self.name == "edge-1":
            raise KeyboardInterrupt
        return real_update(self, weights)

    monkeypatch.setattr(EdgeWorker, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(user, output_dir=out)
    assert (out / "checkpoints" / "finetune.json").exists() and not (out / "results.json").exists()

    def must_not_train(self, *args, **kwargs):
        raise AssertionError("a finished phase was trained again on resume")

    monkeypatch.setattr(EdgeWorker, "update", real_update)
    monkeypatch.setattr(EdgeWorker, "fit", must_not_train)
    monkeypatch.setattr(ServerWorker, "train", must_not_train)
    # The edges' own pre-trained weights come back from the checkpoints (EdgePool.restore_own_weights).
    resumed = run_experiment(resume=out)
    assert deterministic(resumed) == deterministic(reference)
    for k in range(2):
        assert (out / f"edge-{k}.safetensors").read_bytes() == \
            (tmp_path / "reference" / f"edge-{k}.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------------
# Config validation: every mistake names its key
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("update, extra, needle", [
    ({"mode": "sometimes"}, {}, "'update.mode' must be one of replace, finetune, personal, guarded"),
    ({"mode": "personal", "keep_local": ["body"]}, {}, "'update.keep_local' must be a list of distinct parts"),
    ({"mode": "personal", "keep_local": ["head", "head"]}, {}, "'update.keep_local'"),
    ({"mode": "personal", "keep_local": []}, {}, "'update.keep_local' must name at least one of head, bn"),
    ({"mode": "guarded", "validation_fraction": 0}, {}, "'update.validation_fraction' must be a number in (0.0, 0.5]"),
    ({"mode": "guarded", "validation_fraction": 0.6}, {}, "'update.validation_fraction'"),
    ({"mode": "finetune", "epochs": 0}, {}, "'update.epochs' must be >= 1 with update.mode = \"finetune\""),
    ({"mode": "finetune", "lr": -1}, {}, "'update.lr'"),
    ({"mode": "finetune", "epoch": 2}, {}, "unknown config key 'update.epoch'"),
    ({"mode": "finetune"}, {"strategy": "centralized"}, "'update.mode' has no meaning for strategy = \"centralized\""),
    ({"epochs": 3}, {"strategy": "centralized"}, "'update.epochs' has no meaning for strategy = \"centralized\""),
    ({"mode": "guarded"}, {"strategy": "local"}, "'update.mode' has no meaning for strategy = \"local\""),
    ({"mode": "guarded"}, {"strategy": "fedavg"}, "needs each edge's own pre-trained model"),
])
def test_bad_update_keys_are_named(update, extra, needle):
    with pytest.raises(ConfigError) as error:
        resolve_config({**extra, "update": update})
    assert needle in str(error.value)


def test_fedavg_may_finetune_and_centralized_may_say_replace():
    assert resolve_config({"strategy": "fedavg", "update": {"mode": "finetune"}})["update"]["mode"] == "finetune"
    assert resolve_config({"strategy": "centralized", "update": {"mode": "replace"}})["strategy"] == "centralized"


def _headless(num_classes, in_channels, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))


@pytest.mark.parametrize("model, keep_local, needle", [
    ({"name": "headless"}, ["head"], "classifier head"),  # its head is declared as a module it does not have
    ({"name": "mlp", "hidden": 8}, ["bn"], "has no BatchNorm layers"),
])
def test_keep_local_on_a_model_without_that_part_fails_before_anything_is_written(tmp_path, monkeypatch, model,
                                                                                  keep_local, needle):
    monkeypatch.setitem(MODELS, "headless", ModelSpec(_headless, head="classifier"))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="'update.keep_local'") as error:
        run_experiment(config(model=model, update={"mode": "personal", "keep_local": keep_local}), output_dir=out)
    assert needle in str(error.value)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------
# Flower: the update reply, and deployments against the embedded runtime
# ---------------------------------------------------------------------------------------------------


def _update_reply(metrics: dict, report: dict | None):
    from flwr.app import ConfigRecord, MetricRecord, RecordDict
    from test_flower import _reply

    from ecavg.runtime.flower import wire

    content = RecordDict({wire.METRICS: MetricRecord(metrics)})
    if report is not None:
        content[wire.REPORT] = ConfigRecord(report)
    return _reply(content, message_type=wire.UPDATE)


def test_update_reply_is_parsed_and_checked():
    pytest.importorskip("flwr")
    from ecavg.runtime.flower import wire

    plain = wire.parse_evaluate_reply(_update_reply({"accuracy": 0.5, "test-samples": 5}, None), source="edge-3",
                                      node_id=7)
    assert (plain.kept, plain.accuracy_full, plain.train_samples, plain.history) == ("server", None, 0, {})
    good = {"kept": "own", "validation": json.dumps({"own": 0.9, "server": 0.4}),
            "history": json.dumps({"update-finetune": [{"train_loss": 0.3}]})}
    parsed = wire.parse_evaluate_reply(
        _update_reply({"accuracy": 0.5, "test-samples": 5, "accuracy-full": 0.25, "update-train-samples": 40}, good),
        source="edge-3", node_id=7, candidates=("own", "server", "finetuned", "personal"))
    assert (parsed.kept, parsed.accuracy_full, parsed.train_samples) == ("own", 0.25, 40)
    assert parsed.validation == {"own": 0.9, "server": 0.4}
    assert parsed.history == {"update-finetune": [{"train_loss": 0.3}]}
    for metrics, report, candidates, needle in [
        ({"accuracy-full": 1.5}, good, ("own", "server"), "'accuracy-full' must be a number in [0, 1]"),
        ({}, {**good, "kept": "own"}, ("server",), "'kept' must be one of server"),
        ({}, {**good, "validation": json.dumps({"own": 0.9, "mystery": 0.1})}, ("own", "server"), "'validation'"),
        ({}, {**good, "validation": json.dumps({"server": 0.9})}, ("own", "server"), "the kept one included"),
        ({}, {**good, "validation": json.dumps({"own": 2})}, ("own", "server"), "'own' must be a number in [0, 1]"),
        ({}, {**good, "history": json.dumps({"pretrain": []})}, ("own", "server"), "fine-tuning phases"),
        ({}, {**good, "history": "{"}, ("own", "server"), "'history' is not valid JSON"),
        ({"update-train-samples": -1}, good, ("own", "server"), "'update-train-samples' must be an integer >= 0"),
    ]:
        reply = _update_reply({"accuracy": 0.5, "test-samples": 5, **metrics}, report)
        with pytest.raises(wire.EdgeReplyError, match="edge-3") as error:
            wire.parse_evaluate_reply(reply, source="edge-3", node_id=7, candidates=candidates)
        assert needle in str(error.value)


def _same_update(deployed: dict, embedded: dict) -> None:
    fields = ("name", "train_samples", "test_samples", "accuracy_before", "accuracy_after", "accuracy_after_full",
              "update_kept", "update_train_samples", "update_validation")
    for e_dep, e_emb in zip(deployed["edges"], embedded["edges"], strict=True):
        assert {f: e_dep[f] for f in fields} == {f: e_emb[f] for f in fields}
        assert e_emb["weights_at_edge"] is False
        assert e_dep["weights_at_edge"] is (e_dep["update_kept"] != "server")
    assert deployed["server"] == embedded["server"]


def _edge_files_follow_where_the_weights_are(results: dict, out: Path) -> None:
    for k, edge in enumerate(results["edges"]):
        assert (out / f"edge-{k}.safetensors").exists() is not edge["weights_at_edge"]


@pytest.mark.slow
def test_guarded_over_the_flower_pool_agrees_with_embedded(tmp_path, monkeypatch):
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity
    from test_flower import _serve_in_process

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # as test_flower's task_identity fixture
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    user = config(data=SKEWED, update={"mode": "guarded"})
    served = _serve_in_process(tmp_path, user)
    embedded = run_experiment(user, output_dir=tmp_path / "embedded")
    _same_update(served, embedded)
    assert any(e["weights_at_edge"] for e in served["edges"])  # the skewed edges do not all keep the server's
    _edge_files_follow_where_the_weights_are(served, tmp_path / "served")
    _edge_files_follow_where_the_weights_are(embedded, tmp_path / "embedded")


@pytest.mark.deploy
def test_deployed_personal_update_agrees_with_embedded(tmp_path):
    pytest.importorskip("flwr")
    from test_flower import _assert_all_stopped

    from ecavg.deploy import deploy_local

    # keep_local head and one epoch of fine-tuning: the edge's own weights must survive, in the node's
    # context.state, from the pre-training message's process to the update message's.
    user = config(data=SKEWED, update={"mode": "personal", "keep_local": ["head"], "epochs": 1})
    embedded = run_experiment(user, output_dir=tmp_path / "embedded")
    deployed = deploy_local(user, edges=2, output_dir=tmp_path / "deployed", timeout_s=300)
    out = Path(deployed["output_dir"])
    try:
        assert deployed["runtime"] == "flower" and deployed["missing_edges"] == {}
        _same_update(deployed, embedded)
        assert all(e["weights_at_edge"] for e in deployed["edges"])
        _edge_files_follow_where_the_weights_are(deployed, out)
    finally:
        _assert_all_stopped(out)
