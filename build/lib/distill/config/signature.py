"""Checking YAML arguments against a class's typed keyword-only `__init__` signature."""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from typing import Any, Union


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def value_matches(value: Any, annotation: Any) -> bool:
    """True if a plain YAML value fits a type annotation (ints are accepted as floats)."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(value_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        if not isinstance(value, list | tuple):
            return False
        args = typing.get_args(annotation)
        inner = args[0] if args else Any
        return all(value_matches(v, inner) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def check_kwargs(cls: type, kwargs: dict[str, Any], path: str, what: str) -> list[str]:
    """Problems with `kwargs` for `cls(**kwargs)`: unknown names, missing ones, wrong types.

    Args:
        cls: A class whose `__init__` takes keyword-only arguments.
        kwargs: The YAML arguments.
        path: Dotted YAML path of the arguments mapping, e.g. `edges.si_st.args`.
        what: How to name the class in messages, e.g. `loss 'infonce'`.
    """
    sig = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__)
    params = {n: p for n, p in sig.parameters.items() if n != "self" and p.kind is p.KEYWORD_ONLY}
    problems = []
    for name, value in kwargs.items():
        if name not in params:

            close = difflib.get_close_matches(name, list(params), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            takes = ", ".join(params) or "no arguments"
            problems.append(f"{path}.{name}: {what} takes no argument {name!r}; {hint}it takes: {takes}")
            continue
        annotation = hints.get(name, inspect.Parameter.empty)
        if not value_matches(value, annotation):
            problems.append(
                f"{path}.{name}: expected {_type_name(annotation)}, got {value!r} ({type(value).__name__})"
            )
    for name, p in params.items():
        if p.default is inspect.Parameter.empty and name not in kwargs:
            problems.append(f"{path}.{name}: required by {what}")
    return problems
