"""Aggregation rules: how the server turns the edges' weights into one model (config key ``aggregation``).

An ``Aggregator`` receives each edge's weights as they arrive (``add``) and produces the global weights
(``result``). ``average`` is the paper's rule, streamed so that only one model is held whatever the number of
edges. A new rule is one class registered in ``AGGREGATORS`` plus the config keys it declares.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import torch

from ecavg.core.averaging import StreamingAverager, average_state_dicts
from ecavg.core.matching import align_to_reference
from ecavg.core.permutation_specs import permutation_spec
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

    # Whether the rule holds a running state of about one model, not every edge's weights: then a run
    # checkpoints that state (``state``/``restore``) instead of each edge's weights, and --resume needs no K models.
    streams: ClassVar[bool] = False

    def state(self) -> tuple[dict[str, Any], StateDict]:
        """The running state after the edges added so far: (a JSON-able description, tensors)."""
        raise NotImplementedError(f"aggregation = \"{self.name}\" keeps every edge's weights, not a running state")

    def restore(self, description: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Continue from a ``state`` (the edges it holds count as added)."""
        raise NotImplementedError(f"aggregation = \"{self.name}\" keeps every edge's weights, not a running state")


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

    streams = True

    def state(self) -> tuple[dict[str, Any], StateDict]:
        return self._averager.state()

    def restore(self, description: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        self._averager = StreamingAverager.from_state(description, tensors)


@AGGREGATORS.register
class MatchedAverage(Aggregator):
    """Weight matching before averaging (Git Re-Basin, Ainsworth et al. 2022): each edge's hidden units are
    permuted to line up with the edge that has the most samples, then averaged as ``average`` does.

    Holds every edge's weights until ``result`` (K models, where ``average`` holds one). Combine with
    ``bn_recalibration = true``: permuted-and-averaged BatchNorm statistics do not describe the new network.
    """

    name = "match"
    summary = "permute each edge's hidden units to match the edge with the most samples, then average"

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__(cfg)
        self._names: list[str] = []
        self._weights: list[Mapping[str, torch.Tensor]] = []
        self._counts: list[int] = []

    def add(self, name: str, weights: Mapping[str, torch.Tensor], num_samples: int) -> None:
        self._names.append(name)
        self._weights.append(weights)
        self._counts.append(num_samples)

    def result(self, server: ServerWorker) -> StateDict:
        spec = permutation_spec(self.cfg["model"]["name"], server.new_model())
        aligned = align_to_reference(self._weights, self._counts, spec, seed=self.cfg["seed"])
        return average_state_dicts(aligned, self._counts, names=self._names)


def make_aggregator(cfg: Mapping[str, Any]) -> Aggregator:
    return AGGREGATORS.get(cfg["aggregation"])(cfg)
