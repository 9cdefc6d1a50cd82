"""The records that pass between the strategies, the participants and the runtimes (one shape each)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]


class _WeightsMarker:
    """Stands for an edge's final weights that the run does not hold as tensors of their own."""

    def __init__(self, name: str):
        self._name = name

    def __repr__(self) -> str:
        return self._name


# The edge's final weights are the server's (written as a link to server.safetensors).
SAME_AS_SERVER = _WeightsMarker("SAME_AS_SERVER")
# The edge's final weights are its own and stay on the edge (a deployment: nothing is written for it).
KEPT_AT_EDGE = _WeightsMarker("KEPT_AT_EDGE")


@dataclass
class EdgeReply:
    """What one edge sends back after training: its weights and what it measured on its own data.

    ``EdgeWorker.fit`` makes it, every ``EdgePool`` hands it to the strategies, and the Flower wire format
    carries exactly these fields; the pool fills in the byte counts.
    """

    name: str
    weights: StateDict
    num_samples: int
    accuracy: float
    test_samples: int
    history: list[dict[str, Any]] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class EdgeEvaluation:
    """What one edge reports after the update (``update.mode``, ``ecavg.core.update``).

    ``kept`` names the model the edge ended with ("server" for the paper's replace); ``accuracy`` is that
    model's accuracy on the edge's own test partition, ``accuracy_full`` on the full test set (None when the
    edge kept the server's model, which the server measures itself, or holds no copy of the full test set).
    ``weights`` are the edge's final weights when they are not the server's and the runtime hands them over
    (embedded; a deployed edge keeps them), or, when it kept the server's through a lossy ``transfer.codec``, its
    decoded copy (the pool decodes it as the edge did). ``train_samples`` counts the samples the update trained on
    (epochs x training set, every fine-tune together), ``validation`` each candidate's accuracy on the edge's
    held-out slice (guarded), ``history`` the per-epoch metrics of each fine-tune, by phase.
    """

    name: str
    accuracy: float
    test_samples: int
    bytes_down: int = 0
    kept: str = "server"
    accuracy_full: float | None = None
    weights: StateDict | None = None
    train_samples: int = 0
    validation: dict[str, float] | None = None
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass
class Outcome:
    """What a strategy produced: the results fields and the final weights."""

    results: dict[str, Any]
    server_weights: StateDict | None
    # per edge that took part to the end: its own weights, SAME_AS_SERVER or KEPT_AT_EDGE (a dropped edge: none)
    edge_weights: dict[str, StateDict | _WeightsMarker]
