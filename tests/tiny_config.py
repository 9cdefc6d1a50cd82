"""Small run configs for tests: a base dict with some keys or whole sections replaced."""

from __future__ import annotations

import copy
from typing import Any


def with_overrides(base: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A deep copy of ``base`` where a dict value updates that section and any other value replaces the key."""
    cfg = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    return cfg
