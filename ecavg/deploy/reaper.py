"""Finding and stopping the processes of one deployment; run as a script, the watchdog of one launcher.

Every process a deployment starts (SuperLink, SuperNodes, the ``flwr`` CLI) carries ``TAG_VARIABLE`` set to the
deployment's work directory in its environment, and Flower's helpers (SuperExec, ServerApp, ClientApp
processes, Ray) inherit it. So they are found by scanning ``/proc`` even after their parent died and they were
re-parented, which a process tree or a process group cannot do.

The watchdog (``python -I reaper.py WORKDIR``) is started by the launcher with a pipe on its stdin and holds
the work directory's lock (see ``workdir.WorkDir``). When the pipe closes (the launcher exited, however it
exited, SIGKILL included), it stops every process tagged with the work directory and removes the directory.
After a normal exit the launcher has already done both, and the watchdog finds nothing to do.

What a deployment creates outside its processes (``--link``: network namespaces, veth links and an address on the
loopback device; ``--edge-cpu``: CPU cgroups) is named with :func:`resource_tag` of the work directory, so that
:func:`remove_tagged_resources` finds and removes it from the work directory's path alone: the launcher on a normal
end, the watchdog after a SIGKILL, and ``workdir.remove_stale_workdirs`` if the watchdog was killed too.

Standard library only: the watchdog starts without importing ecavg (or torch).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
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


def wait_gone(pids: list[int] | set[int], deadline: float) -> None:
    """Return once none of ``pids`` is alive (zombies count as gone) or at ``deadline`` (``time.monotonic()``)."""
    while signal_pids(pids, 0) and time.monotonic() < deadline:
        time.sleep(0.1)


def stop_tagged(workdir: str | Path, grace_s: float) -> list[int]:
    """SIGTERM every process tagged with ``workdir``, SIGKILL what is left after ``grace_s``; returns the pids.

    Processes that start meanwhile (a helper spawned during the stop) are found by the second scan."""
    pids = tagged_processes(workdir)
    signal_pids(pids, signal.SIGTERM)
    wait_gone(pids, time.monotonic() + grace_s)
    pids |= tagged_processes(workdir)
    signal_pids(pids, signal.SIGKILL)
    return sorted(pids)


# ---------------------------------------------------------------------------------------------------
# What a deployment creates besides processes, named after its work directory
# ---------------------------------------------------------------------------------------------------

NAMESPACE_PREFIX = "ecavg-"  # network namespaces: ecavg-<tag>-e<K>
VETH_PREFIX = "ev"  # the root namespace's end of edge K's veth pair: ev<tag>-<K> (interface names: 15 characters)
ADDRESS_LABEL_PREFIX = "lo:ec"  # the SuperLink's address on the loopback device, labelled lo:ec<tag>
CGROUP_PREFIX = "ecavg-"  # CPU cgroups: ecavg-<tag>-edge-<K>


def resource_tag(workdir: str | Path) -> str:
    """Eight hex digits naming what the deployment in ``workdir`` creates (namespaces, links, cgroups)."""
    return hashlib.sha256(str(workdir).encode()).hexdigest()[:8]


def cpu_cgroup_roots() -> list[Path]:
    """The mounted cgroup hierarchies that can limit CPU: a cgroup2 mount, and a cgroup v1 mount with the cpu
    controller (parsed from /proc/self/mounts; empty where there is none)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    roots = []
    for line in mounts:
        fields = line.split()
        if len(fields) < 4:
            continue
        if fields[2] == "cgroup2" or (fields[2] == "cgroup" and "cpu" in fields[3].split(",")):
            roots.append(Path(fields[1].replace("\\040", " ")))
    return roots


def _ip(*args: str) -> str:
    try:
        return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):  # no iproute2: nothing of ours can exist either
        return ""


def remove_tagged_resources(workdir: str | Path) -> list[str]:
    """Delete the namespaces, links, loopback address and cgroups made for ``workdir``; returns what was deleted.

    Run after the processes are stopped (a cgroup with a process in it cannot be removed). Deleting a namespace
    deletes the veth pair with an end in it; the root namespace's ends are looked for as well, in case the
    launcher was killed between making a link and moving its peer."""
    tag = resource_tag(workdir)
    removed = []
    for line in _ip("netns", "list").splitlines():
        name = line.split(" ", 1)[0]
        if name.startswith(f"{NAMESPACE_PREFIX}{tag}-"):
            _ip("netns", "delete", name)
            removed.append(f"namespace {name}")
    for line in _ip("-o", "link", "show").splitlines():
        fields = line.split(":", 2)
        name = fields[1].strip().split("@", 1)[0] if len(fields) > 2 else ""
        if name.startswith(f"{VETH_PREFIX}{tag}-"):
            _ip("link", "delete", name)
            removed.append(f"link {name}")
    label = f"{ADDRESS_LABEL_PREFIX}{tag}"
    for line in _ip("-o", "-4", "addr", "show", "dev", "lo").splitlines():
        fields = line.replace("\\", " ").split()  # `ip -o` ends the address part with a backslash
        if label in fields and "inet" in fields:
            address = fields[fields.index("inet") + 1]
            _ip("addr", "delete", address, "dev", "lo")
            removed.append(f"address {address}")
    for root in cpu_cgroup_roots():
        for path in sorted(root.glob(f"{CGROUP_PREFIX}{tag}-*")):
            for _ in range(50):  # processes that were just killed leave their cgroup a moment later
                try:
                    path.rmdir()
                    removed.append(f"cgroup {path}")
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
    return removed


def watch(workdir: Path) -> None:
    """Block until stdin closes (the launcher is gone), then stop what it left running and remove ``workdir``."""
    # Ctrl-C reaches the launcher, which cleans up itself; the watchdog only acts once the launcher is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while sys.stdin.buffer.read(4096):
        pass
    stop_tagged(workdir, WATCHDOG_GRACE_S)
    remove_tagged_resources(workdir)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover - exercised by the deployment tests, in a process of its own
    watch(Path(sys.argv[1]))
