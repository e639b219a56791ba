"""Checking user-supplied options (from Python or a pipeline file) against a signature.

Passes and backends take their options as keyword arguments; this module turns a wrong
key, a wrong type (a string where a list of names is due, a list of numbers where a list of
names is due, NaN where a number is due) or a value outside the range the annotation
declares into a ConfigError that names the option and what would have been valid.

Ranges are declared once, in the signature, with the aliases below::

    def __init__(self, lr: Positive = 1e-3, max_batches: Count | None = None, bound: Tolerance = 0.05): ...
"""
from __future__ import annotations

import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable

from graphopt.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """The interval a number option must lie in (``Annotated[float, Range(0, 1)]``); finite
    unless ``infinite`` (a tolerance of ``inf`` means "accept any error")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    infinite: bool = False

    def holds(self, value: float) -> bool:
        if not self.infinite and (abs(value) > 1e308 or math.isinf(value)):   # an int past any float counts too
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, base: Any) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        article = "an" if base is int else "a finite" if not self.infinite else "a"
        return f"{article} {_name(base)} " + " and ".join(parts)


Positive = Annotated[float, Range(0, low_open=True)]            # a learning rate, a temperature, epochs
NonNegative = Annotated[float, Range(0)]                        # a weight decay, a loss weight
Tolerance = Annotated[float, Range(0, infinite=True)]           # an error bound
Fraction = Annotated[float, Range(0, 1)]                        # a mixing weight
Count = Annotated[int, Range(1)]                                # batches, iterations

_SIMPLE = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}
_NAMES = {"int": int, "float": float, "bool": bool, "str": str}


def _name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Annotated:
        base, *extras = typing.get_args(annotation)
        ranges = [e for e in extras if isinstance(e, Range)]
        return ranges[0].describe(base) if ranges else _name(base)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if typing.get_origin(annotation) in (list, tuple, dict):
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))


def _accepts(annotation: Any, value: Any) -> bool:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    if isinstance(annotation, str):  # an annotation that could not be resolved: only the simple spellings
        annotation = _NAMES.get(annotation, Any)
        if annotation is Any:
            return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        ranges = [e for e in args[1:] if isinstance(e, Range)]
        return _accepts(args[0], value) and all(r.holds(value) for r in ranges)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in args)
    if annotation is type(None):
        return value is None
    if annotation in _SIMPLE:
        if isinstance(value, bool) and annotation is not bool:
            return False
        if isinstance(value, float) and math.isnan(value):
            return False   # NaN compares false with everything: no range check could catch it later
        return isinstance(value, _SIMPLE[annotation])
    sequence = (list, tuple) if list in (origin, annotation) else tuple   # a Python caller's tuple for a list
    if origin in (list, tuple):   # list[str]: a list, and every item a str
        return isinstance(value, sequence) and (not args or all(_accepts(args[0], v) for v in value))
    if origin is dict:
        return isinstance(value, dict) and (not args or all(_accepts(args[0], k) and _accepts(args[1], v)
                                                            for k, v in value.items()))
    if isinstance(annotation, type):   # list, dict, or a class such as an importance criterion
        return isinstance(value, sequence if annotation is list else annotation)
    return True


def option_names(fn: Callable) -> list[str]:
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _annotations(fn: Callable) -> dict[str, Any]:
    """Each parameter's annotation, resolved where the module's names allow (one unresolvable
    annotation leaves the others resolved)."""
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:
        pass
    resolved = {}
    for name, param in inspect.signature(fn).parameters.items():
        annotation = param.annotation
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, getattr(fn, "__globals__", {}))   # as get_type_hints would
            except Exception:
                pass
        resolved[name] = annotation
    return resolved


def check_options(owner: str, fn: Callable, options: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    """Raise ConfigError if ``options`` has a key ``fn`` does not take, or a value of the wrong
    type or outside its declared range."""
    signature = inspect.signature(fn)
    hints = _annotations(fn)
    valid = [n for n in option_names(fn) if n not in skip]
    for key, value in options.items():
        if key not in valid:
            listing = ", ".join(valid) if valid else "(none)"
            raise ConfigError(f"{owner}: unknown option {key!r}; valid options: {listing}")
        annotation = hints.get(key, signature.parameters[key].annotation)
        if not _accepts(annotation, value):   # the type alone if that is wrong, else the type and range
            loose = _without_ranges(annotation)
            expected = _name(loose if not _accepts(loose, value) else annotation)
            if isinstance(value, float) and math.isnan(value) and _accepts(loose, 0.0):
                expected = "a number, not NaN"
            hint = f" (write [{value!r}])" if isinstance(value, str) and _accepts(annotation, [value]) else ""
            raise ConfigError(f"{owner}: option {key!r} must be {expected}, got {type(value).__name__} {value!r}"
                              f"{hint}")


def _without_ranges(annotation: Any) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return args[0]
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_without_ranges(a) for a in args)]
    return annotation
