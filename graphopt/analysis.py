"""Registry of analyses: pure functions of a Graph whose results the Graph caches.

Results must be plain data keyed by node or module names (never the graph's own node or
module objects): a cloned Graph keeps its original's cache. ``Graph.commit()`` drops every
result after a structural edit; after a pass that changed the graph, the PassManager keeps
only the analyses the pass ``preserves``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from graphopt.registry import Registry

if TYPE_CHECKING:
    from graphopt.ir import Graph

AnalysisFn = Callable[["Graph"], Any]
ANALYSES: Registry[AnalysisFn] = Registry("analysis", "analyses")


def register_analysis(name: str) -> Callable[[AnalysisFn], AnalysisFn]:
    """Decorator: make ``fn(graph)`` available as ``graph.analysis(name)``."""
    return ANALYSES.register(name)


def analysis_names() -> list[str]:
    return ANALYSES.names()


def get_analysis(name: str) -> AnalysisFn:
    return ANALYSES.get(name)
