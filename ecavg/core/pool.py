"""``EdgePool``: how the server reaches its edges. The strategies are written against it; each runtime has one.

The embedded runtime calls edge objects in the same process, the Flower runtime sends messages to edge agents.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator, Mapping

import torch

from ecavg.core.records import EdgeEvaluation, EdgeReply
from ecavg.data import ImageDataset


class EdgePool(ABC):
    """The server's view of its edges."""

    @property
    @abstractmethod
    def names(self) -> list[str]: ...

    @abstractmethod
    def fit(self, weights: Mapping[str, torch.Tensor] | None, *, phase: str, epochs: int,
            only: list[str] | None = None) -> Iterator[EdgeReply]:
        """Each edge (or those in ``only``) trains from ``weights`` (None: its own random init) and replies."""

    @abstractmethod
    def evaluate(self, weights: Mapping[str, torch.Tensor], *, phase: str) -> Iterator[EdgeEvaluation]:
        """Send the final ``weights`` to every edge; each makes its final model from them (``update.mode``:
        replace, fine-tune, ...) and evaluates it on its own test data."""

    @abstractmethod
    def restore_own_weights(self, name: str, weights: Mapping[str, torch.Tensor]) -> None:
        """Give edge ``name`` its own pre-trained ``weights`` back, when its pre-training was reloaded from the
        run's checkpoints (``--resume``) and the update mode keeps or compares the edge's own model."""

    @abstractmethod
    def restore_upload(self, name: str, weights: Mapping[str, torch.Tensor]) -> None:
        """Edge ``name``'s upload of a phase reloaded from the run's checkpoints (``--resume``), as the server had
        decoded it: with ``transfer.delta``, the base of the edge's next download when the edge holds it too."""

    @abstractmethod
    def training_data(self) -> ImageDataset:
        """The union of the edges' training data, for the server (warm-up, fine-tuning, BN recalibration)."""

    def missing_edges(self) -> dict[str, str]:
        """Edges that dropped out of the run, each with the reason (only a deployment loses edges)."""
        return {}

    def sizes(self) -> dict[str, tuple[int, int]]:
        """(train samples, test samples) per edge, where known before the edges reply."""
        return {}
