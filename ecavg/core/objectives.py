"""Server objectives: the loss the server trains with (config key ``server.objective``).

``ce`` is the paper's cross-entropy on the server's data. An objective may need the edges' models (e.g.
distillation towards their ensemble): it says so with ``needs_edge_models`` and receives them in ``bind``.
A new objective is one class registered in ``OBJECTIVES`` plus the config keys it declares.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import torch
from torch import nn

from ecavg.config.checks import number_in
from ecavg.core.records import StateDict
from ecavg.registry import Key, Option, Registry

if TYPE_CHECKING:
    from ecavg.core.participants import ServerWorker


class ServerObjective(Option, ABC):
    """The loss of one server training phase."""

    needs_edge_models: ClassVar[bool] = False

    def bind(self, server: ServerWorker, edge_weights: Mapping[str, StateDict]) -> dict[str, Any]:
        """Called before training with the edges' weights (only when ``needs_edge_models``); returns figures
        for results.json's ``server`` section (e.g. a teacher's own accuracy)."""
        return {}

    @abstractmethod
    def loss(self, logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch."""


OBJECTIVES: Registry[ServerObjective] = Registry("server.objective", "ce", what="server objective")


@OBJECTIVES.register
class CrossEntropy(ServerObjective):
    name = "ce"
    summary = "cross-entropy on the server's data (the paper)"

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__(cfg)
        self._ce = nn.CrossEntropyLoss(label_smoothing=cfg["server"]["label_smoothing"])

    def loss(self, logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._ce(logits, targets)


@OBJECTIVES.register
class Distillation(ServerObjective):
    """Cross-entropy plus a KL term towards the edges' ensemble (FedDF-style distillation on the server's data).

    The teachers are the edges' pre-trained models, rebuilt on the server from the weights it already holds,
    so distillation costs no extra traffic; their mean logits on each (augmented) batch are the target.
    """

    name = "distill"
    summary = "cross-entropy plus KL towards the ensemble of the edges' models (no extra traffic)"
    keys = {
        "server.distill_weight": Key(0.5, number_in(0.0, 1.0), "share of the KL term in the loss"),
        "server.temperature": Key(4.0, number_in(0.0, 100.0, lo_open=True), "softmax temperature of the KL term"),
    }
    needs_edge_models = True

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__(cfg)
        self._ce = nn.CrossEntropyLoss(label_smoothing=cfg["server"]["label_smoothing"])
        self._weight = float(cfg["server"]["distill_weight"])
        self._temperature = float(cfg["server"]["temperature"])
        self._teachers: list[nn.Module] = []

    def bind(self, server: ServerWorker, edge_weights: Mapping[str, StateDict]) -> dict[str, Any]:
        self._teachers = []
        for weights in edge_weights.values():
            teacher = server.new_model(weights)
            teacher.eval()
            teacher.requires_grad_(False)
            self._teachers.append(teacher)
        return {"accuracy_ensemble": server.evaluate_ensemble(self._teachers)}

    def loss(self, logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = torch.stack([t(inputs) for t in self._teachers]).mean(0)
        t = self._temperature
        kl = nn.functional.kl_div(nn.functional.log_softmax(logits / t, dim=1),
                                  nn.functional.log_softmax(target / t, dim=1), reduction="batchmean",
                                  log_target=True)
        return (1 - self._weight) * self._ce(logits, targets) + self._weight * t * t * kl


def make_objective(cfg: Mapping[str, Any]) -> ServerObjective:
    return OBJECTIVES.get(cfg["server"]["objective"])(cfg)
