"""One small registry class and the three registries of distill.

A registry maps a snake_case name (what a YAML file says) to a class. Registering a name
twice raises; looking up an unknown name raises a `ConfigError` that says which registry,
which YAML path the name came from, a did-you-mean and every available name.

The built-in entries are found, not listed: on its first lookup a registry imports every
module of its package (`distill.losses`, `distill.models`, `distill.data`) whose name does
not start with `_`, and each module registers its classes with the decorator. A new loss
file in `distill/losses/` is therefore picked up without an import line anywhere.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from distill.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of classes, filled by the `register` decorator.

    Args:
        kind: What the registry holds ("model", "loss", "dataset"); used in error messages.
        package: The package whose modules register the built-in entries; imported on the
            first lookup.
    """

    def __init__(self, kind: str, package: str | None = None) -> None:
        self.kind = kind
        self.package = package
        self._entries: dict[str, T] = {}
        self._discovered = package is None

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True  # before importing: the modules call `register`
        assert self.package is not None
        root = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(root.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that adds a class under `name`; a second registration of a name raises."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise KeyError(
                    f"{self.kind} {name!r} is already registered by {self._entries[name]!r}; "
                    "pick another name"
                )
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str, path: str = "") -> T:
        """Return the entry for `name`, or raise a one-line `ConfigError` naming `path`."""
        self._discover()
        if name in self._entries:
            return self._entries[name]
        close = difflib.get_close_matches(str(name), list(self._entries), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        where = f"{path}: " if path else ""
        raise ConfigError(
            f"{where}unknown {self.kind} {name!r}; {hint}available: {', '.join(sorted(self._entries))}"
        )

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        """All registered names, sorted."""
        self._discover()
        return sorted(self._entries)


MODELS: Registry[type] = Registry("model", "distill.models")
LOSSES: Registry[type] = Registry("loss", "distill.losses")
DATASETS: Registry[type] = Registry("dataset", "distill.data")
