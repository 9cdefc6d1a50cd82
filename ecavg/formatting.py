"""How figures are written in every table (results.md, sweep.md, the generated docs): one definition each."""

from __future__ import annotations

import statistics
from typing import Any, Iterable, Mapping


def percent(fraction: float | None, unit: str = "") -> str:
    """0.8116 -> "81.16" (+ unit); None -> "-"."""
    return "-" if fraction is None else f"{100 * fraction:.2f}{unit}"


def change_pp(after: float | None, before: float | None) -> str:
    """The change from ``before`` to ``after`` in percentage points, signed: "+3.40 pp"."""
    return "-" if after is None or before is None else f"{100 * (after - before):+.2f} pp"


def mean_std(values: Iterable[float | None]) -> tuple[float, float] | None:
    """Mean and population standard deviation of the values present (None when there are none)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return statistics.fmean(present), statistics.pstdev(present) if len(present) > 1 else 0.0


def percent_spread(values: Iterable[float | None]) -> str:
    """Fractions over seeds as "mean ± std" in percent (a single value without the spread)."""
    present = [v for v in values if v is not None]
    if len(present) <= 1:
        return percent(present[0] if present else None)
    mean, std = mean_std(present)  # type: ignore[misc]
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def transfer_label(section: Mapping[str, Any]) -> str:
    """The label of a ``transfer`` record (results.json, config.json; records from before ``deflate`` lack it):
    ``int8``, ``int8+delta``, ``int8+delta+deflate``."""
    return (section.get("codec", "fp32") + ("+delta" if section.get("delta") else "")
            + ("+deflate" if section.get("deflate") else ""))
