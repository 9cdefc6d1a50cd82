from pathlib import Path

import pytest

from ecavg.config import (
    ConfigError,
    apply_overrides,
    defaults,
    load_toml,
    model_options,
    resolve_config,
    to_toml,
)

REPO = Path(__file__).resolve().parents[1]


def test_defaults_resolve():
    cfg = resolve_config({})
    assert cfg == resolve_config(defaults())
    assert cfg["strategy"] == "ecavg" and cfg["data"]["num_edges"] == 2


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = resolve_config(load_toml(path))
    assert cfg["model"]["name"]


def test_paper_configs_exist():
    names = {p.name for p in (REPO / "configs" / "paper").glob("*.toml")}
    assert {"mnist_mlp.toml", "cifar10_mobilenetv2.toml", "cifar100_resnet50.toml"} <= names


@pytest.mark.parametrize(
    "user, needle",
    [
        ({"strategy": "fedprox"}, "strategy"),
        ({"stratgy": "ecavg"}, "stratgy"),
        ({"data": {"num_edges": 0}}, "data.num_edges"),
        ({"data": {"num_edge": 2}}, "data.num_edge"),
        ({"edge": {"lr": -1.0}}, "edge.lr"),
        ({"edge": {"epochs": 1.5}}, "edge.epochs"),
        ({"server": {"optimizer": "lbfgs"}}, "server.optimizer"),
        ({"data": {"partition": "ratio", "ratios": [0.5, 0.4]}}, "sum to 1"),
        ({"data": {"partition": "ratio", "ratios": [1.0]}}, "data.ratios"),
        ({"init": "pretrained"}, "pretrained"),
        ({"pretrained": "x.pth"}, "init"),
        ({"shared_init": False, "init": "warmup"}, "shared_init"),
        ({"data": 3}, "data"),
        ({"seed": True}, "seed"),
        ({"device": "tpu"}, "device"),
        ({"data": {"test_augment": "crop"}}, "data.test_augment"),
    ],
)
def test_bad_values_are_named(user, needle):
    with pytest.raises(ConfigError) as e:
        resolve_config(user)
    assert needle in str(e.value)


def test_model_section_passes_options():
    cfg = resolve_config({"model": {"name": "mlp", "hidden": 32}})
    assert model_options(cfg) == {"hidden": 32}


def test_int_accepted_for_float():
    assert resolve_config({"edge": {"lr": 1}})["edge"]["lr"] == 1.0


def test_overrides_typed_and_nested():
    user = apply_overrides({"edge": {"epochs": 1}}, ["edge.epochs=3", "strategy=local", "data.ratios=[0.7, 0.3]",
                                                      "model.name=resnet18", "bn_recalibration=true"])
    assert user["edge"]["epochs"] == 3 and user["strategy"] == "local"
    assert user["data"]["ratios"] == [0.7, 0.3] and user["model"]["name"] == "resnet18"
    assert user["bn_recalibration"] is True


@pytest.mark.parametrize("bad", ["edge.epochs", "=3", "edge..epochs=3"])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError):
        apply_overrides({}, [bad])


def test_unknown_override_key_rejected_on_resolve():
    with pytest.raises(ConfigError, match="edge.epoch"):
        resolve_config(apply_overrides({}, ["edge.epoch=3"]))


def test_toml_round_trip(tmp_path):
    cfg = resolve_config({"data": {"partition": "ratio", "ratios": [0.7, 0.3]}, "name": 'a "quoted" name'})
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert resolve_config(load_toml(path)) == cfg


def test_missing_and_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("strategy = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)


@pytest.mark.slow
def test_config_and_embedded_runtime_do_not_need_flower():
    # `make run` installs ecavg without the flower extra: nothing on that path may import flwr.
    import subprocess
    import sys

    code = ("import sys; sys.modules['flwr'] = None\n"
            "from ecavg.config import resolve_config; import ecavg.experiment, ecavg.cli\n"
            "assert resolve_config({'deploy': {'min_edges': 1}})['deploy']['min_edges'] == 1\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
