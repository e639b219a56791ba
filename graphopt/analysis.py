"""Registry of analyses: pure functions of a Graph whose results the Graph caches.

Results must be plain data keyed by node or module names (never the graph's own node or
module objects): a cloned Graph keeps its original's cache. ``Graph.commit()`` drops every
result after a structural edit; after a pass that changed the graph, the PassManager keeps
only the analyses the pass ``preserves``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from graphopt.errors import GraphoptError

if TYPE_CHECKING:
    from graphopt.ir import Graph

AnalysisFn = Callable[["Graph"], Any]
_ANALYSES: dict[str, AnalysisFn] = {}


def register_analysis(name: str) -> Callable[[AnalysisFn], AnalysisFn]:
    """Decorator: make ``fn(graph)`` available as ``graph.analysis(name)``."""

    def decorate(fn: AnalysisFn) -> AnalysisFn:
        _ANALYSES[name] = fn
        return fn

    return decorate


def analysis_names() -> list[str]:
    return sorted(_ANALYSES)


def get_analysis(name: str) -> AnalysisFn:
    try:
        return _ANALYSES[name]
    except KeyError:
        raise GraphoptError(f"unknown analysis {name!r}; known: {', '.join(analysis_names())}") from None
