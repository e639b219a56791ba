"""Checking user-supplied options (from Python or a pipeline file) against a signature.

Passes and backends take their options as keyword arguments; this module turns a wrong
key or a wrong type into a ConfigError that lists what would have been valid.
"""
from __future__ import annotations

import inspect
import types
import typing
from typing import Any, Callable

from graphopt.errors import ConfigError

_SIMPLE = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def _accepts(annotation: Any, value: Any) -> bool:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    if isinstance(annotation, str):  # postponed annotations: only check the simple spellings
        annotation = {"int": int, "float": float, "bool": bool, "str": str}.get(annotation, Any)
        if annotation is Any:
            return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(types, "UnionType", None)):
        return any(_accepts(a, value) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation in _SIMPLE:
        if isinstance(value, bool) and annotation is not bool:
            return False
        return isinstance(value, _SIMPLE[annotation])
    return True


def option_names(fn: Callable) -> list[str]:
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def check_options(owner: str, fn: Callable, options: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    """Raise ConfigError if ``options`` has a key ``fn`` does not take, or a value of the wrong type."""
    signature = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    valid = [n for n in option_names(fn) if n not in skip]
    for key, value in options.items():
        if key not in valid:
            listing = ", ".join(valid) if valid else "(none)"
            raise ConfigError(f"{owner}: unknown option {key!r}; valid options: {listing}")
        annotation = hints.get(key, signature.parameters[key].annotation)
        if not _accepts(annotation, value):
            expected = getattr(annotation, "__name__", str(annotation))
            raise ConfigError(f"{owner}: option {key!r} must be {expected}, got {type(value).__name__} {value!r}")
