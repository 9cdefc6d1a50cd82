"""Experiment configuration: the experiment's keys (``experiment``) and the ``[deploy]`` section (``deploy``)."""

from ecavg.config.deploy import DeploySettings, check_data_policy, deploy_settings
from ecavg.config.experiment import (
    apply_overrides,
    defaults,
    load_toml,
    model_options,
    parse_override,
    resolve_config,
    schema,
    strategy_of,
    to_toml,
)
from ecavg.errors import ConfigError

__all__ = [
    "ConfigError",
    "DeploySettings",
    "apply_overrides",
    "check_data_policy",
    "defaults",
    "deploy_settings",
    "load_toml",
    "model_options",
    "parse_override",
    "resolve_config",
    "schema",
    "strategy_of",
    "to_toml",
]
