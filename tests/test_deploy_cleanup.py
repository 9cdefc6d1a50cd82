"""Nothing a deployment launcher starts outlives it: Ctrl-C, SIGKILL, a lost signal, a killed watchdog.

The ``deploy``-marked tests run ``ecavg deploy local`` on the quickstart config as a separate process, disturb it
early, and then look for every process that inherited a marker from its environment (a /proc scan: Flower's
helpers re-parent away from the process tree) and for anything left in its private temp directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from ecavg.deploy import reaper
from ecavg.deploy.processes import LocalFederation
from ecavg.deploy.workdir import LOCK_FILE, WorkDir, remove_stale_workdirs

pytest.importorskip("flwr", reason="the Flower runtime needs the flower extra (pip install 'ecavg[flower]')")

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "configs" / "quickstart.toml"
MARK = "ECAVG_TEST_MARK"
CLEANUP_LIMIT_S = 8.0  # before the fix, Flower's helpers outlived a killed launcher by about 13 s

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="process checks read /proc (Linux)")


def _marked_processes(mark: str) -> list[str]:
    """Live (non-zombie) processes whose environment holds MARK=mark."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if needle in environ.split(b"\0") and stat[stat.rindex(")") + 2:].split()[0] != "Z":
            found.append(f"pid {entry.name} ({stat[stat.index('(') + 1:stat.rindex(')')]})")
    return found


def _wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.1) -> float:
    """Poll ``condition`` until true; returns the seconds it took, fails naming ``what`` after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"{what} not within {timeout_s:g} s")
        time.sleep(interval_s)
    return time.monotonic() - started


def _start_launcher(tmp_path: Path) -> tuple[subprocess.Popen, str, Path, Path]:
    """``ecavg deploy local`` on the quickstart config with its own TMPDIR and a marker; its own process group,
    as a shell gives a foreground command."""
    mark = uuid.uuid4().hex
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    out = tmp_path / "run"
    env = {**os.environ, "TMPDIR": str(tmpdir), MARK: mark,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with (tmp_path / "launcher.log").open("wb") as log:
        launcher = subprocess.Popen([sys.executable, "-m", "ecavg.cli", "deploy", "local", "--config", str(QUICKSTART),
                                     "--edges", "2", "--output", str(out)], env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return launcher, mark, tmpdir, out


def _log_shows(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text(errors="replace")


def _assert_nothing_left(launcher: subprocess.Popen, mark: str, tmpdir: Path) -> float:
    """Every marked process ends and the launcher's temp directory empties within CLEANUP_LIMIT_S."""
    try:
        return _wait_for(lambda: not _marked_processes(mark) and not any(tmpdir.iterdir()), CLEANUP_LIMIT_S,
                         "the launcher's processes and temp files gone")
    finally:
        left = _marked_processes(mark)
        for pid in [int(p.split()[1]) for p in left]:  # leave the machine clean for the next test
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert not left, f"processes left behind: {left}"
        assert not any(tmpdir.iterdir()), f"left in TMPDIR: {sorted(p.name for p in tmpdir.iterdir())}"


@pytest.mark.deploy
def test_sigkill_of_deploy_local_leaves_no_process_and_no_temp_directory(tmp_path):
    launcher, mark, tmpdir, out = _start_launcher(tmp_path)
    try:
        # A ClientApp process is up: the SuperExecs, the ServerApp and the ClientApp all exist.
        _wait_for(lambda: _log_shows(out / "logs" / "edge-0.log", "Start `flwr-clientapp` process")
                  or launcher.poll() is not None, 240, "edge-0 starting a ClientApp", interval_s=0.2)
        assert launcher.poll() is None, (tmp_path / "launcher.log").read_text(errors="replace")
        assert any(tmpdir.iterdir()), "the launcher made no work directory in its TMPDIR"
    finally:
        launcher.kill()
        launcher.wait()
    _assert_nothing_left(launcher, mark, tmpdir)


@pytest.mark.deploy
def test_ctrl_c_during_start_up_stops_deploy_local_and_cleans_up(tmp_path):
    launcher, mark, tmpdir, out = _start_launcher(tmp_path)
    try:
        # In the middle of start-up: the SuperLink is up, the SuperNodes are being started.
        _wait_for(lambda: (out / "logs" / "edge-0.log").exists() or launcher.poll() is not None, 240,
                  "the first SuperNode starting", interval_s=0.02)
        os.killpg(launcher.pid, signal.SIGINT)  # what a terminal sends its foreground job
        code = launcher.wait(timeout=150)  # a bound, not a timing: stopping takes a while on a loaded machine
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    log = (tmp_path / "launcher.log").read_text(errors="replace")
    assert code == 130, log
    assert "every process this command started has been stopped" in log
    assert "Exception ignored" not in log
    assert not (out / "results.json").exists()
    _assert_nothing_left(launcher, mark, tmpdir)


