"""Phase checkpoints: every finished phase of a run is saved atomically so that an interrupted run resumes.

A phase is complete when its JSON record exists. The record is written (atomically) after the weights, so a
crash between the two leaves a phase that is simply redone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from ecavg.core.serialization import load_state_dict, save_state_dict, write_bytes_atomic


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


class PhaseStore:
    """Completed phases of one run, kept under ``<output>/checkpoints``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # An atomic write killed midway leaves its temporary file; one run owns this directory, so none is live.
        for leftover in self.root.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)

    def _paths(self, phase: str) -> tuple[Path, Path]:
        safe = phase.replace("/", "__")
        return self.root / f"{safe}.safetensors", self.root / f"{safe}.json"

    def has(self, phase: str) -> bool:
        return self._paths(phase)[1].exists()

    def save(self, phase: str, record: Mapping[str, Any], weights: Mapping[str, torch.Tensor] | None = None) -> None:
        weights_path, record_path = self._paths(phase)
        if weights is not None:
            save_state_dict(weights_path, weights)
        write_text_atomic(record_path, json.dumps({"phase": phase, **record}, indent=1))

    def load(self, phase: str, *, with_weights: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None] | None:
        """(record, weights) of a finished phase, or None when the phase has not finished."""
        weights_path, record_path = self._paths(phase)
        if not record_path.exists():
            return None
        record = json.loads(record_path.read_text())
        weights = None
        if with_weights and weights_path.exists():
            weights = load_state_dict(weights_path, name=f"checkpoint {phase}")
        return record, weights
