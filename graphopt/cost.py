"""Cost analysis: parameters, multiply-accumulates and bytes, per node and in total; and the
one cost model the compressing passes share.

MACs count the work of conv, linear, matmul and attention nodes (the layers that
dominate inference time); cheaper ops count zero. Parameters and bytes count every
distinct tensor the GraphModule holds once, however many nodes read it.

``CostModel(graph)`` reads the analysis once and answers, without building anything, what
the graph would cost after a *proposed change* to some of its layers (modules, by name):

* ``Resize(keep_in, keep_out)``: the layer keeps these shares of its input and output
  features (channel pruning). The MACs of each of its calls scale by ``keep_in * keep_out``;
  its ``weight``, where that is a matrix or a kernel, by the same; its other parameters
  (bias, norm scale, attention's packed projections) by ``keep_out``.
* ``Replace(cost)``: the layer becomes something whose cost is known, such as low-rank
  factors, whose cost is ``chain_cost`` of the dense products they run.

A dense product (a Linear, a conv) run at ``positions`` output positions with ``fan_in``
inputs per output feature (``in_channels / groups * kernel area`` for a conv) and ``fan_out``
output features costs ``positions * fan_in * fan_out`` MACs and ``fan_in * fan_out``
weights: the count the analysis makes per node, and ``product_cost`` / ``chain_cost`` make
for layers that do not exist yet. ``prune_channels`` and ``split_low_rank`` both plan with this
model; graphopt.budget spreads a budget over what they offer.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, NamedTuple

import torch
import torch.nn as nn
from torch import fx

from graphopt.analysis import register_analysis
from graphopt.modules import PrunedMultiheadAttention
from graphopt.ops import OpKind
from graphopt.shapes import SHAPE_KEY

if TYPE_CHECKING:
    from graphopt.ir import Graph


@dataclass
class NodeCost:
    params: int = 0
    macs: int = 0


@dataclass
class CostReport:
    nodes: dict[str, NodeCost] = field(default_factory=dict)
    params: int = 0
    macs: int = 0
    bytes: int = 0
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def _shape(arg) -> tuple | None:
    if isinstance(arg, fx.Node):
        shape = arg.meta.get(SHAPE_KEY)
        return shape if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape) else None
    return None


def _module_macs(module: nn.Module, node: fx.Node, out_shape) -> int:
    if isinstance(module, (nn.MultiheadAttention, PrunedMultiheadAttention)):
        return _attention_module_macs(module, node)
    if out_shape is None or not all(isinstance(d, int) for d in out_shape):
        return 0
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        in_shape = _shape(node.args[0])
        k = _numel(module.kernel_size)
        return _numel(in_shape) * (module.out_channels // module.groups) * k if in_shape else 0
    if isinstance(module, nn.modules.conv._ConvNd):
        return _numel(out_shape) * (module.in_channels // module.groups) * _numel(module.kernel_size)
    if isinstance(module, nn.Linear):
        return _numel(out_shape) * module.in_features
    return 0


def _attention_module_macs(module: nn.Module, node: fx.Node) -> int:
    args = list(node.args) + [node.kwargs.get(k) for k in ("query", "key")[len(node.args):]]
    q, k = (_shape(args[0]), _shape(args[1])) if len(args) >= 2 else (None, None)
    if q is None or k is None:
        return 0
    e = module.embed_dim
    inner = module.num_heads * module.head_dim  # == e unless heads were pruned
    q_tokens, k_tokens = _numel(q[:-1]), _numel(k[:-1])
    k_len = k[1] if (module.batch_first and len(k) == 3) else k[0]
    kdim, vdim = getattr(module, "kdim", e), getattr(module, "vdim", e)
    projections = q_tokens * e * inner + k_tokens * inner * (kdim + vdim) + q_tokens * inner * e
    return projections + 2 * q_tokens * k_len * inner


def _function_macs(node: fx.Node, kind: OpKind, out_shape) -> int:
    if out_shape is None or not isinstance(out_shape, tuple) or not all(isinstance(d, int) for d in out_shape):
        return 0
    if kind == OpKind.CONV:
        w = _shape(node.args[1]) if len(node.args) > 1 else None
        return _numel(out_shape) * _numel(w[1:]) if w else 0
    if kind == OpKind.LINEAR:
        w = _shape(node.args[1]) if len(node.args) > 1 else None
        return _numel(out_shape) * w[-1] if w else 0
    if kind == OpKind.MATMUL:
        a = _shape(node.args[0]) if node.args else None
        if a is None and len(node.args) > 1:
            a = _shape(node.args[1])
        return _numel(out_shape) * a[-1] if a else 0
    if kind == OpKind.ATTENTION:
        q, k = _shape(node.args[0]), _shape(node.args[1]) if len(node.args) > 1 else None
        return 2 * _numel(q) * k[-2] if q and k else 0
    return 0


@register_analysis("cost")
def compute_cost(graph: "Graph") -> CostReport:
    graph.analysis("shapes")
    modules = dict(graph.gm.named_modules())
    report = CostReport()
    seen: set[int] = set()

    def count_tensor(t: torch.Tensor) -> int:
        if id(t) in seen:
            return 0
        seen.add(id(t))
        return t.numel()

    for node in graph.gm.graph.nodes:
        kind = graph.kind(node)
        out_shape = node.meta.get(SHAPE_KEY)
        cost = NodeCost()
        if node.op == "call_module":
            module = modules[node.target]
            cost.params = sum(count_tensor(p) for p in module.parameters())
            cost.macs = _module_macs(module, node, out_shape)
        elif node.op == "get_attr":
            value = graph.attr(node.target)
            if isinstance(value, nn.Parameter) or (isinstance(value, torch.Tensor) and value.dtype == torch.int8):
                cost.params = count_tensor(value)  # int8 buffers are folded quantized weights
        elif node.op == "call_function":
            cost.macs = _function_macs(node, kind, out_shape)
        elif node.op == "call_method" and kind == OpKind.MATMUL:
            cost.macs = _function_macs(node, kind, out_shape)
        report.nodes[node.name] = cost
        report.params += cost.params
        report.macs += cost.macs

    by_dtype: dict[str, int] = defaultdict(int)
    stored: set[int] = set()
    for tensor in list(graph.gm.parameters()) + list(graph.gm.buffers()):
        if id(tensor) in stored:
            continue
        stored.add(id(tensor))
        by_dtype[str(tensor.dtype).replace("torch.", "")] += tensor.numel() * tensor.element_size()
    report.bytes_by_dtype = dict(by_dtype)
    report.bytes = sum(by_dtype.values())
    return report


# -- the cost model of proposed changes -----------------------------------------------------
class Cost(NamedTuple):
    """MACs and parameters (ints; numpy arrays where a whole grid of choices is costed at once)."""

    macs: Any
    params: Any


def product_cost(positions, fan_in, fan_out, bias=0) -> Cost:
    """One dense product: ``fan_out`` features, each a sum of ``fan_in`` products, at
    ``positions`` places (rows of a Linear, output pixels of a conv); ``bias`` more parameters."""
    return Cost(positions * fan_in * fan_out, fan_in * fan_out + bias)


def chain_cost(stages: Iterable[tuple], bias=0) -> Cost:
    """Dense products run one after another, each ``(positions, fan_in, fan_out)``; the last
    one's bias (``bias`` parameters) added once."""
    costs = [product_cost(*stage) for stage in stages]
    return Cost(sum(c.macs for c in costs), sum(c.params for c in costs) + bias)


