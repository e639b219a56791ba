"""Insert quantize/dequantize (fake-quant) nodes: the simulated-int8 graph every backend must match.

Placement follows what integer runtimes execute (onnxruntime QOperator / torch.ao):
- conv and linear layers ("anchors") get int8 per-channel symmetric weights, a quantized input
  and a quantized output; an activation that clamps at zero (ReLU, ReLU6, Hardtanh(0, x)) right
  after a layer is quantized instead of the layer's output, so backends can fuse it; Linears
  on token sequences (rank > 2 inputs) keep a float output by default (``layer_outputs``);
- adds of two tensors are anchors too (quantized inputs, quantized output after a fused ReLU),
  except, with ``layer_outputs="auto"``, adds of token sequences (rank 3: a transformer's residual
  stream, left float as the Linears on it leave their outputs);
- max pooling, reshapes, dropout and ReLU keep their input's grid (no new node); average
  pooling and means get a node with their input's parameters (shared, not observed);
- concatenation gets its own observed output parameters;
- everything else runs in float on dequantized values.
Embedding tables (``embeddings=True``) get int8 weights with one scale per embedding column, so
a backend can gather int8 rows and dequantize only those (weight-only: their outputs stay float).
Layers ``exclude`` names or ``layers`` does not (graphopt.layer_selection), those chosen by the
first/last-layer policy or by sensitivity analysis, and layers without an int8 kernel stay float;
``stats["float_layers"]`` names them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import annotated_types as at

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from graphopt.data import reiterable
from graphopt.distributed import map_shared
from graphopt.errors import ConfigError
from graphopt.ir import Graph
from graphopt.layer_selection import LayerPatterns, LayerSelection
from graphopt.ops import OpKind
from graphopt.options import FINITE, Count, Index, Options, Tolerance, choice
from graphopt.pass_base import Contract, Pass, PassContext, PassResult, register_pass
from graphopt.quant.calibration import calibrate, held_batch, make_observer, observer_names
from graphopt.quant.qparams import (ADD_FUNCS, FLOAT_REASON_KEY, QPARAMS_KEY, WEIGHT_QMAX, QParams, affine_qparams,
                                    is_zero_clamp, keeps_grid, make_fq_args, weight_scales)
from graphopt.quant.targets import TARGET_KEY, TARGET_NAMES, Target, get_target
from graphopt.verify import compare_outputs

Percentile = Annotated[float, at.Gt(50), at.Le(100), FINITE]   # the percentile observer's share kept
Policy = Literal["int8", "float"]
ObserverName = choice(observer_names)
TargetName = choice(lambda: TARGET_NAMES)

_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
_SHAPE_OPS = {OpKind.RESHAPE, OpKind.IDENTITY, OpKind.PERMUTE}   # extra args are sizes, not tensors


def _module(graph: Graph, node: fx.Node):
    return graph.module(node) if node.op == "call_module" else None


def _no_kernel_reason(graph: Graph, node: fx.Node) -> str | None:
    """Why a conv/linear module has no int8 kernel here (None when it has one)."""
    m = _module(graph, node)
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.padding_mode != "zeros":
        return f"no int8 kernel for padding_mode={m.padding_mode!r}"
    if not isinstance(node.args[0], fx.Node) or node.kwargs:
        return "unusual call signature"
    return None


@dataclass
class QuantPlan:
    """Which layers run in int8 and which tensors get which (shared) parameters."""

    layers: list[fx.Node] = field(default_factory=list)      # conv/linear anchors
    adds: list[fx.Node] = field(default_factory=list)
    observed: set[str] = field(default_factory=set)           # tensors with their own parameters
    shared: dict[str, str] = field(default_factory=dict)      # tensor -> tensor whose parameters it reuses
    on_grid: dict[str, str] = field(default_factory=dict)     # tensor -> parameter source (no node needed)
    float_layers: dict[str, str] = field(default_factory=dict)


class Planner:
    """Decides placement (see the module docstring) for one graph and one float-layer policy."""

    def __init__(self, graph: Graph, keep_float: dict[str, str], blocked: set[str], layer_outputs: str = "auto"):
        self.graph, self.keep_float, self.blocked = graph, keep_float, blocked
        self.layer_outputs = layer_outputs

    def quantized_output(self, node: fx.Node) -> bool:
        """Whether an int8 layer's output is requantized (QLinearConv/QGemm: int8 in, int8 out) or
        left float (MatMulIntegerToFloat: int8 in, float out). ``auto`` leaves float the outputs
        of Linears on token sequences (rank > 2), which feed residual adds and LayerNorms in
        transformers, where an extra per-tensor rounding costs accuracy and saves no time."""
        if self.layer_outputs != "auto":
            return self.layer_outputs == "int8"
        return not (isinstance(_module(self.graph, node), nn.Linear) and len(self.graph.shape(node.args[0]) or ()) > 2)

    def layer_candidates(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if isinstance(_module(self.graph, n), _LAYER_TYPES)]

    def add_candidates(self) -> list[fx.Node]:
        """Adds of two tensors of one shape. ``auto`` leaves float the adds of token sequences
        (rank 3: a transformer's residual stream, which the Linears on it already leave float, and
        which a per-tensor rounding damages: XCiT's near-zero class token lost all precision, SQNR
        3 dB); adds of feature maps (rank 4: residual CNNs) are int8 adds."""
        return [n for n in self.graph.nodes if n.op == "call_function" and n.target in ADD_FUNCS
                and len(n.args) == 2 and all(isinstance(a, fx.Node) for a in n.args) and not n.kwargs
                and isinstance(self.graph.shape(n), tuple)   # tensors (not sizes read at run time)
                and self.graph.shape(n.args[0]) == self.graph.shape(n.args[1])
                and not (self.layer_outputs == "auto" and len(self.graph.shape(n)) == 3)]

    def output_of(self, node: fx.Node) -> fx.Node:
        """The tensor an anchor's quantized output is: a fused zero-clamp activation or the node."""
        users = list(node.users)
        if len(users) == 1 and is_zero_clamp(self.graph, users[0]):
            return users[0]
        return node

    def plan(self) -> QuantPlan:
        plan = QuantPlan()
        for node in self.layer_candidates():
            reason = self.keep_float.get(node.name) or self.keep_float.get(str(node.target)) \
                or _no_kernel_reason(self.graph, node)
            if reason:
                plan.float_layers[node.name] = reason
            else:
                plan.layers.append(node)
        plan.adds = self.add_candidates()
        while True:  # anchors whose input cannot be quantized drop out; repeat until stable
            plan.observed = {self.output_of(n).name for n in plan.adds} - self.blocked
            plan.observed |= {self.output_of(n).name for n in plan.layers if self.quantized_output(n)} - self.blocked
            self._propagate(plan)
            demoted = False
            for anchor in list(plan.layers) + list(plan.adds):
                inputs = [anchor.args[0]] if anchor in plan.layers else list(anchor.args)
                for x in inputs:
                    if x.name in plan.observed or x.name in plan.shared or x.name in plan.on_grid:
                        continue
                    if x.name in self.blocked or self.graph.dtype(x) not in (torch.float32, None):
                        (plan.layers if anchor in plan.layers else plan.adds).remove(anchor)
                        if anchor.op == "call_module":
                            plan.float_layers[anchor.name] = f"input {x.name!r} cannot be quantized"
                        demoted = True
                        break
                    plan.observed.add(x.name)
            self._propagate(plan)
            if not demoted:
                plan.observed -= self.blocked
                return plan

    def _propagate(self, plan: QuantPlan) -> None:
        """Mark tensors that stay on a quantized grid, and averaging ops that reuse their input's."""
        plan.shared.clear()
        plan.on_grid.clear()
        source: dict[str, str] = {name: name for name in plan.observed}
        for node in self.graph.nodes:
            if node.name in source:
                continue
            x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if x is None or x.name not in source:
                continue
            kind = self.graph.kind(node)
            if keeps_grid(self.graph, node):
                if len(node.all_input_nodes) == 1 or kind in _SHAPE_OPS:
                    plan.on_grid[node.name] = source[node.name] = source[x.name]
            elif kind in (OpKind.POOL, OpKind.REDUCE) and len(node.all_input_nodes) == 1 \
                    and not (kind == OpKind.REDUCE and node.target not in ("mean", torch.mean)):
                plan.shared[node.name] = source[node.name] = source[x.name]


