"""Experiment configuration: defaults, TOML loading, ``--set`` overrides and validation.

A config is a plain nested dict. ``resolve_config`` fills in defaults and checks every key and value, so a typo
in a TOML file or a ``--set`` fails before any training starts, with a message naming the key.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Callable, Mapping

import tomli_w

from ecavg.config.checks import boolean, choice, int_at_least, is_number, number_in, string
from ecavg.config.deploy import deploy_settings, server_data_needs
from ecavg.errors import ConfigError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]



INITS = ("random", "pretrained", "warmup")
PARTITIONS = ("iid", "ratio", "dirichlet", "shards")
AUGMENTS = ("auto", "none", "flip", "crop", "crop+flip")
TEST_AUGMENTS = ("none", "flip")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "onecycle", "cosine")

# Optimiser settings shared by [edge], [server]; [warmup] takes its own epochs and data share and
# otherwise trains with the [server] settings.
_TRAINING_DEFAULTS: dict[str, Any] = {
    "epochs": 1,
    "batch_size": 64,
    "lr": 0.05,
    "optimizer": "sgd",
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 5e-4,
    "schedule": "onecycle",
    "label_smoothing": 0.0,
}

# The keys every run has. The choices made through a registry (strategy, aggregation, server.objective, ...)
# and the keys their options add come from ``ecavg.core.options`` (see ``schema``).
_BASE_DEFAULTS: dict[str, Any] = {
    "name": "",
    "seed": 0,
    "init": "random",
    "shared_init": True,
    "pretrained": "",
    "bn_recalibration": False,
    # The share of each edge's training data (seeded, class-stratified) that the server holds and fine-tunes
    # on; 0: none (ECAvg becomes one-shot averaging).
    "server_data_fraction": 1.0,
    "device": "auto",
    "threads": 0,
    "eval_each_epoch": True,
    "data": {
        "dataset": "mnist-sample",
        "partition": "iid",
        "num_edges": 2,
        "ratios": [],
        "alpha": 0.5,
        "labels_per_edge": 2,
        "augment": "auto",
        # Test-time augmentation: "flip" scores each test image as the mean of its and its mirror's logits
        # (twice the evaluation compute); applies to every evaluation, edges' and server's.
        "test_augment": "none",
        "train_fraction": 1.0,
        "download": False,
    },
    "model": {"name": "mlp"},
    "edge": dict(_TRAINING_DEFAULTS),
    "server": dict(_TRAINING_DEFAULTS),
    "warmup": {"epochs": 1, "data_fraction": 1.0},
    "fedavg": {"rounds": 3},
}


def _ratios(v: Any) -> str | None:
    if not isinstance(v, list) or not all(is_number(x) and x > 0 for x in v):
        return "must be a list of positive numbers"
    return None


def _device(v: Any) -> str | None:
    if isinstance(v, str) and (v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit())):
        return None
    return "must be auto, cpu, cuda, cuda:N or mps"


_TRAINING_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "epochs": int_at_least(0),
    "batch_size": int_at_least(1),
    "lr": number_in(0.0, 100.0, lo_open=True),
    "optimizer": choice(OPTIMIZERS),
    "momentum": number_in(0.0, 1.0),
    "nesterov": boolean,
    "weight_decay": number_in(0.0, 1.0),
    "schedule": choice(SCHEDULES),
    "label_smoothing": number_in(0.0, 1.0),
}

_BASE_CHECKS: dict[str, Any] = {
    "name": string,
    "seed": int_at_least(0),
    "init": choice(INITS),
    "shared_init": boolean,
    "pretrained": string,
    "bn_recalibration": boolean,
    "server_data_fraction": number_in(0.0, 1.0),
    "device": _device,
    "threads": int_at_least(0),
    "eval_each_epoch": boolean,
    "data": {
        "dataset": string,
        "partition": choice(PARTITIONS),
        "num_edges": int_at_least(1),
        "ratios": _ratios,
        "alpha": number_in(0.0, 1e6, lo_open=True),
        "labels_per_edge": int_at_least(1),
        "augment": choice(AUGMENTS),
        "test_augment": choice(TEST_AUGMENTS),
        "train_fraction": number_in(0.0, 1.0, lo_open=True),
        "download": boolean,
    },
    "model": {"name": string},  # other [model] keys are model options, checked by the model registry
    "edge": _TRAINING_CHECKS,
    "server": _TRAINING_CHECKS,
    "warmup": {"epochs": int_at_least(0), "data_fraction": number_in(0.0, 1.0, lo_open=True)},
    "fedavg": {"rounds": int_at_least(1)},
}

# Sections whose extra keys are passed on (model options) rather than rejected.
_OPEN_SECTIONS = {"model"}


def _place(defaults: dict[str, Any], checks: dict[str, Any], dotted: str, default: Any, check: Any) -> None:
    *sections, key = dotted.split(".")
    for section in sections:
        defaults = defaults.setdefault(section, {})
        checks = checks.setdefault(section, {})
    defaults[key] = default
    checks[key] = check


def _copy_tables(tree: Mapping[str, Any]) -> dict[str, Any]:
    # Not deepcopy: [edge] and [server] share one checks table, and an option may add a key to one of them.
    return {k: _copy_tables(v) if isinstance(v, Mapping) else copy.deepcopy(v) for k, v in tree.items()}


@functools.cache
def schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """(defaults, checks) of every config key: the base keys plus each registry's selector and option keys."""
    from ecavg.core.options import REGISTRIES  # imports torch; the config module itself stays light

    defaults, checks = _copy_tables(_BASE_DEFAULTS), _copy_tables(_BASE_CHECKS)
    for registry in REGISTRIES:
        _place(defaults, checks, registry.selector, registry.default, choice(registry.names()))
        for dotted, key in registry.keys().items():
            _place(defaults, checks, dotted, key.default, key.check)
    return defaults, checks


