"""Process supervision: a SuperLink and SuperNodes on this machine (the launcher's work directory, which every
process here is tagged with, and its watchdog are in ``workdir.py``).

Nothing a launcher starts may outlive it, however it ends:
- a normal end, an error or Ctrl-C/SIGTERM: :meth:`LocalFederation.stop` stops every process it started and
  the helpers Flower started under them (found in the process tree and by the tag in their environment, see
  ``reaper.py``); ``workdir.WorkDir`` removes the work directory;
- SIGKILL: the SuperLink and SuperNodes get SIGTERM from the kernel (``PR_SET_PDEATHSIG``), and the watchdog
  that ``WorkDir`` starts stops everything tagged with the work directory (Flower's SuperExec, ServerApp
  and ClientApp processes included, which the kernel signal does not reach) and removes the directory;
- if the watchdog was killed too, the next ``ecavg deploy`` removes the work directories whose lock nobody holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ecavg.deploy.reaper as reaper
from ecavg.deploy.flwr_cli import (
    RunCli,
    cli_runner,
    flower_command,
    offline_env,
    register_node,
    toml_string,
    unregister_node,
    write_connection,
)
from ecavg.deploy.links import netns_command
from ecavg.errors import DeployError

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger("ecavg")

STOP_GRACE_S = 10.0
WATCH_INTERVAL_S = 0.25  # how often LocalFederation checks that its SuperNodes (and their ClientApp runners) live
NODE_ID_LINE = re.compile(r"SuperNode ID: (-?\d+)")  # what flower-supernode logs once the SuperLink accepted it
STARTUP_TIMEOUT_S = 60.0
# Held back while a process is being started: a Ctrl-C that lands inside subprocess's fork hooks is otherwise
# reported as "Exception ignored in _releaseLock" and lost, and one landing after the fork leaks the child.
DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# ---------------------------------------------------------------------------------------------------
# Starting processes
# ---------------------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (bound to port 0 together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold back SIGINT and SIGTERM inside the block and deliver them right after it.

    Python runs signal handlers in the main thread between bytecodes, also inside the fork hooks of
    ``subprocess`` (where an exception is printed and dropped); so the handlers are swapped for one that only
    records the signal (a signal mask would not do: the kernel hands the signal to another thread, if any).
    Outside the main thread handlers cannot be swapped, and none run there anyway.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def record(signum: int, frame: object) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, record) for sig in DEFERRED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: not set from Python
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: if the launcher is killed outright (SIGKILL), its child gets SIGTERM instead of lingering."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def child_setup(cgroup: Path | None) -> Callable[[], None]:
    """What a child does between fork and exec: :func:`die_with_parent`, and join ``cgroup`` (``--edge-cpu``)
    before it runs anything, so every process it starts is limited with it."""
    if cgroup is None:
        return die_with_parent

    def setup() -> None:  # pragma: no cover - runs in the child
        die_with_parent()
        (cgroup / "cgroup.procs").write_text(f"{os.getpid()}\n")

    return setup


# ---------------------------------------------------------------------------------------------------
# A SuperLink and SuperNodes on this machine
# ---------------------------------------------------------------------------------------------------


@dataclass
class Tls:
    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass
class LocalFederation:
    """A SuperLink and SuperNodes on this machine; every process it starts is stopped by :meth:`stop`.

    The SuperLink listens on ``host`` (127.0.0.1, or with emulated links the address their namespaces reach).

    Each process runs in its own session, so its process group id is its pid; stopping sends SIGTERM to
    that group (the process and the helpers Flower started under it), then SIGKILL after a grace period.
    Every process carries ``workdir`` as its tag (see ``reaper.py``).

    A SuperNode that exits while the federation runs (killed, crashed) is unregistered from the SuperLink by a
    watcher thread (as ``flwr supernode unregister`` does), so that the ServerApp sees it gone within seconds rather
    than after Flower's heartbeat deadline (60 s); with ``warm_clientapp`` its ClientApp runner is watched too, and
    whichever of the two exits takes the other with it. ``gone`` records when each was seen gone.
    """

    workdir: Path
    logs_dir: Path
    tls: Tls | None = None
    node_auth: bool = False
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    # SuperNode label -> the label of its warm ClientApp runner (None: Flower starts a process per message).
    supernodes: dict[str, str | None] = field(default_factory=dict)
    gone: dict[str, float] = field(default_factory=dict)  # SuperNode label -> time.monotonic() it was seen gone
    unregistered: dict[str, bool] = field(default_factory=dict)  # SuperNode label -> whether unregistering worked
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self.flwr_home = self.workdir / "flwr-home"
        self.env = {**offline_env(self.flwr_home), reaper.TAG_VARIABLE: str(self.workdir)}
        self.logs_dir.mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def flwr(self) -> RunCli:
        """Runs the ``flwr`` CLI against this federation's private FLWR_HOME."""
        return cli_runner(self.env, self.workdir)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def spawn(self, label: str, command: list[str], *, cgroup: Path | None = None) -> subprocess.Popen:
        """Start ``command`` in a session of its own (and in ``cgroup``), logging to ``<label>.log``; record it."""
        if label in self.processes and self.processes[label].poll() is None:
            raise DeployError(f"{label} is already running (pid {self.processes[label].pid})")
        log_path = self.logs_dir / f"{label}.log"
        # A Ctrl-C meanwhile is delivered once the child is recorded, so that stop() finds it.
        with deferred_signals():
            with log_path.open("ab") as log_file:
                process = subprocess.Popen(
                    command, env=self.env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=child_setup(cgroup),  # noqa: PLW1509 - PR_SET_PDEATHSIG is set in the child itself
                )
            self.processes[label] = process
        self._write_pids()
        log.debug("started %s (pid %d): %s", label, process.pid, " ".join(command))
        return process

    def _write_pids(self, helpers: list[int] | None = None) -> None:
        # For the record (and for a manual clean-up if this launcher itself was killed with SIGKILL).
        pids: dict[str, Any] = {label: p.pid for label, p in self.processes.items()}
        if helpers is not None:
            pids["helpers"] = helpers
        (self.logs_dir / "pids.json").write_text(json.dumps(pids, indent=1) + "\n")

    def start_superlink(self, *, simulation: bool = False) -> None:
        """Start the SuperLink; with ``simulation``, it runs the edges itself in Flower's simulation runtime
        (Ray) instead of waiting for SuperNodes."""
        self.port = free_ports(1)[0]
        command = [*flower_command("flower-superlink"), "--host", self.host, "--port", str(self.port)]
        if simulation:
            command.append("--simulation")
        if self.tls is None:
            command.append("--insecure")
        else:
            command += ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert),
                        "--ssl-keyfile", str(self.tls.server_key)]
        if self.node_auth:
            command.append("--enable-supernode-auth")
        write_connection(self.flwr_home, self.address, root_certificates=self.tls.ca_cert if self.tls else None)
        process = self.spawn("superlink", command)
        self._wait_healthy(process)

    def _wait_healthy(self, process: subprocess.Popen) -> None:
        scheme = "https" if self.tls else "http"
        context = ssl.create_default_context(cafile=str(self.tls.ca_cert)) if self.tls else None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise DeployError(f"the SuperLink exited with code {process.returncode} while starting; "
                                  f"see {self.logs_dir / 'superlink.log'}")
            try:
                with urllib.request.urlopen(f"{scheme}://{self.address}/health", timeout=2,
                                            context=context) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise DeployError(f"the SuperLink did not answer on {self.address} within {STARTUP_TIMEOUT_S:g} s; "
                          f"see {self.logs_dir / 'superlink.log'}")

    def start_supernode(self, label: str, node_config: Mapping[str, Any], *, private_key: Path | None = None,
                        warm_clientapp: bool = False, namespace: str | None = None,
                        cgroup: Path | None = None) -> subprocess.Popen:
        """A SuperNode (one edge) with ``node_config`` (e.g. partition-id, data-dir), logging to ``<label>.log``;
        in network ``namespace`` and ``cgroup`` if given (``deploy local --link``, ``--edge-cpu``).

        ``warm_clientapp``: the SuperNode runs with ``--isolation process`` and one long-lived ClientApp runner
        (``ecavg.runtime.flower.warm_clientapp``, label ``<label>-clientapp``, in the same namespace and cgroup)
        takes its messages, instead of a fresh ClientApp process per message."""
        if not self.port:
            raise DeployError("start the SuperLink first")
        config_path = self.workdir / f"{label}.node.toml"
        lines = []
        for key, value in node_config.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, (int, float)):
                lines.append(f"{key} = {value!r}")
            else:
                lines.append(f"{key} = {toml_string(str(value))}")
        config_path.write_text("\n".join(lines) + "\n")
        runtime_port = free_ports(1)[0]
        command = [*flower_command("flower-supernode"), "--superlink", self.address, "--host", "127.0.0.1",
                   "--port", str(runtime_port), "--node-config", str(config_path)]
        command += ["--insecure"] if self.tls is None else ["--root-certificates", str(self.tls.ca_cert)]
        if private_key is not None:
            command += ["--auth-supernode-private-key", str(private_key)]
        if warm_clientapp:
            command += ["--isolation", "process"]
        process = self.spawn(label, netns_command(namespace, command), cgroup=cgroup)
        runner = None
        if warm_clientapp:
            runner = f"{label}-clientapp"
            self.spawn(runner, netns_command(namespace, [
                sys.executable, "-m", "ecavg.runtime.flower.warm_clientapp", "--runtime-api-address",
                f"127.0.0.1:{runtime_port}", "--insecure", "--parent-pid", str(process.pid)]), cgroup=cgroup)
        self.watch_supernode(label, runner)
        return process

    def watch_supernode(self, label: str, runner: str | None = None) -> None:
        """Watch process ``label`` (a SuperNode) and ``runner`` (its ClientApp runner, if any) until :meth:`stop`:
        when either exits, the other is killed and the node unregistered from the SuperLink."""
        self.supernodes[label] = runner
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="supernode-watcher", daemon=True)
            self._watcher.start()

    def node_id(self, label: str) -> int | None:
        """The node id the SuperLink gave SuperNode ``label``, from its log (None until it connected)."""
        try:
            match = NODE_ID_LINE.search((self.logs_dir / f"{label}.log").read_text(errors="replace"))
        except OSError:
            return None
        return int(match.group(1)) if match else None

    def _watch(self) -> None:
        """Until :meth:`stop`: a SuperNode or its runner that exited takes the other down and is unregistered."""
        with contextlib.suppress(ImportError):  # now, not when a node dies: importing takes seconds under load
            import flwr.supercore.control  # noqa: F401
        while not self._stopping.wait(WATCH_INTERVAL_S):
            for label, runner in list(self.supernodes.items()):
                if label in self.gone or all(self.alive(x) for x in (label, runner) if x is not None):
                    continue
                self.gone[label] = time.monotonic()
                for part in (label, runner):
                    if part is not None:
                        self.kill(part)
                node = self.node_id(label)
                if node is None or self._stopping.is_set():
                    continue
                try:
                    self.unregistered[label] = unregister_node(
                        self.flwr, node, address=self.address, root_certificates=self.tls.ca_cert if self.tls else None)
                except (OSError, subprocess.SubprocessError) as error:
                    self.unregistered[label] = False
                    log.warning("could not unregister %s (node %d) from the SuperLink: %s", label, node, error)
                log.info("%s (node %d) exited; %s (%.1f s later)", label, node, "unregistered it from the SuperLink"
                         if self.unregistered[label] else "could not unregister it: the SuperLink will notice when its "
                         "heartbeats stop", time.monotonic() - self.gone[label])

    def register_node(self, public_key: Path) -> None:
        """Register a SuperNode's public key with the SuperLink (needed when node authentication is on)."""
        register_node(self.flwr, public_key)

    def kill(self, label: str, sig: int = signal.SIGKILL) -> None:
        """Signal one process group now (used to simulate a dying edge)."""
        process = self.processes[label]
        if process.poll() is None:
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass

    def alive(self, label: str) -> bool:
        return label in self.processes and self.processes[label].poll() is None

    def stop(self) -> None:
        """Stop every process this federation started: SuperNodes first, then the SuperLink.

        Flower starts helpers under them (SuperExec, the ServerApp and ClientApp processes), some in
        sessions of their own; they are found (before anything is signalled, while the process tree is
        intact, and by their tag) and stopped by pid as well, and recorded in ``logs/pids.json``.
        """
        self._stopping.set()  # the watcher must not take the SuperNodes stopped here for dead ones
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)
        order = [label for label in self.processes if label != "superlink"] + \
                (["superlink"] if "superlink" in self.processes else [])
        roots = {p.pid for p in self.processes.values()}
        helpers = sorted((reaper.descendants(roots) | reaper.tagged_processes(self.workdir)) - roots)
        self._write_pids(helpers)
        for label in order:
            self._signal_group(self.processes[label], signal.SIGTERM)
        reaper.signal_pids(helpers, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for label in order:
            process = self.processes[label]
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not stop within %g s; killing it", label, process.pid, STOP_GRACE_S)
            # The group may hold helpers that outlive their parent: make sure none is left.
            self._signal_group(process, signal.SIGKILL)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
                log.error("%s (pid %d) could not be stopped", label, process.pid)
        reaper.wait_gone(helpers, deadline)
        reaper.signal_pids(helpers, signal.SIGKILL)
        # SIGKILL is asynchronous: return once they are gone, so that nothing outlives stop() (a busy machine can
        # take a moment to tear a large process down).
        reaper.wait_gone(helpers, time.monotonic() + 5.0)

    @staticmethod
    def _signal_group(process: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