@dataclass(frozen=True)
class Resize:
    """A layer keeping these shares of its input and output features."""

    keep_in: float = 1.0
    keep_out: float = 1.0


@dataclass(frozen=True)
class Replace:
    """A layer replaced by something that costs ``cost`` (all of its calls together)."""

    cost: Cost


class CostModel:
    """The graph's cost, its layers' costs, and its cost after proposed changes (see the module
    docstring), all from the ``cost`` analysis."""

    def __init__(self, graph: "Graph"):
        self.graph = graph
        self.analysis = graph.analysis("cost")
        self.total = Cost(self.analysis.macs, self.analysis.params)
        self.modules = graph.modules()
        self.calls: dict[str, list[fx.Node]] = defaultdict(list)
        for node in graph.nodes:
            if node.op == "call_module" and node.target in self.modules:
                self.calls[node.target].append(node)

    def node_macs(self, node: fx.Node) -> int:
        return self.analysis.nodes[node.name].macs

    def layer(self, target: str) -> Cost:
        """A module's MACs over all its calls, and all its parameters (its children's too)."""
        macs = sum(self.node_macs(n) for n in self.calls.get(target, ()))
        return Cost(macs, sum(p.numel() for p in self.modules[target].parameters()))

    def estimate(self, changes: Mapping[str, "Resize | Replace"]) -> Cost:
        """The graph's cost after ``changes`` (module name -> change); MACs and params as ints
        (a resize's shares make them fractional: the whole is rounded down once)."""
        macs, params = self.total
        for node in self.graph.nodes:   # graph order and float arithmetic: the numbers never drift
            change = changes.get(node.target) if node.op == "call_module" else None
            if isinstance(change, Resize):
                node_macs = self.node_macs(node)
                macs -= node_macs - node_macs * change.keep_in * change.keep_out
        for target, module in self.modules.items():
            change = changes.get(target)
            if isinstance(change, Resize):
                for name, p in module.named_parameters(recurse=False):
                    factor = change.keep_out * (change.keep_in if name == "weight" and p.dim() > 1 else 1.0)
                    params -= p.numel() - p.numel() * factor
            elif isinstance(change, Replace):
                before = self.layer(target)
                macs -= before.macs - change.cost.macs
                params -= before.params - change.cost.params
        return Cost(int(macs), int(params))
