"""Every registry of pluggable choices, in one place: what the config validates and the docs list.

Importing this module registers every built-in option (strategies, aggregation rules, server objectives).
"""

from __future__ import annotations

from ecavg.core.aggregation import AGGREGATORS
from ecavg.core.objectives import OBJECTIVES
from ecavg.registry import Registry
from ecavg.core.strategies import STRATEGIES

REGISTRIES: tuple[Registry, ...] = (STRATEGIES, AGGREGATORS, OBJECTIVES)

__all__ = ["AGGREGATORS", "OBJECTIVES", "REGISTRIES", "STRATEGIES"]
