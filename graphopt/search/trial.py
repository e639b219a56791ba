"""One candidate of the search, built and measured: passes (verified by the PassManager), the
artifact written by its backend (checked against the graph), the metric and the objective read
off that artifact, not off the graph it came from.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from graphopt.backend import get_backend
from graphopt.errors import EvaluationError, GraphoptError
from graphopt.ir import Graph
from graphopt.app.latency import interleaved_latency
from graphopt.pass_base import PassContext
from graphopt.pass_manager import PassManager, PassRecord
from graphopt.report import pass_table

from graphopt.search.goal import Goal
from graphopt.search.recipe import Recipe
from graphopt.search.sensitivity import on_grid, prune_reach

EXTENSIONS = {"onnx": ".onnx", "onnx_int8": ".int8.onnx", "torchscript": ".pt", "torchscript_int8": ".int8.pt",
              "packed": ".gpk"}
# a candidate whose graph already loses this many times the allowed drop is not exported or timed
PRUNE_FACTOR = 2.0


@dataclass
class Trial:
    number: int
    recipe: Recipe
    backend: str
    metric: float | None = None
    drop: float | None = None
    feasible: bool = False
    latency_ms: float | None = None
    size_bytes: int | None = None
    macs: int | None = None
    params: int | None = None
    artifact: str | None = None
    seconds: float = 0.0
    status: str = "complete"          # complete | pruned (graph already too inaccurate) | failed
    reason: str = ""                  # why a candidate was pruned or refused
    steps: list[dict] = field(default_factory=list)      # per-pass records (params, MACs, error, stats)
    export: dict = field(default_factory=dict)           # the backend's report
    records: list[PassRecord] = field(default_factory=list, repr=False)

    def objective(self, goal: Goal) -> float | None:
        return {"latency": self.latency_ms, "size": self.size_bytes, "macs": self.macs}[goal.objective]

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "recipe": self.recipe.__dict__, "label": self.recipe.label(),
                "backend": self.backend, "metric": self.metric, "drop": self.drop, "feasible": self.feasible,
                "latency_ms": self.latency_ms, "size_bytes": self.size_bytes, "macs": self.macs,
                "params": self.params, "artifact": self.artifact, "seconds": round(self.seconds, 2),
                "status": self.status, "reason": self.reason, "steps": self.steps, "export": self.export}

    @staticmethod
    def from_dict(data: dict) -> "Trial":
        known = {k: v for k, v in data.items() if k in Trial.__dataclass_fields__ and k not in ("recipe", "records")}
        return Trial(recipe=Recipe(**data["recipe"]), **known)


def batch_inputs(example_inputs: tuple, batch_size: int) -> tuple:
    """The example inputs at ``batch_size``: the first sample repeated, so token ids stay ids."""
    out = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            out.append(x[:1].repeat(batch_size, *([1] * (x.dim() - 1))))
        else:
            out.append(x)
    return tuple(out)


def eager_runner(module: torch.nn.Module) -> Callable:
    """A module called without autograd, as an evaluation should be."""
    def call(*inputs):
        with torch.no_grad():
            return module(*inputs)
    return call


def torch_runner(run: Callable) -> Callable:
    """An artifact's runner returning what the model returns (tensors, one or a tuple), whatever its
    runtime gives back (onnxruntime: a list of numpy arrays), so a user's evaluate sees one kind."""
    def call(*inputs):
        out = run(*inputs)
        if isinstance(out, (list, tuple)):
            out = tuple(torch.from_numpy(o) if not isinstance(o, torch.Tensor) else o for o in out)
            return out[0] if len(out) == 1 else out
        return torch.from_numpy(out) if not isinstance(out, torch.Tensor) else out
    return call


def time_ms(run: Callable, inputs: tuple, rounds: int = 15) -> float:
    """Median ms per call; short calls are timed in groups so the clock's resolution does not matter."""
    return interleaved_latency({"run": lambda: run(*inputs)}, rounds=rounds, inner=calls_per_sample(run, inputs))["run"] * 1e3


def calls_per_sample(run: Callable, inputs: tuple) -> int:
    """How many calls to time together so one sample lasts about 10 ms, from the quickest of three
    calls after a first one (which pays for allocation and cold caches: MobileNetV2's fp32 session,
    first called after a 40-minute search, took over 10 ms, so one call a sample, each timed cold)."""
    run(*inputs)
    quickest = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        run(*inputs)
        quickest = min(quickest, time.perf_counter() - start)
    return max(1, min(200, int(0.01 / max(quickest, 1e-6))))


