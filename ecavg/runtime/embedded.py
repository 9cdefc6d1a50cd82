"""The embedded runtime: every edge simulated in this process, one after another.

Weights still cross a serialisation boundary (safetensors bytes, as on the wire) so that the byte counts are
real and the same validation runs as in a deployment.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping

import torch

from ecavg.core.participants import EdgeWorker
from ecavg.core.pool import EdgePool
from ecavg.core.records import EdgeEvaluation, EdgeReply
from ecavg.core.serialization import decode_state_dict, encode_state_dict
from ecavg.data import ImageDataset


class EmbeddedEdgePool(EdgePool):
    def __init__(self, edges: list[EdgeWorker], union: ImageDataset):
        self._edges = {e.name: e for e in edges}
        self._union = union

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
        payload = encode_state_dict(weights) if weights is not None else None
        for edge in self._select(only):
            received = decode_state_dict(payload, name=edge.name) if payload is not None else None
            reply = edge.fit(received, phase=phase, epochs=epochs)
            uploaded = encode_state_dict(reply.weights)
            yield dataclasses.replace(
                reply, weights=decode_state_dict(uploaded, name=edge.name, reference=received),
                bytes_up=len(uploaded), bytes_down=len(payload) if payload is not None else 0)

    def evaluate(self, weights: Mapping[str, torch.Tensor], *, phase: str) -> Iterator[EdgeEvaluation]:
        payload = encode_state_dict(weights)
        for edge in self._edges.values():
            evaluation = edge.update(decode_state_dict(payload, name=edge.name))
            yield dataclasses.replace(evaluation, bytes_down=len(payload))

    def restore_own_weights(self, name: str, weights: Mapping[str, torch.Tensor]) -> None:
        self._select([name])[0].pretrained_weights = dict(weights)

    def training_data(self) -> ImageDataset:
        return self._union

    def sizes(self) -> dict[str, tuple[int, int]]:
        return {n: (len(e.train_data), len(e.test_data)) for n, e in self._edges.items()}
