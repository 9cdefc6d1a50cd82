"""The records that pass between the strategies, the participants and the runtimes (one shape each)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]


class _SameAsServer:
    """Marks an edge whose final weights are the server's (written as a link to server.safetensors)."""

    _instance: _SameAsServer | None = None

    def __new__(cls) -> _SameAsServer:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "SAME_AS_SERVER"


SAME_AS_SERVER = _SameAsServer()


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
    """What one edge reports after the update: its accuracy on its own test data."""

    name: str
    accuracy: float
    test_samples: int
    bytes_down: int = 0


@dataclass
class Outcome:
    """What a strategy produced: the results fields and the final weights."""

    results: dict[str, Any]
    server_weights: StateDict | None
    edge_weights: dict[str, StateDict | _SameAsServer]  # per edge: its own weights, or SAME_AS_SERVER
