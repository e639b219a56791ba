"""Backend registry and the report every export returns.

A backend is a function ``export(graph, path, **options) -> ExportReport`` registered
under a name; it writes atomically and checks the artifact against the graph's outputs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

from graphopt.files import check_output_path
from graphopt.options import Options, options_model as build_options_model, validate_options
from graphopt.registry import Registry


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
BACKENDS: Registry[ExportFn] = Registry("backend")


def register_backend(name: str, rules: type[Options] = Options) -> Callable[[ExportFn], ExportFn]:
    """Function decorator: make ``fn`` the backend ``name``. Every call, from Python or a pipeline
    file, has its output path and options checked first (by the option model built from ``fn``'s
    keyword parameters and ``rules``), so a bad one costs no export work."""
    def decorate(fn: ExportFn) -> ExportFn:
        model = functools.cache(lambda: build_options_model(f"backend {name!r}", fn, skip=("graph", "path"),
                                                            base=rules))

        @functools.wraps(fn)
        def checked(graph: Any, path: Any, **options: Any) -> ExportReport:
            options = validate_options(model(), options, stacklevel=3)
            path = check_output_path(path, f"backend {name!r}: path")
            source = getattr(graph, "device", None)
            if source is None or source.type == "cpu":
                return fn(graph, path, **options)
            # artifacts are written and checked on the CPU (onnxruntime's CPU provider, torch's int8
            # kernels): from a CPU copy of a graph that lives elsewhere, so the user moves nothing
            report = fn(graph.clone().to("cpu"), path, **options)
            report.details["exported_from"] = f"{source} (a CPU copy of the graph)"
            return report

        checked.options_model = model   # type: ignore[attr-defined]
        BACKENDS.add(name, checked)
        return checked

    return decorate


def registered_backends() -> dict[str, ExportFn]:
    return BACKENDS.entries()


def get_backend(name: str) -> ExportFn:
    return BACKENDS.get(name)


def options_model(name: str) -> type[Options]:
    """The pydantic model of backend ``name``'s options."""
    return get_backend(name).options_model()   # type: ignore[attr-defined]


def check_backend_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked for backend ``name`` (deprecated names replaced)."""
    return validate_options(options_model(name), options)
