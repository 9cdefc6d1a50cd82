"""Phase checkpoints: every finished phase of a run is saved atomically so that an interrupted run resumes.

A phase is complete when its JSON record exists. The record is written (atomically) after the weights, so a
crash between the two leaves a phase that is simply redone.

A phase whose edges' replies are streamed into a running aggregate (``average``) has instead one *running*
checkpoint, ``<phase>.running.safetensors``: the aggregate's tensors plus, in the file's metadata, its description
and the record of every edge it holds. It is rewritten as a whole (atomically, replacing the previous one) as the
phase goes, so the tensors and the list of edges they hold can never disagree, and its size does not grow with the
number of edges.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from ecavg.core.serialization import (
    decode_metadata,
    decode_state_dict,
    load_state_dict,
    save_state_dict,
)
from ecavg.errors import WeightsError
from ecavg.fileio import write_text_atomic

# The metadata key of a running checkpoint's JSON description.
RUNNING_KEY = "ecavg-running"


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

    def load(self, phase: str, *, with_weights: bool = True
             ) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None] | None:
        """(record, weights) of a finished phase, or None when the phase has not finished."""
        weights_path, record_path = self._paths(phase)
        if not record_path.exists():
            return None
        record = json.loads(record_path.read_text())
        weights = None
        if with_weights and weights_path.exists():
            weights = load_state_dict(weights_path, name=f"checkpoint {phase}")
        return record, weights

    # -- running checkpoints (one file per phase, replaced as the phase goes) ------------------------------------

    def _running_path(self, phase: str) -> Path:
        return self.root / f"{phase.replace('/', '__')}.running.safetensors"

    def save_running(self, phase: str, description: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace ``phase``'s running checkpoint: ``tensors`` and a JSON ``description``, in one atomic file."""
        save_state_dict(self._running_path(phase), tensors, metadata={RUNNING_KEY: json.dumps(description)})

    def load_running(self, phase: str, *,
                     with_tensors: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """(description, tensors) of ``phase``'s running checkpoint, or None when there is none (tensors empty
        without ``with_tensors``: only the description is decoded)."""
        path = self._running_path(phase)
        if not path.exists():
            return None
        data = path.read_bytes()
        description = json.loads(decode_metadata(data, name=f"checkpoint {path.name}").get(RUNNING_KEY, "null"))
        if not isinstance(description, dict):
            raise WeightsError(f"checkpoint {path} is not a running checkpoint (no {RUNNING_KEY} description)")
        tensors = decode_state_dict(data, name=f"checkpoint {path.name}") if with_tensors else {}
        return description, tensors
