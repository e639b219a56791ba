"""Backend registry and the report every export returns.

A backend is a function ``export(graph, path, **options) -> ExportReport`` registered
under a name; it writes atomically and checks the artifact against the graph's outputs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

from graphopt.errors import ConfigError
from graphopt.files import check_output_path
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
    """Function decorator: make ``fn`` the backend ``name``. Every call, from Python or a pipeline
    file, has its output path and options checked first, so a bad one costs no export work."""
    def decorate(fn: ExportFn) -> ExportFn:
        @functools.wraps(fn)
        def checked(graph: Any, path: Any, **options: Any) -> ExportReport:
            check_options(f"backend {name!r}", fn, options, skip=("graph", "path"))
            return fn(graph, check_output_path(path, f"backend {name!r}: path"), **options)

        _BACKENDS[name] = checked
        return checked

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
