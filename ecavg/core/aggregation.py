"""Aggregation rules: how the server turns the edges' weights into one model (config key ``aggregation``).

An ``Aggregator`` receives each edge's weights as they arrive (``add``) and produces the global weights
(``result``). ``average`` is the paper's rule, streamed so that only one model is held whatever the number of
edges. A new rule is one class registered in ``AGGREGATORS`` plus the config keys it declares.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ecavg.core.averaging import StreamingAverager
from ecavg.core.records import StateDict
from ecavg.registry import Option, Registry

if TYPE_CHECKING:
    from ecavg.core.participants import ServerWorker


class Aggregator(Option, ABC):
    """One aggregation of edge weights (one per phase that aggregates)."""

    @abstractmethod
    def add(self, name: str, weights: Mapping[str, torch.Tensor], num_samples: int) -> None:
        """One edge's weights and its training sample count (the weight in the average)."""

    @abstractmethod
    def result(self, server: ServerWorker) -> StateDict:
        """The global weights. ``server`` builds models and holds the server's data, for rules that need them."""


AGGREGATORS: Registry[Aggregator] = Registry("aggregation", "average", what="aggregation rule")


@AGGREGATORS.register
class WeightedAverage(Aggregator):
    name = "average"
    summary = "average weighted by each edge's sample count (the paper's rule)"

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__(cfg)
        self._averager = StreamingAverager()

    def add(self, name: str, weights: Mapping[str, torch.Tensor], num_samples: int) -> None:
        self._averager.add(weights, num_samples, name=name)

    def result(self, server: ServerWorker) -> StateDict:
        return self._averager.result()


def make_aggregator(cfg: Mapping[str, Any]) -> Aggregator:
    return AGGREGATORS.get(cfg["aggregation"])(cfg)
