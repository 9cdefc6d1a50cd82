"""A deployment launcher's work directory (private FLWR_HOME, the app, node configs) and its watchdog.

:class:`WorkDir` makes and locks the directory and starts the watchdog (``reaper.py`` run as a script), which
stops everything tagged with the directory and removes it if the launcher dies without cleaning up;
:func:`remove_stale_workdirs` removes what a launcher and its watchdog both left behind. The processes started in
the directory are supervised by ``processes.py``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import ecavg.deploy.reaper as reaper
from ecavg.deploy.flwr_cli import offline_env

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger("ecavg")

WORKDIR_KINDS = ("deploy", "sim", "submit")  # work directories are named ecavg-<kind>-<random>
LOCK_FILE = ".lock"




def remove_stale_workdirs(root: Path | None = None) -> list[Path]:
    """Remove the work directories under ``root`` (default: the temp directory) whose launcher and watchdog are
    both gone (their lock is free), after stopping any process still tagged with one. Returns those removed."""
    root = Path(root) if root is not None else Path(tempfile.gettempdir())
    removed = []
    for kind in WORKDIR_KINDS:
        for path in sorted(root.glob(f"ecavg-{kind}-*")):
            try:
                fd = os.open(path / LOCK_FILE, os.O_RDWR)
            except OSError:  # not a work directory of this version, another user's, or just removed
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:  # its launcher or watchdog is alive
                    continue
                reaper.stop_tagged(path, reaper.WATCHDOG_GRACE_S)
                reaper.remove_tagged_resources(path)  # namespaces, links, cgroups (deploy local --link, --edge-cpu)
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
                log.info("removed %s, left by a deployment launcher that was killed", path)
            finally:
                os.close(fd)
    return removed


class WorkDir:
    """A temporary directory for one launcher (under ``root``, default the temp directory), removed by
    :meth:`close`, or by the watchdog if the launcher dies.

    The directory is locked (``flock``) by the launcher and its watchdog; it only gets its final name
    (``ecavg-<kind>-...``) once locked, so :func:`remove_stale_workdirs` never takes a live one for stale.
    """

    def __init__(self, kind: str, root: Path | None = None) -> None:
        if kind not in WORKDIR_KINDS:
            raise ValueError(f"unknown work directory kind {kind!r}")
        remove_stale_workdirs(root)
        staging = Path(tempfile.mkdtemp(prefix=".ecavg-new-", dir=root))
        self.lock_fd = os.open(staging / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        self.path = staging.with_name(f"ecavg-{kind}-{staging.name.removeprefix('.ecavg-new-')}")
        os.rename(staging, self.path)
        env = {k: v for k, v in os.environ.items() if k != reaper.TAG_VARIABLE}
        try:
            # Its own session: a Ctrl-C or a signal to the launcher's process group does not reach it.
            self.watchdog = subprocess.Popen(
                [sys.executable, "-I", str(Path(reaper.__file__).resolve()), str(self.path)], env=env,
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                pass_fds=(self.lock_fd,))
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            os.close(self.lock_fd)
            raise

    def flower_env(self) -> dict[str, str]:
        """The environment for the Flower processes of this launcher: offline, tagged with this directory."""
        env = offline_env(self.path / "flwr-home")
        env[reaper.TAG_VARIABLE] = str(self.path)
        return env

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self.watchdog.stdin is not None:
            self.watchdog.stdin.close()  # the watchdog checks that nothing is left, and exits
        try:
            self.watchdog.wait(timeout=reaper.WATCHDOG_GRACE_S + 5)
        except subprocess.TimeoutExpired:  # pragma: no cover - it goes on and exits by itself
            log.warning("the deployment watchdog (pid %d) is still checking %s", self.watchdog.pid, self.path)
        os.close(self.lock_fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
