"""Experiment configuration: defaults, TOML loading, ``--set`` overrides and validation.

A config is a plain nested dict. ``resolve_config`` fills in defaults and checks every key and value, so a typo
in a TOML file or a ``--set`` fails before any training starts, with a message naming the key.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ecavg.config.deploy import deploy_settings
from ecavg.errors import ConfigError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]



STRATEGIES = ("ecavg", "fedavg", "local", "centralized")
INITS = ("random", "pretrained", "warmup")
PARTITIONS = ("iid", "ratio", "dirichlet", "shards")
AUGMENTS = ("auto", "none", "flip", "crop", "crop+flip")
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

DEFAULTS: dict[str, Any] = {
    "name": "",
    "strategy": "ecavg",
    "seed": 0,
    "init": "random",
    "shared_init": True,
    "pretrained": "",
    "bn_recalibration": False,
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
        "train_fraction": 1.0,
        "download": False,
    },
    "model": {"name": "mlp"},
    "edge": dict(_TRAINING_DEFAULTS),
    "server": dict(_TRAINING_DEFAULTS),
    "warmup": {"epochs": 1, "data_fraction": 1.0},
    "fedavg": {"rounds": 3},
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float's range (TOML allows 64-bit ints; callers may pass any)
        return False


def _choice(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in options else f"must be one of {', '.join(options)}"

    return check


def _int_at_least(lo: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if _is_int(v) and v >= lo else f"must be an integer >= {lo}"

    return check


def _number_in(lo: float, hi: float, *, lo_open: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = _is_number(v) and (v > lo if lo_open else v >= lo) and v <= hi
        bracket = "(" if lo_open else "["
        return None if ok else f"must be a number in {bracket}{lo}, {hi}]"

    return check


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _str(v: Any) -> str | None:
    return None if isinstance(v, str) else "must be a string"


def _ratios(v: Any) -> str | None:
    if not isinstance(v, list) or not all(_is_number(x) and x > 0 for x in v):
        return "must be a list of positive numbers"
    return None


def _device(v: Any) -> str | None:
    if isinstance(v, str) and (v in ("auto", "cpu", "cuda", "mps") or v.startswith("cuda:")):
        return None
    return "must be auto, cpu, cuda, cuda:N or mps"


_TRAINING_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "epochs": _int_at_least(0),
    "batch_size": _int_at_least(1),
    "lr": _number_in(0.0, 100.0, lo_open=True),
    "optimizer": _choice(OPTIMIZERS),
    "momentum": _number_in(0.0, 1.0),
    "nesterov": _bool,
    "weight_decay": _number_in(0.0, 1.0),
    "schedule": _choice(SCHEDULES),
    "label_smoothing": _number_in(0.0, 1.0),
}

CHECKS: dict[str, Any] = {
    "name": _str,
    "strategy": _choice(STRATEGIES),
    "seed": _int_at_least(0),
    "init": _choice(INITS),
    "shared_init": _bool,
    "pretrained": _str,
    "bn_recalibration": _bool,
    "device": _device,
    "threads": _int_at_least(0),
    "eval_each_epoch": _bool,
    "data": {
        "dataset": _str,
        "partition": _choice(PARTITIONS),
        "num_edges": _int_at_least(1),
        "ratios": _ratios,
        "alpha": _number_in(0.0, 1e6, lo_open=True),
        "labels_per_edge": _int_at_least(1),
        "augment": _choice(AUGMENTS),
        "train_fraction": _number_in(0.0, 1.0, lo_open=True),
        "download": _bool,
    },
    "model": {"name": _str},  # other [model] keys are model options, checked by the model registry
    "edge": _TRAINING_CHECKS,
    "server": _TRAINING_CHECKS,
    "warmup": {"epochs": _int_at_least(0), "data_fraction": _number_in(0.0, 1.0, lo_open=True)},
    "fedavg": {"rounds": _int_at_least(1)},
}

# Sections whose extra keys are passed on (model options) rather than rejected.
_OPEN_SECTIONS = {"model"}


def _merge(base: dict[str, Any], override: Mapping[str, Any], checks: Mapping[str, Any], path: str = "") -> None:
    for key, value in override.items():
        where = f"{path}{key}"
        if key not in checks:
            if path.rstrip(".") in _OPEN_SECTIONS:
                base[key] = copy.deepcopy(value)
                continue
            known = ", ".join(sorted(checks))
            raise ConfigError(f"unknown config key {where!r} (known keys{' in [' + path.rstrip('.') + ']' if path else ''}: {known})")
        check = checks[key]
        if isinstance(check, dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {where!r} must be a table, got {value!r}")
            _merge(base[key], value, check, f"{where}.")
            continue
        if isinstance(value, int) and _is_number(value) and isinstance(base.get(key), float):
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
                f"data.ratios has {len(ratios)} entries but data.num_edges is {data['num_edges']}; give one ratio per edge"
            )
        if abs(sum(ratios) - 1.0) > 1e-6:
            raise ConfigError(f"data.ratios must sum to 1, they sum to {sum(ratios):g}")
    if cfg["init"] == "pretrained" and not cfg["pretrained"]:
        raise ConfigError("init = \"pretrained\" needs pretrained = \"<path to a local weights file>\"")
    if cfg["pretrained"] and cfg["init"] != "pretrained":
        raise ConfigError("pretrained is set but init is not \"pretrained\"; set init = \"pretrained\" or remove pretrained")
    if not cfg["shared_init"] and cfg["init"] != "random":
        raise ConfigError(f"shared_init = false gives every edge its own random init; it cannot be combined with init = \"{cfg['init']}\"")
    if not cfg["shared_init"] and cfg["strategy"] in ("centralized",):
        raise ConfigError("shared_init = false has no meaning for strategy = \"centralized\" (there are no edge models)")
    if not cfg["model"].get("name"):
        raise ConfigError("model.name must name a model")


def resolve_config(user: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults overlaid with ``user``; every key and value checked. Returns a new dict."""
    if user is not None and not isinstance(user, Mapping):
        raise ConfigError(f"a config must be a table of keys, got {type(user).__name__}")
    user = dict(user or {})
    deploy = user.pop("deploy", None)
    cfg = copy.deepcopy(DEFAULTS)
    _merge(cfg, user, CHECKS)
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
    """Write a resolved config back as TOML (the subset of TOML configs use: scalars, lists, one level of tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return str(v)

    lines = [f"{k} = {value(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines.extend(f"{kk} = {value(vv)}" for kk, vv in v.items())
    return "\n".join(lines) + "\n"
