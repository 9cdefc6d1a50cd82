"""One registry mechanism for every pluggable choice: strategies, aggregation rules, server objectives, ...

A choice is selected by one config key (``strategy``, ``aggregation``, ``server.objective``); each option is a
class with a ``name``, a one-line ``summary`` and the config keys it adds (``keys``: dotted key -> ``Key``).
Config validation, the CLI's help and the docs builder read the names and keys from here, so adding an option is
one class (decorated with ``@REGISTRY.register``) plus its config keys.

This module imports nothing heavy: the config can list keys without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Iterator, Mapping, TypeVar

from ecavg.config.checks import Check
from ecavg.errors import ConfigError


@dataclass(frozen=True)
class Key:
    """One config key an option adds: its default and its check."""

    default: Any
    check: Check
    doc: str = ""


class Option:
    """What every registered option declares; options built per run keep the resolved config."""

    name: ClassVar[str]
    summary: ClassVar[str]
    keys: ClassVar[dict[str, Key]] = {}

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = cfg


T = TypeVar("T", bound=Option)


class Registry(Generic[T]):
    """Named options for one config key.

    ``selector`` is the dotted config key that picks the option (e.g. ``"server.objective"``), ``default`` the
    option used when the key is absent.
    """

    def __init__(self, selector: str, default: str, *, what: str):
        self.selector = selector
        self.default = default
        self.what = what
        self._options: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__name__} needs a class attribute 'name' to be registered as a {self.what}")
        if name in self._options:
            raise TypeError(f"{self.what} {name!r} is registered twice "
                            f"({self._options[name].__name__}, {cls.__name__})")
        self._options[name] = cls
        return cls

    def names(self) -> tuple[str, ...]:
        return tuple(self._options)

    def get(self, name: str) -> type[T]:
        try:
            return self._options[name]
        except KeyError:
            raise ConfigError(f"config key '{self.selector}' must be one of {', '.join(self._options)}, "
                              f"got {name!r}") from None

    def __iter__(self) -> Iterator[type[T]]:
        return iter(self._options.values())

    def keys(self) -> dict[str, Key]:
        """Every config key the options add (dotted), with its default and check."""
        out: dict[str, Key] = {}
        for cls in self._options.values():
            for dotted, key in getattr(cls, "keys", {}).items():
                if dotted in out and out[dotted] is not key:
                    raise TypeError(f"config key {dotted!r} is declared by two {self.what}s")
                out[dotted] = key
        return out


def selected(registry: Registry[T], cfg: dict[str, Any]) -> type[T]:
    """The option a resolved config selects."""
    node: Any = cfg
    for part in registry.selector.split("."):
        node = node[part]
    return registry.get(node)
