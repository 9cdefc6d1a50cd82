"""Value checks for config keys: each returns None when a value is fine, else what is wrong ("must be ...").

Torch-free, so that the config and every registered option (``ecavg.registry.Key``) share them.
"""

from __future__ import annotations

import math
from typing import Any, Callable

Check = Callable[[Any], "str | None"]


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float's range (TOML allows 64-bit ints; callers may pass any)
        return False


def choice(options: tuple[str, ...]) -> Check:
    def check(v: Any) -> str | None:
        return None if v in options else f"must be one of {', '.join(options)}"

    return check


def int_at_least(lo: int) -> Check:
    def check(v: Any) -> str | None:
        return None if is_int(v) and v >= lo else f"must be an integer >= {lo}"

    return check


def number_in(lo: float, hi: float, *, lo_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        ok = is_number(v) and (v > lo if lo_open else v >= lo) and v <= hi
        bracket = "(" if lo_open else "["
        return None if ok else f"must be a number in {bracket}{lo}, {hi}]"

    return check


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def string(v: Any) -> str | None:
    return None if isinstance(v, str) else "must be a string"
