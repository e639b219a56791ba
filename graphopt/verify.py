"""Numerical comparison of model outputs, used by the pass manager and the backends.

Error measure: for each output tensor, ``max|out - ref| / max|ref|`` (relative to the
reference's largest magnitude, so near-zero elements do not blow it up); the result is
the largest over all outputs. Structural mismatch (count, shape) or a NaN is ``inf``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import fx


def flatten_outputs(value: Any) -> list[torch.Tensor]:
    """All tensors in a (nested) output structure, in a stable order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, np.ndarray):
        return [torch.from_numpy(value)]
    if isinstance(value, dict) or hasattr(value, "to_tuple"):
        items = value.items() if isinstance(value, dict) else zip(range(10**6), value.to_tuple())
        return [t for _, v in items for t in flatten_outputs(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flatten_outputs(v)]
    return []


def tensor_errors(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """(max absolute error, max error relative to max|ref|) of one output."""
    if tuple(ref.shape) != tuple(out.shape):
        return math.inf, math.inf
    wide = torch.complex128 if ref.is_complex() or out.is_complex() else torch.float64   # keep imaginary parts
    ref = ref.detach().to(wide)
    out = out.detach().to(wide)
    if ref.numel() == 0:
        return 0.0, 0.0
    diff = (out - ref).abs().max().item()
    if math.isnan(diff):
        return math.inf, math.inf
    scale = ref.abs().max().item()
    return diff, diff / max(scale, 1e-12)


def compare_outputs(ref: Any, out: Any) -> tuple[float, float]:
    """(max absolute error, max relative error) over every output tensor."""
    refs, outs = flatten_outputs(ref), flatten_outputs(out)
    if len(refs) != len(outs):
        return math.inf, math.inf
    worst_abs, worst_rel = 0.0, 0.0
    for r, o in zip(refs, outs):
        a, rel = tensor_errors(r, o.to(r.dtype) if o.is_floating_point() else o)
        worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, rel)
    return worst_abs, worst_rel


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.values[n.name] = result
        return result


def node_values(gm: fx.GraphModule, inputs: tuple) -> dict[str, Any]:
    """Every node's output on ``inputs``, by node name."""
    recorder = _Recorder(gm)
    with torch.no_grad():
        recorder.run(*inputs)
    return recorder.values


def first_divergence(before: fx.GraphModule, after: fx.GraphModule, inputs: tuple, tolerance: float) -> str | None:
    """Name of the first node (in ``after``'s order) whose value departs from the same-named
    node of ``before`` by more than ``tolerance``; None if no common node differs."""
    old, new = node_values(before, inputs), node_values(after, inputs)
    for node in after.graph.nodes:
        if node.op in ("placeholder", "get_attr") or node.name not in old:
            continue
        a, b = flatten_outputs(old[node.name]), flatten_outputs(new[node.name])
        if not a or len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
            continue
        if compare_outputs(a, b)[1] > tolerance:
            return node.name
    return None


# An exact pass may move float32 rounding (a BatchNorm folded into a conv's weights sums the same
# products in another order) but not the function: its outputs must be as close to the true
# (float64) outputs as the graph before it was, within this factor.
REASSOCIATION_FACTOR = 4.0


def float64_outputs(graph, inputs: tuple) -> Any | None:
    """The graph's outputs computed in float64 (a copy of its module and floating inputs), or None
    where it cannot run in float64 (integer kernels, dtype-pinned ops)."""
    import copy

    try:
        gm = copy.deepcopy(graph.gm).double()
        wide = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
        with torch.no_grad():
            return gm(*wide)
    except Exception:
        return None


def within_reassociation(before, after, inputs: tuple, tolerance: float) -> tuple[bool, float, float]:
    """Whether ``after`` is as exact as ``before``: (ok, error of after vs before in float64, error of
    before's float32 run vs its own float64 run). ``ok`` when the first is <= ``tolerance`` or <=
    REASSOCIATION_FACTOR x the second (the rounding the graph had anyway)."""
    truth = float64_outputs(before, inputs)
    if truth is None:
        return False, math.inf, math.inf
    with torch.no_grad():
        moved = compare_outputs(truth, after.run(*inputs))[1]
        floor = compare_outputs(truth, before.run(*inputs))[1]
    return moved <= max(tolerance, REASSOCIATION_FACTOR * floor), moved, floor
