"""Fold the simulated-quant graph towards what integer kernels run.

- weight fake-quant becomes an int8 constant (``weight_int8`` + per-channel ``weight_scale``) read
  through ``dequantize_per_channel``: bit-identical values, a quarter of the bytes;
- a ReLU / ReLU6 / Hardtanh(0, x) between a conv, linear or add and its quantized output is
  removed when the output's representable range already lies inside the clamp (the integer
  kernel's saturation does the clamping): the layer is marked fused;
- a fake-quant that re-quantizes a tensor already on the same grid (directly, or through max
  pooling, reshapes or ReLU) is removed; a chain of two fake-quants keeps only the last.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from graphopt.ir import Graph
from graphopt.options import Tolerance
from graphopt.pass_base import Contract, Pass, PassContext, PassResult, register_pass
from graphopt.quant.qparams import (ADD_FUNCS, CONV_FUNCS, FUSED_KEY, clamp_bounds, dequantize_per_channel, is_activation_fq,
                                    is_weight_fq, keeps_grid, qparams, quantize_weight)

def _is_fusable_producer(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in CONV_FUNCS or node.target is F.linear
                                           or node.target in ADD_FUNCS)


def _fold_weights(graph: Graph) -> int:
    g = graph.gm.graph
    folded = 0
    done: dict[str, tuple] = {}   # a layer called more than once (shared weights) is folded once
    for node in list(graph.nodes):
        if not is_weight_fq(node):
            continue
        w, scale_node, zp_node, axis, qmin, qmax = node.args[:6]
        if w.op != "get_attr" or scale_node.op != "get_attr" or scale_node.target.rpartition(".")[0] != \
                w.target.rpartition(".")[0]:
            continue
        owner = w.target.rpartition(".")[0]
        if owner in done:
            if done[owner] != (axis, qmin, qmax):
                continue
        else:
            old = graph.gm.get_submodule(owner)
            scales = graph.attr(scale_node.target)
            container = nn.Module()
            container.register_buffer("weight_int8", quantize_weight(graph.attr(w.target), scales, axis,
                                                                              qmin, qmax))
            container.register_buffer("weight_scale", scales.clone())
            if getattr(old, "bias", None) is not None:
                container.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
            graph.replace_module(owner, container)
            done[owner] = (axis, qmin, qmax)
        with g.inserting_before(node):
            q = g.get_attr(f"{owner}.weight_int8")
            s = g.get_attr(f"{owner}.weight_scale")
            dq = g.call_function(dequantize_per_channel, (q, s, axis))
        graph.bypass(node, dq)
        for dead in (w, zp_node, scale_node):
            if not dead.users:
                g.erase_node(dead)
        folded += 1
    return folded


def _fuse_clamps(graph: Graph) -> list[str]:
    fused = []
    for node in list(graph.nodes):
        bounds = clamp_bounds(graph, node)
        if bounds is None or len(node.users) != 1 or not isinstance(node.args[0], fx.Node):
            continue
        producer, (user,) = node.args[0], list(node.users)
        if not (_is_fusable_producer(producer) and len(producer.users) == 1 and is_activation_fq(user)):
            continue
        lo, hi = qparams(user).real_range
        if lo >= bounds[0] and hi <= bounds[1] * (1 + 1e-5):
            producer.meta.setdefault(FUSED_KEY, []).append(node.name)
            graph.bypass(node, producer)
            fused.append(node.name)
    return fused


def _grid_source(graph: Graph, node: fx.Node) -> fx.Node | None:
    """The fake-quant whose grid ``node``'s value lies on (through grid-keeping ops), if any."""
    while isinstance(node, fx.Node):
        if is_activation_fq(node):
            return node
        if not keeps_grid(graph, node):
            return None
        node = node.args[0] if node.args else None
    return None


def _remove_redundant(graph: Graph) -> tuple[int, int]:
    redundant = collapsed = 0
    for node in list(graph.nodes):
        if not is_activation_fq(node):
            continue
        x = node.args[0]
        if is_activation_fq(x) and qparams(x) != qparams(node) and len(x.users) == 1:
            node.replace_input_with(x, x.args[0])   # requantization chain: keep the last rounding
            graph.gm.graph.erase_node(x)
            collapsed += 1
            continue
        source = _grid_source(graph, x)
        if source is not None and qparams(source) == qparams(node):
            graph.bypass(node, x)
            redundant += 1
    return redundant, collapsed


@register_pass("fold_qdq")
class FoldQDQ(Pass):
    """Fold weight fake-quant into int8 constants, fuse clamping activations, drop redundant Q/DQ.

    Options:
        bound: largest relative output error accepted (the pass's contract)
    """

    contract = Contract.BOUNDED
    requires = frozenset({"qdq"})
    ensures = frozenset({"folded_qdq"})

    def __init__(self, bound: Tolerance = 0.05):
        self.bound = bound

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        weights = _fold_weights(graph)
        fused = _fuse_clamps(graph)
        redundant, collapsed = _remove_redundant(graph)
        graph.commit()
        stats = {"int8_weights": weights, "fused_activations": len(fused), "redundant_qdq_removed": redundant,
                 "requant_chains_collapsed": collapsed}
        return PassResult(graph, changed=bool(weights or fused or redundant or collapsed), stats=stats)
