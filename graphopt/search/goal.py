"""What a user asks of ``compress``: a constraint on the metric, an objective to minimise, a budget.

Typed with pydantic so a spec file and keyword arguments are checked the same way, and a wrong
value is refused naming the field before any trial runs.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from graphopt.errors import ConfigError

OBJECTIVES = ("latency", "size", "macs")
RUNTIMES = ("onnxruntime", "torch")


class Goal(BaseModel):
    """``max_drop``: how much of the metric may be lost, in the metric's own units (top-1 is in
    percent, so 1.0 is one point); ``max_relative_drop`` instead: a fraction of the original's
    value. ``objective``: ``latency`` (median ms at ``batch_size`` in ``runtime``), ``size`` (bytes
    of the artifact on disk: the packed format) or ``macs``. ``max_minutes``/``max_trials`` bound
    the search; whatever has been found when either runs out is the answer. ``max_finetune_epochs``
    caps a candidate's distillation (by default 8 epochs, or 16/32 where the measured cost of an
    epoch and ``max_minutes`` allow)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_drop: float | None = Field(default=None, ge=0)
    max_relative_drop: float | None = Field(default=None, ge=0, lt=1)
    objective: Literal["latency", "size", "macs"] = "latency"
    runtime: Literal["onnxruntime", "torch"] = "onnxruntime"
    batch_size: int = Field(default=1, ge=1, le=4096)
    threads: int = Field(default=2, ge=1, le=256)
    max_minutes: float = Field(default=15.0, gt=0)
    max_trials: int = Field(default=40, ge=1)
    max_finetune_epochs: float | None = Field(default=None, gt=0, le=1000)
    seed: int = 0

    @model_validator(mode="after")
    def _one_constraint(self) -> "Goal":
        if self.max_drop is not None and self.max_relative_drop is not None:
            raise ValueError("give max_drop or max_relative_drop, not both")
        return self

    def allowed_drop(self, original: float) -> float:
        """The metric may fall this far below ``original`` (1.0 point when nothing was said)."""
        if self.max_relative_drop is not None:
            return abs(original) * self.max_relative_drop
        return 1.0 if self.max_drop is None else self.max_drop

    def timed_in(self) -> str:
        """Where candidates' latency is measured: the goal's runtime, or for size goals the packed
        file reloaded as a torch module."""
        where = "torch (packed file reloaded)" if self.objective == "size" else self.runtime
        return f"{where} at batch {self.batch_size}"

    def describe(self) -> str:
        limit = (f"at most {self.max_relative_drop:.1%} below the original" if self.max_relative_drop is not None
                 else f"at most {1.0 if self.max_drop is None else self.max_drop:g} below the original")
        cost = {"latency": f"latency in {self.timed_in()} ({self.threads} threads)",
                "size": "size on disk (packed format)", "macs": "multiply-accumulates"}[self.objective]
        return f"metric {limit}; minimise {cost}; {self.max_trials} trials or {self.max_minutes:g} min"


def make_goal(goal: "Goal | dict | None", where: str = "goal") -> Goal:
    """A Goal from a Goal, a dict (keyword arguments or a spec file's [goal] table) or None."""
    if isinstance(goal, Goal):
        return goal
    if goal is None:
        return Goal()
    return validated(Goal, goal, where)


def validated(model: type[BaseModel], table: object, where: str) -> BaseModel:
    """``model`` built from a table of a spec file or keyword arguments; what is wrong is a
    ConfigError naming ``where`` and the field."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table of {model.__name__}'s fields, got {type(table).__name__}")
    try:
        return model(**table)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {pydantic_message(exc)}") from None


def pydantic_message(exc: ValidationError) -> str:
    """pydantic's errors as one line: 'field: what is wrong (got value)'."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "value"
        got = f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else ""
        parts.append(f"{field}: {error['msg']}{got}")
    return "; ".join(parts)
