"""Errors a user can act on: each names the model part, pass, key or file at fault."""
from __future__ import annotations


class GraphoptError(Exception):
    """Base class of every error graphopt raises on purpose."""


class TraceError(GraphoptError):
    """The model could not be captured as a graph.

    ``module`` is the qualified name of the innermost module being traced when it failed
    ("" for the root), ``reason`` says why, ``attempts`` lists what each tracer said.
    """

    def __init__(self, message: str, module: str = "", reason: str = "", attempts: dict | None = None):
        super().__init__(message)
        self.module = module
        self.reason = reason
        self.attempts = attempts or {}


class GraphLintError(GraphoptError):
    """The graph is not well formed; ``node`` names the offending node."""

    def __init__(self, message: str, node: str | None = None):
        super().__init__(message)
        self.node = node


class RequirementError(GraphoptError):
    """A pass was scheduled without something it declared it needs."""


class ContractViolation(GraphoptError):
    """A pass changed the model's outputs more than its numerical contract allows."""

    def __init__(self, message: str, error: float, bound: float, node: str | None = None):
        super().__init__(message)
        self.error = error
        self.bound = bound
        self.node = node


class PassFailed(GraphoptError):
    """A pass in a pipeline failed; carries the last good graph and the records so far."""

    def __init__(self, message: str, pass_name: str, node: str | None, last_good, records, cause: BaseException):
        super().__init__(message)
        self.pass_name = pass_name
        self.node = node
        self.last_good = last_good
        self.records = records
        self.cause = cause


class ConfigError(GraphoptError):
    """A pipeline file or pass/backend option is wrong (unknown key, bad type, bad value)."""


class DataError(GraphoptError):
    """Data handed to graphopt cannot be used as it is (NaN/Inf values, an empty loader); the
    message names the batch or tensor."""


class ExportError(GraphoptError):
    """A backend could not produce a correct artifact; nothing was written."""


class EvaluationError(GraphoptError):
    """A user's evaluate function failed or returned something that is not a number."""
