"""The embedded runtime: every edge simulated in this process, one after another.

Weights still cross a serialisation boundary (safetensors bytes, as on the wire, under the run's ``[transfer]``
codec and bases, ``ecavg.core.transfer``) so that the byte counts are real, every edge and the server hold exactly
what they would hold in a deployment, and the same validation runs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Mapping

import torch

from ecavg.core.participants import EdgeWorker
from ecavg.core.pool import EdgePool
from ecavg.core.records import EdgeEvaluation, EdgeReply, StateDict
from ecavg.core.transfer import EdgeLinks, Transfer
from ecavg.data import ImageDataset


class EmbeddedEdgePool(EdgePool):
    """``own_weights(name)``: edge ``name``'s own pre-trained weights, for update modes that keep or compare them
    (``personal``, ``guarded``). They are read when the edge's update comes and dropped after it, so that the
    process never holds K models: the run passes a reader of its per-edge checkpoints
    (``ecavg.core.phases.own_weights_reader``)."""

    def __init__(self, edges: list[EdgeWorker], union: ImageDataset, transfer: Transfer | None = None,
                 own_weights: Callable[[str], StateDict | None] | None = None):
        self._edges = {e.name: e for e in edges}
        self._union = union
        # One copy of each edge's last upload stands for both ends of its link (the same decoded tensors).
        self._links = EdgeLinks(transfer)
        self._own_weights = own_weights

    @property
    def names(self) -> list[str]:
        return list(self._edges)

    def _select(self, only: list[str] | None) -> list[EdgeWorker]:
        if only is None:
            return list(self._edges.values())
        unknown = [n for n in only if n not in self._edges]
        if unknown:
            raise KeyError(f"unknown edge(s) {unknown}; this run has {self.names}")
        return [self._edges[n] for n in only]

    def fit(self, weights: Mapping[str, torch.Tensor] | None, *, phase: str, epochs: int,
            only: list[str] | None = None) -> Iterator[EdgeReply]:
        download = self._links.download(weights) if weights is not None else None
        for edge in self._select(only):
            received, bytes_down = None, 0
            if download is not None:
                received, bytes_down = download.received(edge.name), len(download.payload(edge.name))
            reply = edge.fit(received, phase=phase, epochs=epochs)
            decoded, bytes_up = self._links.upload(edge.name, reply.weights, received=received)
            yield dataclasses.replace(reply, weights=decoded, bytes_up=bytes_up, bytes_down=bytes_down)

    def evaluate(self, weights: Mapping[str, torch.Tensor], *, phase: str) -> Iterator[EdgeEvaluation]:
        download = self._links.download(weights)
        for edge in self._edges.values():
            received = download.received(edge.name)
            needs_own = edge.update_mode is not None and edge.update_mode.needs_own_weights
            if needs_own and self._own_weights is not None:
                edge.pretrained_weights = self._own_weights(edge.name)
            try:
                evaluation = edge.update(received)
            finally:
                if needs_own:
                    edge.pretrained_weights = None
            if evaluation.kept == "server":
                evaluation = dataclasses.replace(evaluation, weights=download.copy_kept(edge.name, received))
            yield dataclasses.replace(evaluation, bytes_down=len(download.payload(edge.name)))

    def restore_own_weights(self, name: str, weights: Mapping[str, torch.Tensor]) -> None:
        """Nothing to do: an edge's own weights are read from the run's checkpoints when its update comes."""

    def restore_upload(self, name: str, weights: Mapping[str, torch.Tensor]) -> None:
        self._links.remember_upload(name, dict(weights))

    def training_data(self) -> ImageDataset:
        return self._union

    def sizes(self) -> dict[str, tuple[int, int]]:
        return {n: (len(e.train_data), len(e.test_data)) for n, e in self._edges.items()}
