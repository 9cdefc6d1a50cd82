"""Every registry of pluggable choices, in one place: what the config validates and the docs list.

Importing this module registers every built-in option (strategies, aggregation rules, server objectives, update
modes, transfer codecs, tracking backends). ``ecavg.tracking`` is a runtime module, but at import time it needs
only the leaf modules (registry, checks, errors) and imports its backends when a run starts, so listing it here
adds no dependency.
"""

from __future__ import annotations

from ecavg.core.aggregation import AGGREGATORS
from ecavg.core.codecs import TRANSFER_CODECS
from ecavg.core.objectives import OBJECTIVES
from ecavg.core.strategies import STRATEGIES
from ecavg.core.update import UPDATE_MODES
from ecavg.registry import Registry
from ecavg.tracking import TRACKERS

REGISTRIES: tuple[Registry, ...] = (STRATEGIES, AGGREGATORS, OBJECTIVES, UPDATE_MODES, TRANSFER_CODECS,
                                   TRACKERS)

__all__ = ["AGGREGATORS", "OBJECTIVES", "REGISTRIES", "STRATEGIES", "TRACKERS", "TRANSFER_CODECS", "UPDATE_MODES"]
