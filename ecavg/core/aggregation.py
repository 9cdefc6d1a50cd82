"""Aggregation rules: how the server turns the edges' weights into one model (config key ``aggregation``).

An ``Aggregator`` receives each edge's weights as they arrive (``add``) and produces the global weights
(``result``). ``average`` is the paper's rule, streamed so that only one model is held whatever the number of
edges; ``match`` and ``match_activations`` line the edges' hidden units up first (``ecavg.core.matching``).
A new rule is one class registered in ``AGGREGATORS`` plus the config keys it declares.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Mapping

import torch

from ecavg.config.checks import int_at_least
from ecavg.core.averaging import StreamingAverager, average_state_dicts
from ecavg.core.matching import Matcher, Permutations, align_to_reference, match_activations, match_weights
from ecavg.core.participants import derive_seed
from ecavg.core.permutation_specs import PermutationSpec, permutation_spec
from ecavg.core.records import StateDict
from ecavg.registry import Key, Option, Registry

if TYPE_CHECKING:
    from ecavg.core.participants import ServerWorker
    from ecavg.data import ImageDataset

# What ``result`` gets to reach the server's data: a call, so that a rule that needs none never makes a deployment
# collect the edges' data.
ServerData = Callable[[], "ImageDataset"]


class Aggregator(Option, ABC):
    """One aggregation of edge weights (one per phase that aggregates)."""

    @abstractmethod
    def add(self, name: str, weights: Mapping[str, torch.Tensor], num_samples: int) -> None:
        """One edge's weights and its training sample count (the weight in the average)."""

    @abstractmethod
    def result(self, server: ServerWorker, server_data: ServerData) -> StateDict:
        """The global weights. ``server`` builds and evaluates models; ``server_data()`` is the server's training
        data, for rules that say they need it (``needs_server_data``)."""

    # Whether ``result`` reads the server's data: config validation then refuses runs that give the server none.
    needs_server_data: ClassVar[bool] = False
    # Whether the rule permutes hidden units (``ecavg.core.permutation_specs``): only models it knows are accepted.
    permutes_units: ClassVar[bool] = False

    @classmethod
    def forward_samples(cls, cfg: Mapping[str, Any], num_edges: int, server_samples: int) -> int:
        """How many samples ``result`` runs through a model (for ``ecavg plan``'s aggregate step)."""
        return 0

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

    def result(self, server: ServerWorker, server_data: ServerData) -> StateDict:
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
    permutes_units = True

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__(cfg)
        self._names: list[str] = []
        self._weights: list[Mapping[str, torch.Tensor]] = []
        self._counts: list[int] = []

    def add(self, name: str, weights: Mapping[str, torch.Tensor], num_samples: int) -> None:
        self._names.append(name)
        self._weights.append(weights)
        self._counts.append(num_samples)

    def result(self, server: ServerWorker, server_data: ServerData) -> StateDict:
        spec = permutation_spec(self.cfg["model"]["name"], server.new_model())
        aligned = align_to_reference(self._weights, self._counts, spec,
                                     match=self.matcher(spec, server, server_data))
        return average_state_dicts(aligned, self._counts, names=self._names)

    def matcher(self, spec: PermutationSpec, server: ServerWorker, server_data: ServerData) -> Matcher:
        """How one edge's permutations are found: ``(reference weights, other weights) -> permutations``."""
        seed = self.cfg["seed"]

        def match(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]) -> Permutations:
            return match_weights(spec, reference, other, seed=seed)
        return match


# Images per forward pass when comparing activations: the reference's outputs of every compared layer are kept
# for one batch, about 0.9 GB for a ResNet50 with the CIFAR stem at this size.
_MATCH_BATCH = 64


@AGGREGATORS.register
class ActivationMatchedAverage(MatchedAverage):
    """Activation matching before averaging: like ``match``, but each group's units are paired by the correlation of
    their outputs on server images rather than by their weights (Git Re-Basin section 3.1; the matching REPAIR
    uses for ResNets). Needs the server's data and a forward pass of every edge's model over
    ``matching.samples`` of its images."""

    name = "match_activations"
    summary = ("permute each edge's hidden units to match the edge with the most samples, pairing units by how "
               "their outputs correlate on the server's images, then average")
    keys = {
        "matching.samples": Key(5000, int_at_least(1), "server images the edges' activations are compared on "
                                                       "(a seeded random share; all of them if the server has fewer)"),
    }
    needs_server_data = True

    @classmethod
    def forward_samples(cls, cfg: Mapping[str, Any], num_edges: int, server_samples: int) -> int:
        # The reference model and each other edge's, on the same images, once per other edge.
        return 2 * (num_edges - 1) * min(server_samples, int(cfg["matching"]["samples"]))

    def matcher(self, spec: PermutationSpec, server: ServerWorker, server_data: ServerData) -> Matcher:
        data = server_data()
        images = data.random_subset(min(int(self.cfg["matching"]["samples"]), len(data)),
                                    derive_seed(server.seed, "matching-subset", "server"))
        loader = server.factory.loader(images, _MATCH_BATCH, train=False)
        reference_model: list[tuple[Mapping[str, torch.Tensor], torch.nn.Module]] = []

        def batches() -> Iterator[torch.Tensor]:
            for inputs, _ in loader:
                yield inputs

        def match(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]) -> Permutations:
            if not reference_model or reference_model[0][0] is not reference:  # built once for every edge
                reference_model[:] = [(reference, server.new_model(reference))]
            return match_activations(spec, reference_model[0][1], server.new_model(other), batches())
        return match


def make_aggregator(cfg: Mapping[str, Any]) -> Aggregator:
    return AGGREGATORS.get(cfg["aggregation"])(cfg)
