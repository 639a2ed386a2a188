"""One small registry class and the three registries of distill.

A registry maps a snake_case name (what a YAML file says) to a class. Registering a name
twice raises; looking up an unknown name raises a `ConfigError` that says which registry,
which YAML path the name came from, a did-you-mean and every available name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from distill.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of classes, filled by the `register` decorator.

    Args:
        kind: What the registry holds ("model", "loss", "dataset"); used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

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
        if name in self._entries:
            return self._entries[name]
        close = difflib.get_close_matches(str(name), list(self._entries), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        where = f"{path}: " if path else ""
        raise ConfigError(
            f"{where}unknown {self.kind} {name!r}; {hint}available: {', '.join(sorted(self._entries))}"
        )

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._entries)


MODELS: Registry[type] = Registry("model")
LOSSES: Registry[type] = Registry("loss")
DATASETS: Registry[type] = Registry("dataset")
