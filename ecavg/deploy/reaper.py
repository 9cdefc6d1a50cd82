"""Finding and stopping the processes of one deployment; run as a script, the watchdog of one launcher.

Every process a deployment starts (SuperLink, SuperNodes, the ``flwr`` CLI) carries ``TAG_VARIABLE`` set to the
deployment's work directory in its environment, and Flower's helpers (SuperExec, ServerApp, ClientApp
processes, Ray) inherit it. So they are found by scanning ``/proc`` even after their parent died and they were
re-parented, which a process tree or a process group cannot do.

The watchdog (``python -I reaper.py WORKDIR``) is started by the launcher with a pipe on its stdin and holds
the work directory's lock (see ``processes.WorkDir``). When the pipe closes (the launcher exited, however it
exited, SIGKILL included), it stops every process tagged with the work directory and removes the directory.
After a normal exit the launcher has already done both, and the watchdog finds nothing to do.

Standard library only: the watchdog starts without importing ecavg (or torch).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

TAG_VARIABLE = "ECAVG_DEPLOY_WORKDIR"
WATCHDOG_GRACE_S = 3.0  # SIGTERM, then SIGKILL: after the launcher died the run is lost, no need to wait long


def process_stats() -> Iterator[tuple[int, str, list[str]]]:
    """(pid, command name, the fields of /proc/<pid>/stat after the name: state, ppid, pgrp, ...) of every
    process (Linux; nothing elsewhere)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ')'.
        yield int(entry.name), stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) from /proc (Linux); empty elsewhere."""
    return {pid: (int(fields[1]), fields[0]) for pid, _, fields in process_stats()}


def descendants(roots: set[int]) -> set[int]:
    """Every process below ``roots`` in the process tree (not the roots themselves)."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found and child not in roots:
                found.add(child)
                stack.append(child)
    return found


def tagged_processes(workdir: str | Path) -> set[int]:
    """Live processes of this user whose environment has ``TAG_VARIABLE=workdir`` (this process excluded)."""
    needle = f"{TAG_VARIABLE}={workdir}".encode()
    found = set()
    for pid, (_, state) in process_table().items():
        if pid == os.getpid() or state == "Z":
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        if needle in environ.split(b"\0"):
            found.add(pid)
    return found


def signal_pids(pids: list[int] | set[int], sig: int) -> list[int]:
    """Signal each live (non-zombie) pid; returns those that were alive. ``sig`` 0 only checks."""
    table = process_table()
    alive = [pid for pid in pids if pid in table and table[pid][1] != "Z"]
    for pid in alive:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    return alive


def stop_tagged(workdir: str | Path, grace_s: float) -> list[int]:
    """SIGTERM every process tagged with ``workdir``, SIGKILL what is left after ``grace_s``; returns the pids.

    Processes that start meanwhile (a helper spawned during the stop) are found by the second scan."""
    pids = tagged_processes(workdir)
    signal_pids(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while signal_pids(pids, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    pids |= tagged_processes(workdir)
    signal_pids(pids, signal.SIGKILL)
    return sorted(pids)


def watch(workdir: Path) -> None:
    """Block until stdin closes (the launcher is gone), then stop what it left running and remove ``workdir``."""
    # Ctrl-C reaches the launcher, which cleans up itself; the watchdog only acts once the launcher is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while sys.stdin.buffer.read(4096):
        pass
    stop_tagged(workdir, WATCHDOG_GRACE_S)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover - exercised by the deployment tests, in a process of its own
    watch(Path(sys.argv[1]))
