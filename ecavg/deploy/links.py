"""Emulated edge links for ``ecavg deploy local --link NAME=RATE``: network namespaces, veth pairs, ``tc tbf``.

Each SuperNode runs in a network namespace of its own (``ip netns exec``), joined to the root namespace, where
the SuperLink runs, by a veth pair with a /30 subnet of its own. The SuperLink listens on one address on the root
namespace's loopback device (``lo:ec<tag>``), which every namespace reaches through its veth pair, and which is
local to the root namespace, so the SuperLink's own SuperExec and the ``flwr`` CLI reach it unshaped. A ``tbf``
qdisc on both ends of an edge's veth pair limits both directions (downloads: the root end's egress; uploads: the
edge end's egress) to the edge's rate, so Flower's real traffic crosses a real rate limit.

Latency is not emulated: the ``netem`` qdisc does not exist in every kernel (it does not on the machines this
was built on), and ``tbf`` only limits the rate.

Everything made here is named after the launcher's work directory (``reaper.resource_tag``), so the launcher,
its watchdog (after a SIGKILL) and the next launcher (if the watchdog was killed too) can all delete it with
``reaper.remove_tagged_resources``. Needs root, ``ip`` (iproute2) with ``ip netns``, and ``tc``. The ``--link``
values are parsed in ``rates.py`` (shared with ``ecavg plan``).
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ecavg.deploy.rates import format_rate, tc_rate
from ecavg.deploy.reaper import (
    ADDRESS_LABEL_PREFIX,
    NAMESPACE_PREFIX,
    VETH_PREFIX,
    remove_tagged_resources,
    resource_tag,
)
from ecavg.errors import DeployError

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger("ecavg")

# The subnets for the links: /30 blocks of 10.232.0.0/16, skipping any the root namespace already routes.
LINK_NETWORK = ipaddress.ip_network("10.232.0.0/16")
ALLOCATION_LOCK = Path("/run/lock" if Path("/run/lock").is_dir() else "/tmp") / "ecavg-links.lock"
# The queue of each tbf: at least this many bytes, so that a 64 KiB segmentation-offload packet (split by tbf)
# fits whole; a shorter queue drops most of every burst and the link carries well under its rate.
MIN_QUEUE_BYTES = 128 * 1024
MIN_BURST_BYTES = 16 * 1024


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def links_unavailable_reason() -> str | None:
    """Why shaped links cannot be made here (None: they can). Probes a throw-away namespace with a tbf qdisc."""
    if not sys.platform.startswith("linux"):
        return "emulated links need Linux network namespaces"
    if os.geteuid() != 0:
        return "emulated links (--link) need root: they create network namespaces, veth links and tc qdiscs"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"emulated links (--link) need the {tool} command (iproute2), which is not installed"
    probe = f"{NAMESPACE_PREFIX}probe-{os.getpid()}"
    made = _run(["ip", "netns", "add", probe])
    if made.returncode != 0:
        return f"emulated links (--link) need ip netns, which fails here: {made.stderr.strip()}"
    try:
        shaped = _run(["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", *tbf_arguments(10**6)])
        if shaped.returncode != 0:
            return f"emulated links (--link) need the tbf qdisc, which fails here: {shaped.stderr.strip()}"
    finally:
        _run(["ip", "netns", "delete", probe])
    return None


def tbf_arguments(bps: int) -> list[str]:
    """``tbf`` and its parameters for a link of ``bps`` bits per second (after ``tc qdisc add dev X root``)."""
    rate_bytes = bps // 8
    burst = max(MIN_BURST_BYTES, rate_bytes // 50)  # 20 ms at the line rate
    queue = max(MIN_QUEUE_BYTES, rate_bytes // 4)  # 250 ms at the link's rate
    return ["tbf", "rate", tc_rate(bps), "burst", str(burst), "limit", str(queue)]


def shape(device: str, bps: int, *, namespace: str | None = None) -> None:
    """Limit the egress of ``device`` (in ``namespace``, or in this one) to ``bps`` bits per second."""
    prefix = ["tc"] if namespace is None else ["tc", "-n", namespace]
    _check([*prefix, "qdisc", "add", "dev", device, "root", *tbf_arguments(bps)])


def _check(command: list[str]) -> None:
    done = _run(command)
    if done.returncode != 0:
        raise DeployError(f"making an emulated link failed: `{' '.join(command)}`: {done.stderr.strip()}")


@dataclass(frozen=True)
class EdgeLink:
    """Edge K's side of the emulation: its namespace, the veth end in the root namespace, the /30 addresses and the
    rate (None: the edge is in a namespace, unshaped)."""

    namespace: str
    veth: str
    root_address: str
    edge_address: str
    bps: int | None

    def to_dict(self) -> dict[str, object]:
        return {"namespace": self.namespace, "address": self.edge_address,
                "rate": format_rate(self.bps) if self.bps else "unshaped", "rate_bps": self.bps}


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the root namespace has an address in or a route to."""
    found = []
    for line in _run(["ip", "-o", "-4", "addr", "show"]).stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            found.append(ipaddress.ip_interface(fields[fields.index("inet") + 1]).network)
    for line in _run(["ip", "-4", "route", "show", "table", "all"]).stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        if first.startswith(("broadcast", "local", "unreachable")):
            first = line.split()[1]
        try:
            found.append(ipaddress.ip_network(first, strict=False))
        except ValueError:  # "default" and the like
            continue
    return [n for n in found if n.prefixlen > 0]