def _fake_quantized_weight(graph: Graph, node: fx.Node, axis: int, qmax: int = WEIGHT_QMAX) -> fx.Node:
    """A fake-quant node (inserted before ``node``) over its module's weight, per channel along
    ``axis``, codes in [-qmax, qmax]."""
    m = graph.module(node)
    target = str(node.target)
    scales = weight_scales(m.weight, axis, qmax)
    m.register_buffer("weight_scale", scales)
    m.register_buffer("weight_zero_point", torch.zeros_like(scales, dtype=torch.int32))
    g = graph.gm.graph
    with g.inserting_before(node):
        return g.call_function(torch.fake_quantize_per_channel_affine,
                               (g.get_attr(f"{target}.weight"), g.get_attr(f"{target}.weight_scale"),
                                g.get_attr(f"{target}.weight_zero_point"), axis, -qmax, qmax))


def _functionalize(graph: Graph, node: fx.Node, qmax: int) -> fx.Node:
    """Replace a conv/linear module call by F.conv*/F.linear over a per-channel fake-quantized weight."""
    m = graph.module(node)
    target = str(node.target)
    wq = _fake_quantized_weight(graph, node, 0, qmax)
    g = graph.gm.graph
    with g.inserting_before(node):
        b = g.get_attr(f"{target}.bias") if m.bias is not None else None
        if isinstance(m, nn.Linear):
            new = g.call_function(F.linear, (node.args[0], wq, b))
        else:
            fn = F.conv1d if isinstance(m, nn.Conv1d) else F.conv2d
            new = g.call_function(fn, (node.args[0], wq, b, m.stride, m.padding, m.dilation, m.groups))
    new.meta.update({k: v for k, v in node.meta.items() if k == "nn_module_stack"})
    new.meta["graphopt.layer"] = target
    graph.bypass(node, new)
    return new


