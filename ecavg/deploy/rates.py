"""Per-edge settings given on the command line: ``--link NAME=RATE`` and ``--edge-cpu NAME=SHARE``.

``NAME`` is ``edge-K`` (one edge) or ``all`` (every edge not named on its own, whatever the order). ``RATE`` is
a bit rate in ``tc``'s units, decimal as in ``tc``: ``bit``, ``kbit``, ``mbit``, ``gbit``, ``tbit`` (``10mbit`` =
10,000,000 bit/s; case-insensitive, decimals allowed: ``1.5mbit``). A bare number and ``tc``'s byte units
(``bps``, ``kbps``, ...; bytes per second there) are refused: the two readings differ by 8x. ``SHARE`` is a
number > 0: the fraction of one CPU core an edge gets (``0.25``: a quarter of a core).

Used by ``ecavg plan`` and meant for ``ecavg deploy local`` too, so both read the same flags the same way.
Standard library only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import TypeVar

from ecavg.errors import ConfigError

__all__ = ["ALL_EDGES", "BIT_UNITS", "format_rate", "parse_cpu_share", "parse_edge_values", "parse_rate", "tc_rate"]

ALL_EDGES = "all"
# Decimal multipliers, as tc(8) reads them ("kbit" = 1000 bit/s).
BIT_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*$", re.IGNORECASE)
_EDGE = re.compile(r"^edge-(\d+)$")
_MAX_CPU_SHARE = 1024.0  # cores; a larger share is a typo

V = TypeVar("V")


def parse_rate(text: str) -> float:
    """Bits per second of a rate such as ``10mbit``, ``500kbit`` or ``1.5gbit`` (ConfigError otherwise)."""
    match = _RATE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(f"link rate {text!r} is not a number with a unit; write e.g. 10mbit, 500kbit or 1gbit")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit not in BIT_UNITS:
        hint = " (tc's bps units are bytes per second; write bits: kbit, mbit, gbit)" if unit.endswith("bps") else ""
        raise ConfigError(f"link rate {text!r} has unknown unit {unit!r}{hint}; use one of {', '.join(BIT_UNITS)}")
    bits = number * BIT_UNITS[unit]
    if not math.isfinite(bits) or bits < 1.0:
        raise ConfigError(f"link rate {text!r} must be at least 1bit")
    return bits


def tc_rate(bits_per_s: float) -> str:
    """The rate as ``tc`` takes it (whole bits per second): ``tc_rate(parse_rate("1.5mbit")) == "1500000bit"``."""
    return f"{int(round(bits_per_s))}bit"


def format_rate(bits_per_s: float) -> str:
    """Short human form: ``10mbit``, ``1.5mbit``, ``500kbit``."""
    for unit in ("tbit", "gbit", "mbit", "kbit"):
        if bits_per_s >= BIT_UNITS[unit]:
            return f"{bits_per_s / BIT_UNITS[unit]:.4g}{unit}"
    return f"{bits_per_s:.4g}bit"


def parse_cpu_share(text: str) -> float:
    """An edge's CPU share: a number > 0 (fraction of one core; more than 1 means several cores)."""
    try:
        share = float(text)
    except (TypeError, ValueError):
        share = math.nan
    if not math.isfinite(share) or not 0.0 < share <= _MAX_CPU_SHARE:
        raise ConfigError(f"CPU share {text!r} must be a number > 0 (fraction of one core, e.g. 0.25), "
                          f"at most {_MAX_CPU_SHARE:g}")
    return share


def parse_edge_values(items: Iterable[str], num_edges: int, parse: Callable[[str], V], *,
                      flag: str) -> dict[str, V]:
    """``{edge-K: value}`` from ``NAME=VALUE`` items (``NAME``: ``edge-K`` or ``all``), for edges 0..num_edges-1.

    Edges named by neither an item of their own nor ``all`` are absent. ``flag`` names the option in errors.
    Refused (ConfigError): a missing ``=``, an unknown name, an edge the run does not have, a name given twice.
    """
    default: V | None = None
    given: dict[str, V] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name or not value.strip():
            raise ConfigError(f"{flag} {item!r}: expected NAME=VALUE with NAME edge-K or {ALL_EDGES}")
        if name == ALL_EDGES:
            if default is not None:
                raise ConfigError(f"{flag} {ALL_EDGES}=... is given twice")
            default = _parsed(parse, value.strip(), flag, item)
            continue
        match = _EDGE.match(name)
        if match is None:
            raise ConfigError(f"{flag} {item!r}: unknown name {name!r}; use edge-K (K = 0 .. {num_edges - 1}) "
                              f"or {ALL_EDGES}")
        if int(match.group(1)) >= num_edges:
            raise ConfigError(f"{flag} {item!r}: the run has {num_edges} edges (edge-0 .. edge-{num_edges - 1})")
        canonical = f"edge-{int(match.group(1))}"
        if canonical in given:
            raise ConfigError(f"{flag} names {canonical} twice")
        given[canonical] = _parsed(parse, value.strip(), flag, item)
    out: dict[str, V] = {}
    for k in range(num_edges):
        name = f"edge-{k}"
        if name in given:
            out[name] = given[name]
        elif default is not None:
            out[name] = default
    return out


def _parsed(parse: Callable[[str], V], value: str, flag: str, item: str) -> V:
    try:
        return parse(value)
    except ConfigError as error:
        raise ConfigError(f"{flag} {item!r}: {error}") from None