class Evaluator:
    """The user's metric, called on an artifact's runner; what it returns is checked to be a number."""

    def __init__(self, evaluate: Callable[[Callable], float]):
        self.evaluate = evaluate

    def __call__(self, run: Callable, who: str) -> float:
        try:
            value = self.evaluate(run)
        except GraphoptError:
            raise
        except Exception as exc:
            raise EvaluationError(f"evaluate failed on {who}: {type(exc).__name__}: {exc}") from exc
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise EvaluationError(f"evaluate returned {value!r} on {who}; it must return a finite number "
                                  f"(higher is better)")
        return float(value)


@dataclass
class Workbench:
    """Everything a trial needs besides its recipe."""
    base: Graph                       # traced, BatchNorm folded: the start of every candidate
    goal: Goal
    evaluator: Evaluator
    original_metric: float
    allowed_drop: float
    data: dict[str, Any]              # PassContext data: calibration_data, train_data
    folder: str                       # trials/NNNN/ go here
    protected_order: list[str]        # layers, most pruning-sensitive first
    finetune_batches: int | None
    progress: bool = False
    runners: dict[int, Callable] = field(default_factory=dict)   # this run's artifacts, for the final timing
    reaches: dict[tuple[int, int], float] = field(default_factory=dict, repr=False)

    def reach(self, round_to: int, protect: int) -> float:
        """The deepest pruning share on the search's grid that prune_channels reaches with these
        widths and the ``protect`` most sensitive layers kept whole."""
        key = (round_to, protect)
        if key not in self.reaches:
            share = prune_reach(self.base, self.protected_order[:protect], round_to)
            self.reaches[key] = on_grid(share)
        return self.reaches[key]

    def inputs(self) -> tuple:
        return batch_inputs(self.base.example_inputs, self.goal.batch_size)

    def build(self, recipe: Recipe, number: int) -> Trial:
        backend = recipe.backend(self.goal)
        trial = Trial(number, recipe, backend)
        started = time.perf_counter()
        try:
            self._build(trial)
        except GraphoptError as exc:
            if isinstance(exc, EvaluationError):
                raise
            trial.status, trial.reason = "failed", f"{type(exc).__name__}: {exc}"
        trial.seconds = time.perf_counter() - started
        return trial

    def _build(self, trial: Trial) -> None:
        recipe, who = trial.recipe, f"trial {trial.number} ({trial.recipe.label()})"
        passes = recipe.passes(self.protected_order, self.finetune_batches, self.progress)
        result = PassManager(passes, context=PassContext(dict(self.data))).run(self.base)
        graph = result.graph
        trial.records = result.records
        trial.steps = [r.to_dict() for r in result.records[1:]]
        cost = graph.analysis("cost")
        trial.macs, trial.params = cost.macs, cost.params
        if recipe.prune or recipe.low_rank or recipe.sparsity or recipe.share_bits:
            graph_metric = self.evaluator(eager_runner(graph.gm), who)
            if self.original_metric - graph_metric > PRUNE_FACTOR * self.allowed_drop + 1e-9:
                trial.metric, trial.drop = graph_metric, self.original_metric - graph_metric
                trial.status = "pruned"
                trial.reason = (f"the graph already loses {trial.drop:.3g} (allowed {self.allowed_drop:.3g}); "
                                f"not exported")
                return
        folder = os.path.join(self.folder, "trials", f"{trial.number:04d}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "model" + EXTENSIONS[trial.backend])
        options = {"threads": self.goal.threads} if trial.backend == "onnx_int8" else {}
        report = get_backend(trial.backend)(graph, path, **options)
        trial.artifact, trial.size_bytes = path, report.bytes
        trial.export = report.to_dict()
        run = report.runner or graph.gm
        trial.metric = self.evaluator(torch_runner(run), who)
        trial.drop = self.original_metric - trial.metric
        trial.feasible = trial.drop <= self.allowed_drop + 1e-9
        trial.latency_ms = time_ms(run, self.inputs())
        self.runners[trial.number] = run

    def table(self, trial: Trial) -> str:
        return pass_table(trial.records) if trial.records else ""
