"""Edge conditions for ``ecavg deploy local``: shaped links (``--link``, see ``links.py``) and CPU shares
(``--edge-cpu NAME=SHARE``); the option values are parsed in ``rates.py`` (shared with ``ecavg plan``).

A CPU share is a fraction of one core, enforced by the kernel's CFS bandwidth control on a cgroup of its own per
edge: cgroup v2 ``cpu.max`` where the cpu controller is on the unified hierarchy, else cgroup v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``. The SuperNode joins its cgroup before it execs (so every process it
starts, Flower's ClientApp included, is in it too). A quota, unlike a thread count, slows an edge on a machine
with few or busy cores: an edge at 0.25 gets at most a quarter of a core whatever else runs.

The cgroups are named after the work directory (``reaper.resource_tag``) and removed with the links.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecavg.deploy.links import ShapedLinks, links_unavailable_reason
from ecavg.deploy.rates import format_rate, parse_cpu_share, parse_edge_values, parse_rate
from ecavg.deploy.reaper import CGROUP_PREFIX, cpu_cgroup_roots, remove_tagged_resources, resource_tag
from ecavg.errors import DeployError

CFS_PERIOD_US = 100_000


@dataclass(frozen=True)
class CpuHierarchy:
    """Where CPU cgroups are made: the hierarchy's root and its interface (``v2``: cpu.max; ``v1``: cfs files)."""

    root: Path
    version: str


def cpu_hierarchy() -> CpuHierarchy | None:
    """The cgroup hierarchy that can hold a CPU quota and that this process may write, or None."""
    for root in cpu_cgroup_roots():
        if (root / "cgroup.controllers").exists():
            try:
                enabled = (root / "cgroup.subtree_control").read_text().split()
            except OSError:
                continue
            if "cpu" in enabled and os.access(root, os.W_OK):
                return CpuHierarchy(root, "v2")
        elif (root / "cpu.cfs_quota_us").exists() and os.access(root, os.W_OK):
            return CpuHierarchy(root, "v1")
    return None


def cpu_limit_unavailable_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "CPU shares (--edge-cpu) need Linux cgroups"
    if os.geteuid() != 0:
        return "CPU shares (--edge-cpu) need root: they create cgroups"
    if cpu_hierarchy() is None:
        return ("CPU shares (--edge-cpu) need a writable cgroup hierarchy with the cpu controller (cgroup v2 with "
                "cpu in cgroup.subtree_control, or a v1 cpu mount); none is mounted here")
    return None


class CpuShares:
    """One cgroup per limited edge, removed on exit (a context manager)."""

    def __init__(self, workdir: Path, shares: dict[int, float]) -> None:
        self.workdir = workdir
        self.shares = dict(shares)
        self.cgroups: dict[int, Path] = {}

    def __enter__(self) -> CpuShares:
        hierarchy = cpu_hierarchy()
        if hierarchy is None:
            raise DeployError(cpu_limit_unavailable_reason() or "no cgroup hierarchy with the cpu controller")
        try:
            for k, share in sorted(self.shares.items()):
                path = hierarchy.root / f"{CGROUP_PREFIX}{resource_tag(self.workdir)}-edge-{k}"
                path.mkdir()
                self.cgroups[k] = path
                quota = max(1000, round(share * CFS_PERIOD_US))
                if hierarchy.version == "v2":
                    (path / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}\n")
                else:
                    (path / "cpu.cfs_period_us").write_text(f"{CFS_PERIOD_US}\n")
                    (path / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        except OSError as error:
            remove_tagged_resources(self.workdir)
            raise DeployError(f"making a CPU cgroup for --edge-cpu failed: {error}") from None
        except BaseException:
            remove_tagged_resources(self.workdir)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        remove_tagged_resources(self.workdir)


@dataclass
class EdgeConditions:
    """The checked ``--link`` and ``--edge-cpu`` options of one ``deploy local``: edge index -> bits per second
    (None: in a namespace, unshaped), edge index -> share of one core."""

    num_edges: int
    rates: dict[int, int | None] = field(default_factory=dict)
    shares: dict[int, float] = field(default_factory=dict)
    links: ShapedLinks | None = None
    cpu: CpuShares | None = None

    @classmethod
    def parse(cls, links: Sequence[str], edge_cpu: Sequence[str], *, num_edges: int) -> EdgeConditions:
        """Check the options and that this machine can apply them (a ConfigError or DeployError, before anything
        starts)."""
        rates = parse_edge_values(links, flag="--link", num_edges=num_edges, parse=parse_rate)
        shares = parse_edge_values(edge_cpu, flag="--edge-cpu", num_edges=num_edges, parse=parse_cpu_share)
        if links:
            reason = links_unavailable_reason()
            if reason:
                raise DeployError(reason)
        if edge_cpu:
            reason = cpu_limit_unavailable_reason()
            if reason:
                raise DeployError(reason)
        # Any --link puts every edge in a namespace (unshaped unless it has a rate), so all reach the same address.
        all_rates: dict[int, int | None] = {k: rates.get(k) for k in range(num_edges)} if links else {}
        return cls(num_edges, all_rates, shares)

    @property
    def active(self) -> bool:
        return bool(self.rates or self.shares)

    @contextlib.contextmanager
    def applied(self, workdir: Path) -> Iterator[EdgeConditions]:
        """Make the namespaces, links and cgroups; remove them all on exit, however it exits."""
        with contextlib.ExitStack() as stack:
            if self.rates:
                self.links = stack.enter_context(ShapedLinks(workdir, self.num_edges, self.rates))
            if self.shares:
                self.cpu = stack.enter_context(CpuShares(workdir, self.shares))
            try:
                yield self
            finally:
                self.links, self.cpu = None, None

    @property
    def superlink_host(self) -> str:
        return self.links.superlink_host if self.links is not None else "127.0.0.1"

    def namespace(self, k: int) -> str | None:
        return self.links.namespace(k) if self.links is not None else None

    def cgroup(self, k: int) -> Path | None:
        return self.cpu.cgroups.get(k) if self.cpu is not None else None

    def record(self, directory: Path) -> None:
        """Write what was applied to ``directory``/edge_conditions.json (nothing when there are no conditions)."""
        if self.active:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "edge_conditions.json").write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    def to_dict(self) -> dict[str, Any]:
        """{"links": ..., "edge_cpu": ...}, the keys given; empty without conditions."""
        described: dict[str, Any] = {}
        if self.links is not None:
            described["links"] = self.links.to_dict()
        elif self.rates:
            described["links"] = {f"edge-{k}": format_rate(b) if b else "unshaped" for k, b in self.rates.items()}
        if self.shares:
            described["edge_cpu"] = {f"edge-{k}": share for k, share in sorted(self.shares.items())}
        return described
