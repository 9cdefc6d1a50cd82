"""Property-based fuzzing of the config loader (ecavg.config.resolve_config).

The promise under test: whatever nested dict (or other value) a TOML file, a --set or a caller hands it,
resolve_config returns a config or raises ConfigError, with a one-line message; nothing else escapes. Inputs are
random trees of keys and values, and the defaults with one leaf replaced by anything (so the deeper checks run).
"""

from __future__ import annotations

import copy
import math

import pytest

pytest.importorskip("hypothesis")
from hypothesis import given
from hypothesis import strategies as st

from ecavg.config import ConfigError, defaults, resolve_config

DEFAULTS = defaults()

KNOWN_KEYS = sorted({key for key, value in DEFAULTS.items()} | {k for v in DEFAULTS.values() if isinstance(v, dict)
                                                                 for k in v} | {"deploy", "share_data", "min_edges",
                                                                                "max_message_mb", "round_timeout_s"})
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(10**400), 10**400), st.floats(),
    st.sampled_from([math.nan, math.inf, 1e308, 10**400, -0.0, 2**63, "", "auto", "cuda:x", "ratio", "full"]),
    st.text(max_size=10), st.binary(max_size=4),
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8), st.integers(), st.none(), st.booleans())
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4)
                      | st.tuples(inner), max_leaves=12)


def resolve(fuzz_tally, user):
    try:
        return fuzz_tally.run("config", lambda: resolve_config(user), ConfigError)
    except ConfigError as error:
        assert "\n" not in str(error).strip()
        return None


@given(user=st.one_of(st.dictionaries(keys, values, max_size=6), values))
def test_random_configs_resolve_or_raise_config_error(fuzz_tally, user):
    resolve(fuzz_tally, user)


def leaf_paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    paths = []
    for key, value in tree.items():
        paths.extend(leaf_paths(value, prefix + (key,)) if isinstance(value, dict) else [prefix + (key,)])
    return paths


DEFAULT_PATHS = leaf_paths(DEFAULTS) + [("deploy", key) for key in
                                        ("share_data", "server_data", "min_edges", "round_timeout_s",
                                         "connect_timeout_s", "max_message_mb")]


@given(replacements=st.lists(st.tuples(st.sampled_from(DEFAULT_PATHS), values), min_size=1, max_size=3))
def test_defaults_with_leaves_replaced_resolve_or_raise_config_error(fuzz_tally, replacements):
    user = copy.deepcopy(DEFAULTS)
    user["deploy"] = {}
    for path, value in replacements:
        node = user
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    resolved = resolve(fuzz_tally, user)
    if resolved is not None:
        assert resolved["data"]["num_edges"] >= 1 and resolved["deploy"]["max_message_mb"] > 0


def test_known_config_escapes_raise_config_error():
    for user in ([("seed", 1)], "seed = 1", {"edge": {"lr": 10**400}}, {"data": {"ratios": [10**400]}},
                 {"deploy": {"round_timeout_s": 10**400}}, {"deploy": {1: 2, "a": 3}},
                 {"deploy": {"max_message_mb": 1e308}}):
        with pytest.raises(ConfigError):
            resolve_config(user)
    for user in ({"\n": 1}, {"data": {"a\nb": 1}}, {"deploy": {"\n": 1}}):  # found by the long fuzz run
        with pytest.raises(ConfigError) as caught:
            resolve_config(user)
        assert "\n" not in str(caught.value)
