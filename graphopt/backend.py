"""Backend registry and the report every export returns.

A backend is a function ``export(graph, path, **options) -> ExportReport`` registered
under a name; it writes atomically and checks the artifact against the graph's outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from graphopt.errors import ConfigError
from graphopt.options import check_options
from graphopt.plugins import load_plugins


@dataclass
class ExportReport:
    backend: str
    path: str
    bytes: int
    max_abs_error: float
    max_rel_error: float
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    # runs the written artifact on a tuple of inputs (for latency reports); not serialised
    runner: Callable[..., Any] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("backend", "path", "bytes", "max_abs_error", "max_rel_error",
                                               "seconds", "details")}


ExportFn = Callable[..., ExportReport]
_BACKENDS: dict[str, ExportFn] = {}


def register_backend(name: str) -> Callable[[ExportFn], ExportFn]:
    def decorate(fn: ExportFn) -> ExportFn:
        _BACKENDS[name] = fn
        return fn

    return decorate


def registered_backends() -> dict[str, ExportFn]:
    load_plugins()
    return dict(sorted(_BACKENDS.items()))


def get_backend(name: str) -> ExportFn:
    backends = registered_backends()
    if name not in backends:
        raise ConfigError(f"unknown backend {name!r}; registered backends: {', '.join(backends) or '(none)'}")
    return backends[name]


def check_backend_options(name: str, options: dict[str, Any]) -> None:
    check_options(f"backend {name!r}", get_backend(name), options, skip=("graph", "path"))