def test_a_signal_while_a_process_starts_is_delivered_after_it_is_recorded(tmp_path):
    """A Ctrl-C inside subprocess's fork hooks used to be printed as "Exception ignored in _releaseLock" and lost
    (the run went on). Here the signal is sent from such a hook, with a second thread alive (as torch has): it
    must interrupt, and the child must be recorded and stopped."""
    armed = []

    def signal_during_fork() -> None:
        if armed:
            armed.clear()
            os.kill(os.getpid(), signal.SIGINT)

    os.register_at_fork(after_in_parent=signal_during_fork)  # cannot be unregistered: inert once disarmed
    release = threading.Event()
    other_thread = threading.Thread(target=release.wait, daemon=True)  # a thread the kernel may pick for the signal
    other_thread.start()
    federation = LocalFederation(tmp_path / "work", tmp_path / "logs")
    armed.append(True)
    try:
        with pytest.raises(KeyboardInterrupt):
            federation.spawn("sleeper", ["sleep", "60"])
            time.sleep(1.0)  # without the fix, the interrupt is gone and this returns normally
        assert federation.alive("sleeper"), "the child started before the interrupt was not recorded"
    finally:
        armed.clear()
        release.set()
        federation.stop()
    assert not federation.alive("sleeper")


def test_a_stale_work_directory_is_removed_with_its_processes_and_a_live_one_is_kept(tmp_path):
    """If the launcher and its watchdog were both killed, the next launcher removes what they left."""
    live = WorkDir("deploy", root=tmp_path)  # locked by this process and its watchdog
    stale = tmp_path / "ecavg-deploy-stale"
    stale.mkdir()
    (stale / LOCK_FILE).touch()  # nobody holds its lock
    orphan = subprocess.Popen(["sleep", "60"], env={**os.environ, reaper.TAG_VARIABLE: str(stale)},
                              start_new_session=True)
    foreign = tmp_path / "ecavg-deploy-nolock"  # not made by a launcher of this version: left alone
    foreign.mkdir()
    try:
        _wait_for(lambda: orphan.pid in reaper.tagged_processes(stale), 10, "the orphan found by its tag")
        assert remove_stale_workdirs(tmp_path) == [stale]
        assert orphan.wait(timeout=10) is not None
        assert not stale.exists() and foreign.is_dir() and live.path.is_dir()
    finally:
        live.close()
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
    assert not live.path.exists()
    assert live.watchdog.poll() is not None, "the watchdog did not exit when its launcher closed the directory"


@pytest.mark.parametrize("dies", ["supernode", "runner"])
def test_a_supernode_or_its_runner_that_exits_takes_the_other_down_and_is_unregistered(tmp_path, monkeypatch, dies):
    """Without this, Flower drops a killed SuperNode only after 60 s of missing heartbeats (tests/test_faults.py
    measures the whole path); here the SuperNode is a stand-in that prints Flower's node-id line."""
    unregistered = []
    monkeypatch.setattr("ecavg.deploy.processes.unregister_node",
                        lambda run_cli, node_id, **where: unregistered.append((node_id, where)) or True)
    (tmp_path / "work").mkdir()
    federation = LocalFederation(tmp_path / "work", tmp_path / "logs", port=1)
    federation.spawn("edge-0", [sys.executable, "-c", "print('INFO: SuperNode ID: 4242', flush=True); "
                                                      "import time; time.sleep(60)"])
    federation.spawn("edge-0-clientapp", [sys.executable, "-c", "import time; time.sleep(60)"])
    federation.spawn("edge-1", [sys.executable, "-c", "print('SuperNode ID: 7', flush=True); "
                                                      "import time; time.sleep(60)"])
    try:
        _wait_for(lambda: federation.node_id("edge-0") == 4242 and federation.node_id("edge-1") == 7, 30,
                  "the stand-ins' node-id lines")
        federation.watch_supernode("edge-0", "edge-0-clientapp")
        federation.watch_supernode("edge-1")
        federation.kill("edge-0" if dies == "supernode" else "edge-0-clientapp")
        _wait_for(lambda: bool(unregistered), 10, "the dead node unregistered")
        assert not federation.alive("edge-0") and not federation.alive("edge-0-clientapp")
        assert unregistered == [(4242, {"address": "127.0.0.1:1", "root_certificates": None})]
        assert federation.unregistered == {"edge-0": True} and list(federation.gone) == ["edge-0"]
        assert federation.alive("edge-1")
    finally:
        federation.stop()
    time.sleep(2 * 0.25)  # the watcher is stopped with the federation: the nodes stop() ended are not unregistered
    assert [node for node, _ in unregistered] == [4242] and not federation.alive("edge-1")
