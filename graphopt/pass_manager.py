"""Runs passes in order, verifying the graph and each pass's numerical contract.

After every pass: lint the graph, run it on the held batch and compare with the graph
before the pass (exact: relative error <= 1e-5, or, where float32 rounding alone exceeds that
on real weights, no further from the float64 outputs than 4x the graph before it was; bounded:
<= the pass's bound), then
record time, params, MACs, bytes and error. A failure raises PassFailed naming the pass
and, where it can be found, the node; the last good graph travels with it. Under torchrun, in a
pipeline given data (calibration or training), each pass is followed by a checksum of the graph
all-reduced over the ranks: a rank whose graph differs fails the pass on every rank.

Everything runs on the graph's device (``device=`` moves a copy of it first); on CUDA the checks
run with TF32 off, so the tolerances above hold on every device (``graphopt.devices``).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from graphopt import devices, distributed
from graphopt.analysis import analysis_names
from graphopt.errors import ConfigError, ContractViolation, GraphLintError, PassFailed, RequirementError
from graphopt.instruments import Instrument, ProgressBar
from graphopt.ir import Graph
from graphopt.pass_base import EXACT_TOLERANCE, Contract, Pass, PassContext
from graphopt.verify import compare_outputs, first_divergence, flatten_outputs, within_reassociation


# data a pipeline's passes read: under torchrun, with any of it, every rank must end each pass with the same graph
DATA_KEYS = frozenset({"calibration_data", "train_data"})


@dataclass
class PassRecord:
    """One row of the per-pass report ("input" is the graph before any pass)."""

    name: str
    contract: str
    changed: bool
    seconds: float
    params: int
    macs: int
    bytes: int
    max_error: float          # vs the graph before this pass
    error_vs_input: float     # vs the graph the pipeline started from
    stats: dict[str, Any] = field(default_factory=dict)
    contract_error: float = 0.0  # vs the pass's reference (= max_error unless the pass names one)
    device: str = "cpu"          # where the pass ran and was checked

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        for key in ("max_error", "error_vs_input", "contract_error"):
            if math.isinf(row[key]):
                row[key] = "inf"
        return row


@dataclass
class PipelineResult:
    graph: Graph
    records: list[PassRecord]


def _record(name: str, contract: str, graph: Graph, seconds: float, changed: bool,
            error: float, error_vs_input: float, stats: dict, contract_error: float = 0.0) -> PassRecord:
    cost = graph.analysis("cost")
    return PassRecord(name, contract, changed, seconds, cost.params, cost.macs, cost.bytes,
                      error, error_vs_input, dict(stats), contract_error, str(graph.device))


class PassManager:
    """``PassManager([FoldBatchNorm(), ...]).run(graph)`` -> PipelineResult(graph, records).

    ``check_inputs`` is the held batch the contracts are checked on (default: the graph's
    example inputs); ``verify=False`` skips output checks (lint still runs). ``instruments``
    are called around the run and each pass (``graphopt.instruments``: IR dumps, record logs,
    your own); ``progress=True`` adds a progress bar. ``device`` ("cuda", "cpu", ...) runs the
    pipeline on a copy of the graph moved there (default: where the graph is).
    """

    def __init__(self, passes: Iterable[Pass], *, context: PassContext | None = None,
                 check_inputs: tuple | None = None, verify: bool = True, progress: bool = False,
                 instruments: Iterable[Instrument] = (), device: Any = None):
        self.passes = list(passes)
        for p in self.passes:
            if not isinstance(p, Pass):
                raise TypeError(f"PassManager takes Pass instances, got {p!r}")
        self.context = context or PassContext()
        self.check_inputs = check_inputs
        self.verify = verify
        self.device = None if device is None else devices.resolve(device)
        self.instruments = list(instruments) + ([ProgressBar()] if progress else [])
        for instrument in self.instruments:
            if not isinstance(instrument, Instrument):
                raise TypeError(f"PassManager instruments must be Instrument instances, got {instrument!r}")

    def check_requirements(self, graph: Graph) -> None:
        """Fail before running anything if some pass needs what nothing before it provides."""
        available = set(graph.properties) | set(analysis_names()) | set(self.context.data)
        for index, p in enumerate(self.passes):
            missing = sorted(set(p.requires) - available)
            if missing:
                raise RequirementError(
                    f"pass #{index} {p.name!r} requires {', '.join(map(repr, missing))}, which nothing "
                    f"provides: give it as PassContext(data={{...}}) (a pipeline file's [data] table) "
                    f"or schedule a pass that ensures it earlier")
            available |= set(p.ensures)

    def run(self, graph: Graph) -> PipelineResult:
        self.check_requirements(graph)
        if self.device is not None and graph.device != self.device:
            graph = graph.clone().to(self.device)
        # passes may read the pipeline's starting graph (a distillation teacher, say)
        context = PassContext({"input_graph": graph, **self.context.data})
        inputs = devices.to_device(self.check_inputs or graph.example_inputs, graph.device)
        with devices.exact_math(graph.device):
            original = reference = graph.run(*inputs) if self.verify else None
        if self.verify and not any(t.numel() for t in flatten_outputs(original)):
            raise ConfigError("the model returns no (non-empty) tensor on the held batch, so no pass could be "
                              "verified; return the model's tensors, or run with verify=False")
        records = [_record("input", "-", graph, 0.0, False, 0.0, 0.0, {})]
        current = graph
        for instrument in self.instruments:
            instrument.run_begin(graph, self.passes)
        for index, p in enumerate(self.passes):
            for instrument in self.instruments:
                instrument.before_pass(index, p, current)
            try:
                current, reference, record = self._run_one(p, context, current, inputs, reference, original)
            except PassFailed as failure:
                failure.records = records
                for instrument in self.instruments:
                    instrument.pass_failed(index, p, failure)
                raise
            records.append(record)
            for instrument in self.instruments:
                instrument.after_pass(index, p, current, record)
        result = PipelineResult(current, records)
        for instrument in self.instruments:
            instrument.run_end(result)
        return result

    def _run_one(self, p: Pass, context: PassContext, current: Graph, inputs: tuple, reference: Any,
                 original: Any):
        working = current.clone()
        start = time.perf_counter()
        try:
            result = p.run(working, context)
        except Exception as exc:
            node = getattr(exc, "node", None)
            raise PassFailed(f"pass {p.name!r} failed{f' at node {node!r}' if node else ''}: "
                             f"{type(exc).__name__}: {exc}", p.name, node, current, [], exc) from exc
        seconds = time.perf_counter() - start
        graph = result.graph
        if distributed.active() and set(context.data) & DATA_KEYS:   # a pipeline that reads data
            try:
                distributed.check_same(graph.gm, f"pass {p.name!r}")
            except distributed.DistributedError as exc:
                raise PassFailed(str(exc), p.name, None, current, [], exc) from exc
        if result.changed:   # analyses the pass does not say it preserves are stale
            graph.retain_analyses(p.preserved_analyses())
        try:
            graph.lint()
        except GraphLintError as exc:
            raise PassFailed(f"pass {p.name!r} left a malformed graph: {exc}", p.name, exc.node,
                             current, [], exc) from exc
        error = error_vs_input = contract_error = 0.0
        outputs = reference
        if self.verify:
            with devices.exact_math(graph.device):
                outputs, error, error_vs_input, contract_error = self._check(
                    p, result, current, graph, inputs, reference, original)
        graph.properties |= set(p.ensures)
        record = _record(p.name, p.contract.value, graph, seconds, result.changed, error, error_vs_input,
                         result.stats, contract_error)
        return graph, outputs, record

    @staticmethod
    def _check(p: Pass, result: Any, current: Graph, graph: Graph, inputs: tuple, reference: Any, original: Any):
        """Run the pass's output on the held batch and hold it to its contract: (outputs, error vs
        the graph before, error vs the input graph, error vs the pass's reference)."""
        outputs = graph.run(*inputs)
        error = compare_outputs(reference, outputs)[1]
        error_vs_input = compare_outputs(original, outputs)[1]
        oracle = result.reference or current
        contract_error = error if result.reference is None else compare_outputs(oracle.run(*inputs), outputs)[1]
        bound = EXACT_TOLERANCE if p.contract == Contract.EXACT else p.bound
        if p.contract == Contract.EXACT and not contract_error <= bound and math.isfinite(contract_error):
            ok, moved, floor = within_reassociation(oracle, graph, inputs, bound)
            if ok:   # float32 rounding moved, the function did not: checked against float64
                result.stats["exact_vs_float64"] = {"error": float(f"{moved:.3g}"),
                                                    "float32_rounding_before": float(f"{floor:.3g}")}
                contract_error = moved
        if p.contract != Contract.NONE and bound is not None and not contract_error <= bound \
                and "exact_vs_float64" not in result.stats:
            node = first_divergence(oracle.gm, graph.gm, inputs, bound)
            where = f"; first divergence at node {node!r} ({graph.qualname(graph.node(node))})" if node else ""
            violation = ContractViolation(
                f"pass {p.name!r} broke its {p.contract.value} contract: max relative error "
                f"{contract_error:.3g} > {bound:.3g}{where}", contract_error, bound, node)
            raise PassFailed(str(violation), p.name, node, current, [], violation)
        return outputs, error, error_vs_input, contract_error
