"""Fault injection on real deployments (``ecavg deploy local``: a SuperLink and SuperNodes on 127.0.0.1).

Each test disturbs one run on the MNIST sample (tiny config, one thread everywhere) and checks what must hold:

* the run finishes when ``deploy.min_edges`` allows it, else fails with ``failure.json`` saying why;
* nothing is left running (the launcher's process groups, and a /proc scan for its tag);
* nothing half-written in the output directory: no ``*.tmp``, no ``results.json`` on failure, no
  ``edge-N.safetensors`` for an edge that dropped out (results.json names it, ``edges[i].missing``);
* an edge whose SuperNode dies is given up when Flower says it is gone, not after ``round_timeout_s`` (set to
  900 s here, so waiting for it fails): the launcher sees the SuperNode exit and unregisters it from the SuperLink
  (without that, Flower would wait for its heartbeat deadline, about 60 s after the last heartbeat).

Each test prints a ``FAULT-TIMING`` line (run with ``-s``): the phase's wall time against its normal time (the
surviving edge's reply). Covered elsewhere, not repeated here: an edge killed with every edge required
(the run stops with EdgeQuorumError and failure.json: tests/test_flower.py, the "below min_edges" test) and the
deploy command itself killed (SIGKILL, Ctrl-C: tests/test_deploy_cleanup.py). A fresh ClientApp process takes
30-50 s to start on a loaded 2-core machine; the time limits below allow for that.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower runtime needs the flower extra (pip install 'ecavg[flower]')")

from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE  # noqa: E402
from test_flower import live_processes_in_groups  # noqa: E402

from ecavg.config import load_toml  # noqa: E402
from ecavg.deploy import DeployError, LocalFederation, deploy_local, reaper  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "configs" / "quickstart.toml"
# Flower 1.42 gives a SuperNode up HEARTBEAT_PATIENCE x HEARTBEAT_DEFAULT_INTERVAL (60 s) after its last heartbeat;
# the SuperNode sends one every ~20 s and neither side lets the interval be configured.
FLOWER_GIVE_UP_S = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL
ROUND_TIMEOUT_S = 900.0
LAUNCH_TIMEOUT_S = 1200.0
SLACK_S = 30.0  # polling, the liveness check, a loaded machine
GONE = r"gone: its SuperNode \(node \d+\) (stopped or missed its heartbeats|is no longer connected)"
FAULTY_CLIENT_APP = "tests.faulty_clientapp:client_app"

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process checks read /proc (Linux)"),
]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by every Flower process


def tiny_config(**overrides) -> dict:
    user = load_toml(QUICKSTART)
    user["threads"] = 1
    user["edge"] = {**user.get("edge", {}), "epochs": 1}
    user["server"] = {**user.get("server", {}), "epochs": 1}
    user["deploy"] = {"min_edges": 1, "round_timeout_s": ROUND_TIMEOUT_S}
    user.update(overrides)
    return user


# ---------------------------------------------------------------------------------------------------
# Disturbing a running federation, and checking what it left
# ---------------------------------------------------------------------------------------------------


class Disturbance:
    """Kills process ``victim`` (its whole process group) once ``watched``'s log shows ``text``; remembers the
    federation (for its work directory) and when the kill happened."""

    def __init__(self, victim: str, watched: str, text: str, *, within_s: float = 600.0):
        self.victim, self.watched, self.text, self.within_s = victim, watched, text, within_s
        self.killed_at: float | None = None
        self.workdir: Path | None = None

    def __call__(self, federation: LocalFederation) -> None:
        self.workdir = federation.workdir
        log_path = federation.logs_dir / f"{self.watched}.log"

        def watch() -> None:
            deadline = time.monotonic() + self.within_s
            while time.monotonic() < deadline:
                if log_path.exists() and self.text in log_path.read_text(errors="replace"):
                    federation.kill(self.victim)
                    self.killed_at = time.monotonic()
                    return
                time.sleep(0.05)

        threading.Thread(target=watch, daemon=True).start()


def assert_nothing_running(out: Path, workdir: Path | None) -> None:
    """Neither the launcher's process groups nor any process tagged with its work directory is alive."""
    pids = json.loads((out / "logs" / "pids.json").read_text())
    helpers = pids.pop("helpers", [])
    assert pids, "the launcher recorded no processes"
    left = live_processes_in_groups(set(pids.values()))
    table = reaper.process_table()
    left += [f"helper pid {pid}" for pid in helpers if pid in table and table[pid][1] != "Z"]
    if workdir is not None:
        left += [f"tagged pid {pid}" for pid in reaper.tagged_processes(workdir)]
    assert not left, f"processes left behind: {left}"
    assert workdir is None or not workdir.exists(), f"the launcher's work directory {workdir} is still there"


