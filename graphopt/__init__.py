"""graphopt: trace a PyTorch model into an IR, run verified compression passes, export it."""
from graphopt.analysis import register_analysis
from graphopt.backend import ExportReport, get_backend, register_backend, registered_backends
from graphopt.errors import (ConfigError, ContractViolation, DataError, EvaluationError, ExportError, GraphLintError,
                             GraphoptError, PassFailed, RequirementError, TraceError)
from graphopt.ir import Graph
from graphopt.ops import OpKind, register_op_kind
from graphopt.pass_base import (Contract, Pass, PassContext, PassResult, get_pass, register_pass,
                                registered_passes)
from graphopt.pass_manager import PassManager, PassRecord, PipelineResult
from graphopt.trace import trace

__version__ = "0.1.0"

__all__ = [
    "trace", "Graph", "OpKind", "register_op_kind", "Pass", "PassContext", "PassResult", "Contract", "register_pass",
    "get_pass", "registered_passes", "PassManager", "PassRecord", "PipelineResult", "register_analysis",
    "register_backend", "get_backend", "registered_backends", "ExportReport", "GraphoptError",
    "TraceError", "GraphLintError", "RequirementError", "ContractViolation", "PassFailed", "ConfigError",
    "ExportError", "DataError", "EvaluationError", "compress", "Goal",
]


def __getattr__(name: str):
    """``graphopt.compress`` and ``graphopt.Goal`` load the search (optuna, matplotlib) on first use,
    so ``import graphopt`` stays light."""
    if name in ("compress", "Goal"):
        from graphopt import search

        return getattr(search, name)
    raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
