"""Experiment configuration: the experiment's keys (``experiment``) and the ``[deploy]`` section (``deploy``)."""

from ecavg.config.deploy import DeploySettings, check_data_policy, deploy_settings
from ecavg.config.experiment import (
    DEFAULTS,
    apply_overrides,
    load_toml,
    model_options,
    parse_override,
    resolve_config,
    to_toml,
)
from ecavg.errors import ConfigError

__all__ = [
    "DEFAULTS",
    "ConfigError",
    "DeploySettings",
    "apply_overrides",
    "check_data_policy",
    "deploy_settings",
    "load_toml",
    "model_options",
    "parse_override",
    "resolve_config",
    "to_toml",
]