def assert_nothing_half_written(out: Path, *, finished: bool, dropped: tuple[str, ...] = ()) -> None:
    temporary = [str(p.relative_to(out)) for p in out.rglob("*") if ".tmp" in p.name]
    assert not temporary, f"half-written files left: {temporary}"
    if finished:
        assert (out / "results.json").exists() and not (out / "failure.json").exists()
        for name in dropped:
            assert not (out / f"{name}.safetensors").exists(), f"{name} dropped out but has weights written"
    else:
        assert (out / "failure.json").exists() and not (out / "results.json").exists()


def check_dropped(results: dict, name: str, phase: str) -> None:
    """``name`` dropped out in ``phase`` because its SuperNode was gone, as soon as Flower could tell."""
    reason = results["missing_edges"][name]
    assert re.match(GONE, reason) and reason.endswith(f"(phase {phase})"), results["missing_edges"]
    edge = next(e for e in results["edges"] if e["name"] == name)
    assert edge["missing"] == reason and edge["accuracy_after"] is None
    deploy = results["deploy"]
    normal = max(deploy["reply_s"][phase].values())  # the surviving edges' time: the phase's normal time
    dropped_after = deploy["dropped_after_s"][phase][name]
    # The edge died about when the phase began (its SuperNode had just received the message): it is given up
    # within Flower's heartbeat deadline, however long round_timeout_s is.
    assert dropped_after <= normal + FLOWER_GIVE_UP_S + SLACK_S, deploy
    assert deploy["phase_wall_s"][phase] < ROUND_TIMEOUT_S / 3, deploy


def assert_unregistered(out: Path) -> None:
    """The launcher told the SuperLink that the killed SuperNode is gone (LocalFederation's watcher)."""
    superlink_log = (out / "logs" / "superlink.log").read_text(errors="replace")
    assert re.search(r'"POST /v1/control/unregister-node HTTP/1\.1" 200', superlink_log), \
        "the killed SuperNode was not unregistered from the SuperLink"


def report(case: str, phase: str, results: dict) -> None:
    deploy = results["deploy"]
    normal = max(deploy["reply_s"][phase].values())
    wall = deploy["phase_wall_s"][phase]
    print(f"\nFAULT-TIMING {case}: phase {phase} took {wall:.1f} s against a normal {normal:.1f} s "
          f"(x{wall / normal:.2f}); dropped after {deploy['dropped_after_s'].get(phase)} s; whole run "
          f"{deploy['launcher_wall_s']:.1f} s; phases {deploy['phase_wall_s']}")


def run_disturbed(tmp_path: Path, user: dict, disturbance: Disturbance, **kwargs) -> tuple[dict, Path]:
    results = deploy_local(user, edges=kwargs.pop("edges", 2), output_dir=tmp_path / "run",
                           timeout_s=LAUNCH_TIMEOUT_S, on_started=disturbance, **kwargs)
    assert disturbance.killed_at is not None, f"{disturbance.victim} was never killed: the run did not disturb"
    return results, Path(results["output_dir"])


# ---------------------------------------------------------------------------------------------------
# An edge (its SuperNode) killed in each phase; min_edges = 1 lets the run go on
# ---------------------------------------------------------------------------------------------------


def test_an_edge_killed_during_pre_training(tmp_path):
    disturbance = Disturbance("edge-1", "edge-1", "Receiving: train.pretrain")
    results, out = run_disturbed(tmp_path, tiny_config(name="fault-pretrain"), disturbance)
    try:
        assert list(results["missing_edges"]) == ["edge-1"]
        check_dropped(results, "edge-1", "pretrain")
        assert_unregistered(out)
        edges = {e["name"]: e for e in results["edges"]}
        assert edges["edge-1"]["accuracy_before"] is None
        assert edges["edge-0"]["accuracy_after"] > 0.5 and results["server"]["accuracy_finetuned"] > 0.5
        assert (out / "edge-0.safetensors").exists()
        report("edge killed in pre-training", "pretrain", results)
        assert_nothing_half_written(out, finished=True, dropped=("edge-1",))
    finally:
        assert_nothing_running(out, disturbance.workdir)


