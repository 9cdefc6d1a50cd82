"""The ``[deploy]`` section of an experiment config: how a Flower deployment runs the protocol.

These keys only matter when the edges are separate processes (``ecavg deploy ...``); the embedded runtime
ignores them. ``ecavg.config.resolve_config`` checks the section with :func:`deploy_settings` (errors name
the key as for every other section) and keeps the checked values in ``cfg["deploy"]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ecavg.errors import ConfigError

SECTION = "deploy"
SHARE_DATA_POLICIES = ("full", "none")

DEPLOY_DEFAULTS: dict[str, Any] = {
    # What the server fine-tunes on. "full": every edge uploads its training tensors (images, labels) once,
    # so the server holds the union, as ECAvg assumes. "none": no edge data leaves an edge; the server
    # fine-tunes on `server_data` (a dataset of its own), or skips fine-tuning when that is empty.
    "share_data": "full",
    "server_data": "",
    # Edges that must reply to every training phase; 0 means all of them. Fewer replies stop the run.
    "min_edges": 0,
    # How long the server waits for the replies of one phase (pre-training, a FedAvg round, the update).
    # Flower's own message lifetime is 12 h; set this a little above the slowest edge's training time.
    "round_timeout_s": 43200.0,
    # How long the server waits, at the start, for the edges' SuperNodes to connect.
    "connect_timeout_s": 300.0,
    # Largest payload (weights or data) accepted from one edge, in MiB; checked before parsing.
    "max_message_mb": 1024.0,
}


@dataclass(frozen=True)
class DeploySettings:
    share_data: str = DEPLOY_DEFAULTS["share_data"]
    server_data: str = DEPLOY_DEFAULTS["server_data"]
    min_edges: int = DEPLOY_DEFAULTS["min_edges"]
    round_timeout_s: float = DEPLOY_DEFAULTS["round_timeout_s"]
    connect_timeout_s: float = DEPLOY_DEFAULTS["connect_timeout_s"]
    max_message_mb: float = DEPLOY_DEFAULTS["max_message_mb"]

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 1024 * 1024)

    def required_edges(self, num_edges: int) -> int:
        return num_edges if self.min_edges == 0 else self.min_edges

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Upper bounds keep the derived values usable: max_message_bytes an int, timeouts within threading.TIMEOUT_MAX.
_MAX_MESSAGE_MB = 2.0**20  # 1 TiB
_MAX_TIMEOUT_S = 1e9  # about 31 years


def _positive_number(key: str, value: Any, maximum: float) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= maximum
    if not ok:  # also NaN, and ints beyond float's range (compared exactly, never converted)
        raise ConfigError(f"config key '{SECTION}.{key}' must be a number > 0 and at most {maximum:g}, got {value!r}")
    return float(value)


def deploy_settings(section: Mapping[str, Any] | None, *, num_edges: int | None = None) -> DeploySettings:
    """Check a raw ``[deploy]`` table (missing keys take defaults). ``num_edges`` bounds ``min_edges``."""
    section = dict(section or {})
    unknown = sorted(set(section) - set(DEPLOY_DEFAULTS), key=str)
    if unknown:
        raise ConfigError(
            f"unknown config key {f'{SECTION}.{unknown[0]}'!r} "
            f"(known keys in [{SECTION}]: {', '.join(sorted(DEPLOY_DEFAULTS))})"
        )
    values = {**DEPLOY_DEFAULTS, **section}
    share = values["share_data"]
    if share not in SHARE_DATA_POLICIES:
        raise ConfigError(f"config key '{SECTION}.share_data' must be one of {', '.join(SHARE_DATA_POLICIES)}, "
                          f"got {share!r}")
    if not isinstance(values["server_data"], str):
        raise ConfigError(f"config key '{SECTION}.server_data' must be a string "
                          f"(a dataset name or imagefolder:<path>), "
                          f"got {values['server_data']!r}")
    if values["server_data"] and share != "none":
        raise ConfigError(f"'{SECTION}.server_data' is only used with {SECTION}.share_data = \"none\" "
                          f"(with \"full\" the server fine-tunes on the edges' data); remove one of them")
    min_edges = values["min_edges"]
    if isinstance(min_edges, bool) or not isinstance(min_edges, int) or min_edges < 0:
        raise ConfigError(f"config key '{SECTION}.min_edges' must be an integer >= 0 (0: all edges), got {min_edges!r}")
    if num_edges is not None and min_edges > num_edges:
        raise ConfigError(f"config key '{SECTION}.min_edges' is {min_edges} but the run has only {num_edges} edges "
                          f"(data.num_edges)")
    return DeploySettings(
        share_data=share,
        server_data=values["server_data"],
        min_edges=min_edges,
        round_timeout_s=_positive_number("round_timeout_s", values["round_timeout_s"], _MAX_TIMEOUT_S),
        connect_timeout_s=_positive_number("connect_timeout_s", values["connect_timeout_s"], _MAX_TIMEOUT_S),
        max_message_mb=_positive_number("max_message_mb", values["max_message_mb"], _MAX_MESSAGE_MB),
    )


def server_data_needs(cfg: Mapping[str, Any]) -> list[str]:
    """What in this run reads the server's data besides an optional fine-tuning, as config phrases (for errors
    that refuse a run without server data); empty when nothing does."""
    from ecavg.core.aggregation import AGGREGATORS
    from ecavg.core.strategies import STRATEGIES

    strategy = STRATEGIES.get(cfg["strategy"])
    needs = []
    if strategy.server_training == "required":
        needs.append(f'strategy = "{strategy.name}"')
    if cfg["init"] == "warmup" and cfg["warmup"]["epochs"] > 0:
        needs.append('init = "warmup"')
    if cfg["bn_recalibration"]:
        needs.append("bn_recalibration = true")
    if strategy.aggregates and AGGREGATORS.get(cfg["aggregation"]).needs_server_data:
        needs.append(f'aggregation = "{cfg["aggregation"]}"')
    return needs


def server_training_needs_edge_data(cfg: Mapping[str, Any]) -> bool:
    """Whether this run uses data on the server at all (and so, with share_data = "full", needs the edges')."""
    from ecavg.core.strategies import STRATEGIES

    return STRATEGIES.get(cfg["strategy"]).server_training != "none" or bool(server_data_needs(cfg))


def check_data_policy(cfg: Mapping[str, Any], settings: DeploySettings) -> str | None:
    """Raise ConfigError for runs the policy cannot serve; return a note when fine-tuning will be skipped."""
    if settings.share_data == "full" or settings.server_data:
        return None
    from ecavg.core.strategies import STRATEGIES

    strategy = STRATEGIES.get(cfg["strategy"])
    needs = server_data_needs(cfg)
    if needs:
        raise ConfigError(
            f"{' and '.join(needs)} uses the server's data, but {SECTION}.share_data = \"none\" gives it none; "
            f"set {SECTION}.server_data to a dataset of the server's own or use {SECTION}.share_data = \"full\""
        )
    if strategy.server_training == "optional":
        return ('server fine-tuning skipped: deploy.share_data = "none" and no deploy.server_data, '
                'so this run is a one-shot FedAvg (the averaged weights are sent back as they are)')
    return None