def quantize_embedding(graph: Graph, node: fx.Node) -> fx.Node:
    """An ``nn.Embedding`` call as ``F.embedding`` over its table fake-quantized per column (axis 1)."""
    m = graph.module(node)
    wq = _fake_quantized_weight(graph, node, 1)
    with graph.gm.graph.inserting_before(node):
        new = graph.gm.graph.call_function(F.embedding, (node.args[0], wq, m.padding_idx, m.max_norm, m.norm_type,
                                                         m.scale_grad_by_freq, m.sparse))
    new.meta["graphopt.layer"] = str(node.target)
    graph.bypass(node, new)
    return new


def apply_plan(graph: Graph, plan: QuantPlan, params: dict[str, QParams], target: Target,
               layers: list[str] | None = None) -> int:
    """Rewrite ``graph`` (whose nodes the plan names) with fake-quant nodes, weights in ``target``'s
    range; returns how many were added. ``layers`` restricts the rewrite to those anchors and their own inputs/outputs (sensitivity)."""
    g = graph.gm.graph
    by_name = {n.name: n for n in graph.nodes}
    if layers is None:
        tensors = {name: params[name] for name in plan.observed} | \
                  {name: params[src] for name, src in plan.shared.items()}
        anchors = [n.name for n in plan.layers]
    else:
        planner = Planner(graph, {}, set())
        tensors, anchors = {}, list(layers)
        for name in layers:
            node = by_name[name]
            grid = {**plan.on_grid, **plan.shared, **{o: o for o in plan.observed}}
            x = node.args[0]
            tensors[x.name] = params[grid[x.name]]
            out = planner.output_of(node)
            if out.name in grid:
                tensors[out.name] = params[grid[out.name]]
    added = 0
    position = {n.name: i for i, n in enumerate(graph.nodes)}
    for name, qp in sorted(tensors.items(), key=lambda item: position[item[0]]):   # graph order: the same
        node = by_name[name]                                                      # node names in every process
        with g.inserting_after(node):
            fq = g.call_function(torch.fake_quantize_per_tensor_affine, make_fq_args(node, qp))
        node.replace_all_uses_with(fq, delete_user_cb=lambda user: user is not fq)
        fq.meta[QPARAMS_KEY] = qp
        added += 1
    for name in anchors:
        _functionalize(graph, by_name[name], target.weight_qmax)
    for name, reason in plan.float_layers.items():
        if name in by_name:
            by_name[name].meta[FLOAT_REASON_KEY] = reason
    graph.commit()
    return added