class ShapedLinks:
    """The namespaces and links of one ``deploy local`` (a context manager: made on enter, deleted on exit).

    ``rates`` maps edge index -> bits per second or None (in a namespace, unshaped); every edge gets a namespace.
    """

    def __init__(self, workdir: Path, num_edges: int, rates: Mapping[int, int | None]) -> None:
        self.workdir = workdir
        self.tag = resource_tag(workdir)
        self.num_edges = num_edges
        self.rates = dict(rates)
        self.links: dict[int, EdgeLink] = {}
        self.superlink_host = ""

    def namespace(self, k: int) -> str:
        return self.links[k].namespace

    def __enter__(self) -> Self:
        try:
            self._make()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        removed = remove_tagged_resources(self.workdir)
        if removed:
            log.debug("removed %s", ", ".join(removed))

    def _make(self) -> None:
        # One lock for every launcher on this machine: two must not pick the same free subnets at once.
        with ALLOCATION_LOCK.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = _used_networks()
            blocks = []
            subnets = list(LINK_NETWORK.subnets(new_prefix=30))
            start = int(self.tag, 16) % len(subnets)
            for i in range(len(subnets)):
                block = subnets[(start + i) % len(subnets)]
                if not any(block.overlaps(n) for n in used):
                    blocks.append(block)
                    if len(blocks) == self.num_edges + 1:
                        break
            if len(blocks) < self.num_edges + 1:
                raise DeployError(f"no free subnets left in {LINK_NETWORK} for {self.num_edges} emulated links")
            hub = str(blocks[0][1])
            _check(["ip", "addr", "add", f"{hub}/32", "dev", "lo", "label", f"{ADDRESS_LABEL_PREFIX}{self.tag}"])
            self.superlink_host = hub
            for k, block in enumerate(blocks[1:]):
                self.links[k] = self._make_link(k, block, hub)
        log.info("emulated links: SuperLink on %s; %s", self.superlink_host, ", ".join(
            f"edge-{k} {link.to_dict()['rate']}" for k, link in self.links.items()))

    def _make_link(self, k: int, block: ipaddress.IPv4Network, hub: str) -> EdgeLink:
        namespace = f"{NAMESPACE_PREFIX}{self.tag}-e{k}"
        veth = f"{VETH_PREFIX}{self.tag}-{k}"
        root_address, edge_address = str(block[1]), str(block[2])
        _check(["ip", "netns", "add", namespace])
        # The peer is created inside the namespace: deleting the namespace deletes the pair.
        _check(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace])
        _check(["ip", "addr", "add", f"{root_address}/30", "dev", veth])
        _check(["ip", "link", "set", veth, "up"])
        _check(["ip", "-n", namespace, "link", "set", "lo", "up"])
        _check(["ip", "-n", namespace, "addr", "add", f"{edge_address}/30", "dev", "eth0"])
        _check(["ip", "-n", namespace, "link", "set", "eth0", "up"])
        # Only the SuperLink's address is routed: the edge reaches nothing else outside its namespace.
        _check(["ip", "-n", namespace, "route", "add", f"{hub}/32", "via", root_address])
        bps = self.rates.get(k)
        if bps:
            shape(veth, bps)  # downloads (the SuperLink to the edge)
            shape("eth0", bps, namespace=namespace)  # uploads
        return EdgeLink(namespace, veth, root_address, edge_address, bps)

    def to_dict(self) -> dict[str, object]:
        return {"superlink_host": self.superlink_host, "latency": "not emulated (no netem qdisc)",
                "edges": {f"edge-{k}": link.to_dict() for k, link in self.links.items()}}


def netns_command(namespace: str | None, command: list[str]) -> list[str]:
    """``command`` run in ``namespace`` (``ip netns exec`` sets the namespace and execs: the pid stays the same)."""
    return command if namespace is None else ["ip", "netns", "exec", namespace, *command]