def defaults() -> dict[str, Any]:
    """A fresh copy of every key's default value."""
    return copy.deepcopy(schema()[0])


def strategy_of(cfg: Mapping[str, Any]):
    """The strategy class a resolved config selects (what it needs: edge models, server training)."""
    from ecavg.core.strategies import STRATEGIES

    return STRATEGIES.get(cfg["strategy"])


def _merge(base: dict[str, Any], override: Mapping[str, Any], checks: Mapping[str, Any], path: str = "") -> None:
    for key, value in override.items():
        where = f"{path}{key}"
        if key not in checks:
            if path.rstrip(".") in _OPEN_SECTIONS:
                base[key] = copy.deepcopy(value)
                continue
            known = ", ".join(sorted(checks))
            section = f" in [{path.rstrip('.')}]" if path else ""
            raise ConfigError(f"unknown config key {where!r} (known keys{section}: {known})")
        check = checks[key]
        if isinstance(check, dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {where!r} must be a table, got {value!r}")
            _merge(base[key], value, check, f"{where}.")
            continue
        if isinstance(value, int) and is_number(value) and isinstance(base.get(key), float):
            value = float(value)  # lr = 1 is as good as lr = 1.0
        problem = check(value)
        if problem:
            raise ConfigError(f"config key {where!r} {problem}, got {value!r}")
        base[key] = copy.deepcopy(value)


def _check_consistency(cfg: dict[str, Any]) -> None:
    data = cfg["data"]
    if data["partition"] == "ratio":
        ratios = data["ratios"]
        if len(ratios) != data["num_edges"]:
            raise ConfigError(
                f"data.ratios has {len(ratios)} entries but data.num_edges is {data['num_edges']}; "
                "give one ratio per edge"
            )
        if abs(sum(ratios) - 1.0) > 1e-6:
            raise ConfigError(f"data.ratios must sum to 1, they sum to {sum(ratios):g}")
    if cfg["init"] == "pretrained" and not cfg["pretrained"]:
        raise ConfigError("init = \"pretrained\" needs pretrained = \"<path to a local weights file>\"")
    if cfg["pretrained"] and cfg["init"] != "pretrained":
        raise ConfigError("pretrained is set but init is not \"pretrained\"; "
                          "set init = \"pretrained\" or remove pretrained")
    if not cfg["shared_init"] and cfg["init"] != "random":
        raise ConfigError("shared_init = false gives every edge its own random init; "
                          f"it cannot be combined with init = \"{cfg['init']}\"")
    if not cfg["shared_init"] and not strategy_of(cfg).edge_models:
        raise ConfigError(f"shared_init = false has no meaning for strategy = \"{cfg['strategy']}\" "
                          "(there are no edge models)")
    from ecavg.core.objectives import OBJECTIVES

    if OBJECTIVES.get(cfg["server"]["objective"]).needs_edge_models and not strategy_of(cfg).edge_models:
        raise ConfigError(f"server.objective = \"{cfg['server']['objective']}\" learns from the edges' models, but "
                          f"strategy = \"{cfg['strategy']}\" has none; use strategy = \"ecavg\" or objective \"ce\"")
    from ecavg.core.aggregation import AGGREGATORS

    aggregator = AGGREGATORS.get(cfg["aggregation"])
    if aggregator.permutes_units:
        from ecavg.core.permutation_specs import MATCHABLE_MODELS

        if cfg["model"]["name"] not in MATCHABLE_MODELS:
            raise ConfigError(f"aggregation = \"{cfg['aggregation']}\" knows how to permute "
                              f"{', '.join(MATCHABLE_MODELS)}; model.name = \"{cfg['model']['name']}\" is not one of "
                              "them (use aggregation = \"average\")")
    if aggregator.needs_server_data and strategy_of(cfg).aggregates and strategy_of(cfg).server_training == "none":
        raise ConfigError(f"aggregation = \"{cfg['aggregation']}\" compares the edges' models on the server's data, "
                          f"but strategy = \"{cfg['strategy']}\" gives the server none; use aggregation = \"match\"")
    if cfg["server_data_fraction"] == 0:
        needs = server_data_needs(cfg)
        if needs:
            raise ConfigError(f"server_data_fraction = 0 gives the server no data, but {' and '.join(needs)} uses "
                              "it; use a fraction > 0")
    if not cfg["model"].get("name"):
        raise ConfigError("model.name must name a model")
    from ecavg.models import MODELS

    spec = MODELS.get(cfg["model"]["name"])
    if spec is not None:  # options of torchvision models built by name are checked by torchvision, at build time
        spec.checked_options(cfg["model"]["name"], model_options(cfg))
    from ecavg.core.transfer import check_transfer_config  # imports torch, as schema() does
    from ecavg.core.update import check_update_config

    check_update_config(cfg, strategy_of(cfg))
    check_transfer_config(cfg, strategy_of(cfg))


def resolve_config(user: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults overlaid with ``user``; every key and value checked. Returns a new dict."""
    if user is not None and not isinstance(user, Mapping):
        raise ConfigError(f"a config must be a table of keys, got {type(user).__name__}")
    user = dict(user or {})
    deploy = user.pop("deploy", None)
    cfg = defaults()
    _merge(cfg, user, schema()[1])
    _check_consistency(cfg)
    if deploy is not None and not isinstance(deploy, Mapping):
        raise ConfigError(f"config key 'deploy' must be a table ([deploy]), got {deploy!r}")
    cfg["deploy"] = deploy_settings(deploy, num_edges=cfg["data"]["num_edges"]).to_dict()
    return cfg


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; give a .toml file "
                          "(e.g. configs/quickstart.toml)") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'edge.epochs=3'`` -> (['edge', 'epochs'], 3). Values are read as TOML, else kept as strings."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words such as resnet18 or fedavg
    return key.split("."), value


def apply_overrides(user: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set key=value`` strings to a raw (unresolved) config dict."""
    out = copy.deepcopy(dict(user))
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: '{k}' is a value, not a table")
            node = child
        node[keys[-1]] = value
    return out


def model_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg["model"].items() if k != "name"}


def to_toml(cfg: Mapping[str, Any]) -> str:
    """A resolved config as TOML text (what ``ecavg run --config`` reads back)."""
    return tomli_w.dumps(cfg)