def sqnr_db(reference, output) -> float:
    from graphopt.verify import flatten_outputs
    ref = torch.cat([t.flatten().double() for t in flatten_outputs(reference)])
    out = torch.cat([t.flatten().double() for t in flatten_outputs(output)])
    noise = (ref - out).pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * torch.log10(ref.pow(2).sum() / noise).item()


@register_pass("insert_qdq")
class InsertQDQ(Pass):
    """Calibrate activations and insert fake-quant nodes (int8 weights, uint8/int8 activations).

    Options:
        observer: how each activation's range is chosen from the calibration data (a registered observer)
        activation_dtype: uint8 (asymmetric, what integer kernels run fastest) or int8 activations
        percentile: with observer = "percentile": the share of values kept inside the range, in percent
        max_batches: calibration batches read
        layers: layers (and embedding tables) to quantize (module name patterns; default: all)
        exclude: layers (and embedding tables) that stay float (module name patterns)
        first_layer: "float" keeps the model's first conv/linear layer float
        last_layer: "float" keeps the model's last conv/linear layer float
        sensitive_float: keep this many layers float, those whose quantization alone costs the most accuracy
        bound: largest relative output error accepted (the pass's contract)
        progress: show a progress bar while calibrating
        layer_outputs: int8 requantizes each layer's output; float leaves it float; auto: float for Linears on
            token sequences
        embeddings: quantize embedding tables to int8 (one scale per column)
        target: the deployment target whose int8 arithmetic the graph models (auto: this CPU)
    """

    contract = Contract.BOUNDED
    requires = frozenset({"calibration_data"})
    ensures = frozenset({"qdq"})

    class Rules(Options):
        renamed = {"keep_float": "exclude"}

    def __init__(self, observer: ObserverName = "mse", activation_dtype: Literal["uint8", "int8"] = "uint8",
                 percentile: Percentile = 99.99, max_batches: Count = 16, layers: LayerPatterns | None = None,
                 exclude: LayerPatterns | None = None, first_layer: Policy = "int8", last_layer: Policy = "int8",
                 sensitive_float: Index = 0, bound: Tolerance = 0.5, progress: bool = True,
                 layer_outputs: Literal["auto", "int8", "float"] = "auto",
                 embeddings: bool = True, target: TargetName = "auto"):
        self.target = get_target(target)   # "auto": this CPU, resolved once
        self.layer_outputs, self.embeddings = layer_outputs, embeddings
        self.observer_options = {"percentile": {"percentile": percentile}}.get(observer, {})
        make_observer(observer, **self.observer_options)  # validates its options now
        self.observer, self.activation_dtype = observer, activation_dtype
        self.max_batches, self.selection = max_batches, LayerSelection.of(layers, exclude)
        self.first_layer, self.last_layer = first_layer, last_layer
        self.sensitive_float, self.bound, self.progress = sensitive_float, bound, progress

    def _policy(self, graph: Graph) -> dict[str, str]:
        layers = Planner(graph, {}, set()).layer_candidates()
        tables = [n for n in graph.nodes if isinstance(_module(graph, n), nn.Embedding)]
        self.selection.check([name for n in layers + tables for name in (str(n.target), n.name)], "pass 'insert_qdq'",
                             "conv/linear layer or embedding")
        keep = {n.name: f"kept float ({reason})" for n in layers
                if (reason := self.selection.reason(str(n.target), n.name))}
        if layers and self.first_layer == "float":
            keep[layers[0].name] = "first layer kept float (first_layer='float')"
        if layers and self.last_layer == "float":
            keep[layers[-1].name] = "last layer kept float (last_layer='float')"
        return keep

    def _params(self, graph: Graph, plan: QuantPlan, data,
                ranges: dict[str, tuple[float, float]]) -> tuple[dict[str, QParams], dict[str, str]]:
        """Parameters of the plan's observed tensors. The float graph does not change while the
        plan is revised, so ``ranges`` keeps every tensor's range and only new ones are calibrated."""
        missing = {name: make_observer(self.observer, **self.observer_options)
                   for name in plan.observed if name not in ranges}
        if missing:
            calibrate(graph, missing, data, self.max_batches, self.progress)
            ranges.update({name: observer.range() for name, observer in missing.items()})
        params, zero_range = {}, {}
        for name in plan.observed:
            lo, hi = ranges[name]
            if max(hi, 0.0) - min(lo, 0.0) <= 1e-12 * max(1.0, abs(lo), abs(hi)):
                zero_range[name] = "zero range (constant activation)"
                continue
            params[name] = affine_qparams(lo, hi, self.activation_dtype)
        return params, zero_range

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        data = reiterable(ctx.data.get("calibration_data"), self.max_batches)  # read more than once
        if not Planner(graph, {}, set()).layer_candidates() and not any(
                isinstance(_module(graph, n), nn.Embedding) for n in graph.nodes):
            raise ConfigError("pass 'insert_qdq': the model has no quantizable layer (Conv1d, Conv2d, Linear or "
                              "Embedding module); nothing to quantize")
        keep = self._policy(graph)
        blocked: set[str] = set()
        ranges: dict[str, tuple[float, float]] = {}
        plan = Planner(graph, keep, blocked, self.layer_outputs).plan()
        params, zero = self._params(graph, plan, data, ranges)
        while zero:  # constant activations cannot be scaled: keep them (and the layers they feed) float
            blocked |= set(zero)
            plan = Planner(graph, keep, blocked, self.layer_outputs).plan()
            params, zero = self._params(graph, plan, data, ranges)
        held = held_batch(graph, data)   # rank 0's first batch on every rank
        reference = graph.run(*held)
        sensitivity = {}
        if self.sensitive_float and plan.layers:
            sensitivity = self._sensitivity(graph, plan, params, self.target, held, reference)
            worst = sorted(sensitivity, key=sensitivity.get, reverse=True)[:self.sensitive_float]
            keep |= {name: f"sensitive (error {sensitivity[name]:.3g} when quantized alone)" for name in worst}
            plan = Planner(graph, keep, blocked, self.layer_outputs).plan()
            params, _ = self._params(graph, plan, data, ranges)
        added = apply_plan(graph, plan, params, self.target)
        graph.meta[TARGET_KEY] = self.target.name
        tables = [quantize_embedding(graph, n) for n in list(graph.nodes) if self.embeddings
                  and isinstance(_module(graph, n), nn.Embedding) and n.args and not n.kwargs
                  and self.selection.selects(str(n.target), n.name)]
        if tables:
            graph.commit()
        output = graph.run(*held)
        stats = {"target": self.target.name, "weight_range": [self.target.weight_qmin, self.target.weight_qmax],
                 "int8_layers": len(plan.layers), "quantized_adds": len(plan.adds), "fake_quant_nodes": added,
                 "int8_embeddings": len(tables),
                 "observer": self.observer, "sqnr_db": round(sqnr_db(reference, output), 2),
                 "max_rel_error": compare_outputs(reference, output)[1]}
        if plan.float_layers:
            stats["float_layers"] = dict(plan.float_layers)
        if blocked:
            stats["zero_range_tensors"] = sorted(blocked)
        if sensitivity:
            stats["sensitivity"] = {k: round(v, 5) for k, v in sorted(sensitivity.items(), key=lambda kv: -kv[1])}
        return PassResult(graph, changed=added > 0 or bool(tables), stats=stats)

    @staticmethod
    def _sensitivity(graph, plan, params, target, held, reference) -> dict[str, float]:
        """Output error (relative) with one layer quantized at a time (under torchrun, each rank a share)."""
        def error(layer) -> float:
            trial = graph.clone()
            apply_plan(trial, plan, params, target, layers=[layer.name])
            return compare_outputs(reference, trial.run(*held))[1]
        return dict(zip([layer.name for layer in plan.layers], map_shared(error, plan.layers)))
