"""The Flower runtime: message validation (fast, in-process) and real deployments on 127.0.0.1.

The integration tests start a real SuperLink and SuperNodes (separate processes, free ports, bounded
timeouts) on the shipped MNIST sample and check afterwards that every process they started is gone.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="the Flower runtime needs the flower extra (pip install 'ecavg[flower]')")

from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict  # noqa: E402

from ecavg.config import ConfigError, load_toml, resolve_config  # noqa: E402
from ecavg.core.participants import DataSpec  # noqa: E402
from ecavg.core.serialization import encode_state_dict  # noqa: E402
from ecavg.deploy import DeployError, deploy_local  # noqa: E402
from ecavg.experiment import run_experiment  # noqa: E402
from ecavg.runtime.flower import wire  # noqa: E402
from ecavg.runtime.flower.settings import check_data_policy, deploy_settings, split_deploy_section  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "configs" / "quickstart.toml"


def _quick_config(**overrides) -> dict:
    """The quickstart experiment, single-threaded (the same float reductions in every process), shortened."""
    user = load_toml(QUICKSTART)
    user["threads"] = 1
    user["edge"] = {**user.get("edge", {}), "epochs": 2}
    user["server"] = {**user.get("server", {}), "epochs": 1}
    for key, value in overrides.items():
        user[key] = value
    return user


# ---------------------------------------------------------------------------------------------------
# Process bookkeeping: nothing a deployment started may survive it
# ---------------------------------------------------------------------------------------------------


def _live_processes_in_groups(groups: set[int]) -> list[str]:
    """Processes (not zombies) whose process group is one the launcher created."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces, so split after the last ')'
        fields = stat[stat.rindex(")") + 2:].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp in groups and state != "Z":
            alive.append(f"pid {entry.name} ({stat[stat.index('(') + 1:stat.rindex(')')]})")
    return alive


def _assert_all_stopped(out: Path) -> None:
    pids = json.loads((out / "logs" / "pids.json").read_text())
    assert pids, "the launcher recorded no processes"
    deadline = time.monotonic() + 10
    while True:
        left = _live_processes_in_groups(set(pids.values()))
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"processes left behind: {left}"


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process checks read /proc (Linux)")


# ---------------------------------------------------------------------------------------------------
# Determinism: the deployment runs the same algorithm as the embedded runtime
# ---------------------------------------------------------------------------------------------------


@needs_proc
def test_deploy_local_reproduces_embedded_run(tmp_path):
    user = _quick_config(name="determinism")
    embedded = run_experiment(resolve_config(user), output_dir=tmp_path / "embedded")
    deployed = deploy_local(user, edges=2, output_dir=tmp_path / "deployed", timeout_s=240)
    out = Path(deployed["output_dir"])
    try:
        assert deployed["runtime"] == "flower" and embedded["runtime"] == "embedded"
        assert deployed["missing_edges"] == {}
        for e_emb, e_dep in zip(embedded["edges"], deployed["edges"], strict=True):
            assert e_dep["name"] == e_emb["name"]
            assert e_dep["train_samples"] == e_emb["train_samples"]
            assert e_dep["test_samples"] == e_emb["test_samples"]
            assert math.isclose(e_dep["accuracy_before"], e_emb["accuracy_before"], abs_tol=1e-9)
            assert math.isclose(e_dep["accuracy_after"], e_emb["accuracy_after"], abs_tol=1e-9)
        for key in ("accuracy_averaged", "accuracy_finetuned"):
            assert math.isclose(deployed["server"][key], embedded["server"][key], abs_tol=1e-9)
        # Same data order, seeds and summation order: the final weights agree to float rounding.
        from ecavg.core.serialization import load_state_dict

        w_emb = load_state_dict(tmp_path / "embedded" / "server.safetensors")
        w_dep = load_state_dict(out / "server.safetensors")
        assert w_emb.keys() == w_dep.keys()
        for key in w_emb:
            torch.testing.assert_close(w_dep[key], w_emb[key], rtol=1e-5, atol=1e-6)
        # The same output directory as `ecavg run`, plus the logs of every process.
        for name in ("results.json", "results.md", "accuracy.png", "metrics.jsonl", "config.json",
                     "edge-0.safetensors", "edge-1.safetensors"):
            assert (out / name).exists(), name
        for name in ("superlink.log", "edge-0.log", "edge-1.log", "server.log", "serverapp.log"):
            assert (out / "logs" / name).stat().st_size > 0, name
        # The weights went out once (pre-training) and came back once per edge; the data once per edge.
        assert deployed["deploy"]["data_bytes_up"] > 0
        assert deployed["bytes"]["downlink"] == embedded["bytes"]["downlink"]
    finally:
        _assert_all_stopped(out)