def test_an_edge_killed_during_the_data_upload(tmp_path):
    # strategy = "centralized" asks for the edges' data first (query.data), before anything trains.
    disturbance = Disturbance("edge-1", "edge-1", "Receiving: query.data")
    results, out = run_disturbed(tmp_path, tiny_config(name="fault-data", strategy="centralized"), disturbance)
    try:
        assert list(results["missing_edges"]) == ["edge-1"]
        check_dropped(results, "edge-1", "data")
        assert_unregistered(out)
        assert results["server"]["accuracy_finetuned"] > 0.5  # trained on edge-0's data alone
        assert set(results["deploy"]["reply_s"]["update"]) == {"edge-0"}  # edge-1 got no further message
        report("edge killed in the data upload", "data", results)
        assert_nothing_half_written(out, finished=True, dropped=("edge-1",))
    finally:
        assert_nothing_running(out, disturbance.workdir)


def test_an_edge_killed_during_the_update(tmp_path):
    disturbance = Disturbance("edge-1", "edge-1", "Receiving: evaluate.update")
    results, out = run_disturbed(tmp_path, tiny_config(name="fault-update"), disturbance)
    try:
        assert list(results["missing_edges"]) == ["edge-1"]
        check_dropped(results, "edge-1", "update")
        assert_unregistered(out)
        edges = {e["name"]: e for e in results["edges"]}
        assert edges["edge-1"]["accuracy_before"] is not None  # it did pre-train
        assert edges["edge-0"]["accuracy_after"] is not None and edges["edge-0"]["missing"] is None
        assert (out / "edge-0.safetensors").exists()
        report("edge killed in the update", "update", results)
        assert_nothing_half_written(out, finished=True, dropped=("edge-1",))
    finally:
        assert_nothing_running(out, disturbance.workdir)


# ---------------------------------------------------------------------------------------------------
# A malformed reply (a ClientApp that sends garbage), the SuperLink killed
# ---------------------------------------------------------------------------------------------------


def test_malformed_replies_drop_their_edges_at_once(tmp_path, monkeypatch):
    """edge-1 sends weights of the wrong shape, edge-2 a payload that is not safetensors (tests/faulty_clientapp.py):
    each is rejected when its reply arrives, naming the edge; the run goes on with edge-0 without waiting."""
    monkeypatch.setattr("ecavg.runtime.flower.CLIENT_APP", FAULTY_CLIENT_APP)  # what write_app puts in the app
    workdirs: list[Path] = []
    results = deploy_local(tiny_config(name="fault-garbage"), edges=3, output_dir=tmp_path / "run",
                           timeout_s=LAUNCH_TIMEOUT_S, node_configs={1: {"fault": "wrong-shape"},
                                                                     2: {"fault": "not-safetensors"}},
                           on_started=lambda federation: workdirs.append(federation.workdir))
    out = Path(results["output_dir"])
    try:
        missing = results["missing_edges"]
        assert sorted(missing) == ["edge-1", "edge-2"]
        assert re.match(r"rejected: .*edge-1.*shape", missing["edge-1"]), missing
        assert re.match(r"rejected: .*edge-2.*not a valid safetensors payload", missing["edge-2"]), missing
        deploy = results["deploy"]
        # Dropped when their (quick) replies came, before the honest edge finished training.
        assert set(deploy["reply_s"]["pretrain"]) == {"edge-0", "edge-1", "edge-2"}
        assert deploy["phase_wall_s"]["pretrain"] <= deploy["reply_s"]["pretrain"]["edge-0"] + SLACK_S
        assert results["server"]["accuracy_finetuned"] > 0.5
        report("malformed replies", "pretrain", results)
        assert_nothing_half_written(out, finished=True, dropped=("edge-1", "edge-2"))
    finally:
        assert_nothing_running(out, workdirs[0] if workdirs else None)


def test_the_superlink_killed_mid_run_fails_with_failure_json(tmp_path):
    disturbance = Disturbance("superlink", "edge-0", "Receiving: train.pretrain")
    out = tmp_path / "run"
    with pytest.raises(DeployError) as raised:
        deploy_local(tiny_config(name="fault-superlink"), edges=2, output_dir=out, timeout_s=LAUNCH_TIMEOUT_S,
                     on_started=disturbance)
    try:
        assert disturbance.killed_at is not None
        took = time.monotonic() - disturbance.killed_at
        print(f"\nFAULT-TIMING SuperLink killed in pre-training: the launcher gave up {took:.1f} s after the kill "
              f"({raised.value})")
        assert "SuperLink" in str(raised.value)
        failure = json.loads((out / "failure.json").read_text())
        assert "SuperLink" in failure["error"], failure
        assert took < 60, "the launcher did not notice the dead SuperLink promptly"
        assert_nothing_half_written(out, finished=False)
    finally:
        assert_nothing_running(out, disturbance.workdir)
