"""Per-edge settings given on the command line: ``--link NAME=RATE`` and ``--edge-cpu NAME=SHARE``.

The one set of parsers for these flags: ``ecavg plan`` and ``ecavg deploy local`` (``links.py``, ``conditions.py``)
both read them here, so a value the plan accepts is one the deployment accepts, and means the same.

``NAME`` is ``edge-K`` (one edge) or ``all`` (every edge not named on its own, whatever the order). ``RATE`` is
written as ``tc`` writes it, decimal as in ``tc(8)``: ``bit``, ``kbit``, ``mbit``, ``gbit`` are bits per second
(``10mbit`` = 10,000,000 bit/s), and ``bps``, ``kbps``, ``mbps``, ``gbps`` are bytes per second (``2mbps`` = 16 mbit);
case-insensitive, decimals allowed (``1.5mbit``), from 8kbit (below about 1 kB/s a gRPC message of any size times
out before it arrives) to 10gbit. A bare number is refused: it could be either. ``SHARE`` is the fraction of one
CPU core an edge gets (``0.25``: a quarter of a core), from 0.01 (the kernel's smallest quota, 1 ms per 100 ms) to
this machine's number of cores.

Every refusal is a one-line ConfigError naming the flag and the value. Standard library only.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from typing import Protocol, TypeVar

from ecavg.errors import ConfigError

__all__ = ["ALL_EDGES", "MAX_RATE_BPS", "MIN_CPU_SHARE", "MIN_RATE_BPS", "RATE_UNITS", "format_rate",
           "parse_cpu_share", "parse_edge_values", "parse_rate", "tc_rate"]

ALL_EDGES = "all"
# tc's rate units (tc(8), "RATES"), decimal: bits per second for *bit, bytes per second for *bps.
RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "bps": 8, "kbps": 8 * 10**3,
              "mbps": 8 * 10**6, "gbps": 8 * 10**9}
MIN_RATE_BPS = 8_000  # below about 1 kB/s a gRPC message of any size times out before it arrives
MAX_RATE_BPS = 10 * 10**9
MIN_CPU_SHARE = 0.01  # the kernel's smallest CFS quota is 1 ms per 100 ms period
_RATE = re.compile(r"(\d*\.?\d+)([a-z]+)")
_EDGE = re.compile(r"edge-(0|[1-9]\d*)")  # edge-K as the run names its edges (no leading zeros)
_FORMAT_UNITS = (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3))

V = TypeVar("V", covariant=True)


class ValueParser(Protocol[V]):
    """A parser of one ``VALUE``; ``flag`` is what its errors name (``--link``, or ``--link edge-1``)."""

    def __call__(self, text: str, *, flag: str) -> V: ...


def parse_rate(text: str, *, flag: str = "--link") -> int:
    """A link rate as tc writes it (``10mbit``, ``500kbit``, ``1.5mbit``, ``2mbps`` = 2 MB/s) -> bits per second."""
    match = _RATE.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    if match is None or match.group(2) not in RATE_UNITS:
        raise ConfigError(f"{flag}: {text!r} is not a rate; write a number and one of {', '.join(RATE_UNITS)} "
                          "(e.g. 10mbit, 500kbit; as tc does, *bps are bytes per second)")
    bits = float(match.group(1)) * RATE_UNITS[match.group(2)]
    if not (math.isfinite(bits) and MIN_RATE_BPS <= round(bits) <= MAX_RATE_BPS):
        raise ConfigError(f"{flag}: {text!r} is out of range; rates go from 8kbit to 10gbit")
    return round(bits)


def tc_rate(bps: int) -> str:
    """The rate as ``tc`` takes it, in whole bits per second: ``tc_rate(parse_rate("1.5mbit")) == "1500000bit"``."""
    return f"{bps}bit"


def format_rate(bps: float) -> str:
    """The shortest form in bit units that :func:`parse_rate` reads back as the same whole bits per second
    (``20mbit``, ``1.5mbit``, ``8kbit``; a fractional rate is rounded to whole bits first)."""
    whole = round(bps)
    for unit, scale in _FORMAT_UNITS:
        if whole >= scale:
            return f"{whole / scale:.10g}{unit}"
    return f"{whole}bit"


def parse_cpu_share(text: str, *, flag: str = "--edge-cpu") -> float:
    """A CPU share: a fraction of one core, from 0.01 to this machine's number of cores (e.g. 0.25, 1, 1.5)."""
    try:
        share = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag}: {text!r} is not a CPU share; write a fraction of one core, e.g. 0.25") from None
    cores = os.cpu_count() or 1
    if not MIN_CPU_SHARE <= share <= cores:  # also refuses nan and inf
        raise ConfigError(f"{flag}: {text!r} is out of range; a CPU share goes from {MIN_CPU_SHARE} to {cores} "
                          "(this machine's cores)")
    return share


def parse_edge_values(items: Iterable[str], *, flag: str, num_edges: int, parse: ValueParser[V]) -> dict[int, V]:
    """``NAME=VALUE`` items (NAME ``edge-K`` or ``all``) -> {edge index: parsed value}, for edges 0..num_edges-1.

    ``all`` gives every edge its value; an ``edge-K`` given as well overrides it for that edge, whatever the order.
    Without ``all``, edges not named are absent. ``flag`` names the option in errors. Refused (ConfigError): a
    missing ``=`` or value, a name other than ``edge-K`` or ``all``, an edge the run does not have, a name given
    twice, a value ``parse`` refuses.
    """
    every: V | None = None
    named: dict[int, V] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise ConfigError(f"{flag}: {item!r} is not NAME=VALUE (NAME is edge-K or {ALL_EDGES})")
        if name == ALL_EDGES:
            if every is not None:
                raise ConfigError(f"{flag}: {ALL_EDGES}= is given twice")
            every = parse(value, flag=f"{flag} {name}")
            continue
        match = _EDGE.fullmatch(name)
        if match is None:
            raise ConfigError(f"{flag}: {name!r} is not an edge name; write edge-K (K from 0 to {num_edges - 1}) "
                              f"or {ALL_EDGES}")
        k = int(match.group(1))
        if k >= num_edges:
            raise ConfigError(f"{flag}: {name} does not exist: the run has {num_edges} edges (edge-0 to "
                              f"edge-{num_edges - 1})")
        if k in named:
            raise ConfigError(f"{flag}: {name} is given twice")
        named[k] = parse(value, flag=f"{flag} {name}")
    if every is None:
        return dict(sorted(named.items()))
    return {k: named.get(k, every) for k in range(num_edges)}
