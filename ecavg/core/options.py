"""Every registry of pluggable choices, in one place: what the config validates and the docs list.

Importing this module registers every built-in option (strategies, aggregation rules, server objectives, update
modes, transfer codecs).
"""

from __future__ import annotations

from ecavg.core.aggregation import AGGREGATORS
from ecavg.core.codecs import TRANSFER_CODECS
from ecavg.core.objectives import OBJECTIVES
from ecavg.registry import Registry
from ecavg.core.strategies import STRATEGIES
from ecavg.core.update import UPDATE_MODES

REGISTRIES: tuple[Registry, ...] = (STRATEGIES, AGGREGATORS, OBJECTIVES, UPDATE_MODES, TRANSFER_CODECS)

__all__ = ["AGGREGATORS", "OBJECTIVES", "REGISTRIES", "STRATEGIES", "TRANSFER_CODECS", "UPDATE_MODES"]
