"""Runs stopped part-way, as a Ctrl-C would stop them, for the resume tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ecavg.core.participants import ServerWorker
from ecavg.experiment import run_experiment


def run_interrupted_in_finetune(monkeypatch: pytest.MonkeyPatch, config: dict[str, Any], out: Path) -> None:
    """Run ``config`` into ``out`` until the server's fine-tuning starts, where a KeyboardInterrupt stops it;
    ``ServerWorker.train`` is real again afterwards."""
    real_train = ServerWorker.train

    def interrupted(self, *args, **kwargs):
        if kwargs.get("phase") == "finetune":
            raise KeyboardInterrupt
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(ServerWorker, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, output_dir=out)
    monkeypatch.setattr(ServerWorker, "train", real_train)
