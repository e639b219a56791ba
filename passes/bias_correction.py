"""Empirical bias correction (Nagel et al., 2019) for layers with fake-quantized weights.

Quantizing W shifts a layer's expected output by (W_q - W) E[x]; subtracting that shift from the
bias removes the systematic part of the error. E[x] is each input channel's mean over the
calibration data (spatial positions included; padding is ignored).
"""
from __future__ import annotations

import torch
from torch import fx

from graphopt.quant.calibration import ChannelMeanObserver, calibrate
from graphopt.ir import Graph
from graphopt.layer_selection import LayerPatterns, LayerSelection
from graphopt.options import Count, Tolerance
from graphopt.pass_base import Contract, Pass, PassContext, PassResult, register_pass
from graphopt.quant.qparams import CONV_FUNCS, is_weight_fq
import torch.nn.functional as F


def _corrected_layers(graph: Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and (n.target in CONV_FUNCS or n.target is F.linear)
            and len(n.args) > 2 and is_weight_fq(n.args[1]) and n.args[1].args[0].op == "get_attr"]


@register_pass("bias_correction")
class BiasCorrection(Pass):
    """Subtract the expected output shift that weight quantization causes from each layer's bias.

    Options:
        max_batches: calibration batches read to estimate each layer's mean input
        bound: largest relative output error accepted (the pass's contract)
        progress: show a progress bar while calibrating
        layers: layers whose bias is corrected (module name patterns; default: every int8 conv/linear layer)
        exclude: layers left as they are (module name patterns)
    """

    contract = Contract.BOUNDED
    requires = frozenset({"qdq", "calibration_data"})
    preserves = frozenset({"shapes", "cost", "channel_groups"})

    def __init__(self, max_batches: Count = 16, bound: Tolerance = 0.5, progress: bool = True,
                 layers: LayerPatterns | None = None, exclude: LayerPatterns | None = None):
        self.max_batches, self.bound, self.progress = max_batches, bound, progress
        self.selection = LayerSelection.of(layers, exclude)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        layers = _corrected_layers(graph)
        names = {n.name: n.meta.get("graphopt.layer", n.name) for n in layers}   # module paths before insert_qdq
        self.selection.check(list(names.values()), "pass 'bias_correction'", "int8 conv/linear layer")
        layers = [n for n in layers if self.selection.selects(names[n.name], n.name)]
        no_bias = [n.name for n in layers if n.args[2] is None]
        layers = [n for n in layers if n.args[2] is not None and n.args[2].op == "get_attr"]
        observers = {n.args[0].name: ChannelMeanObserver(-1 if n.target is F.linear else 1) for n in layers}
        if not observers:
            return PassResult(graph, changed=False, stats={"corrected": 0})
        calibrate(graph, observers, ctx.data.get("calibration_data"), self.max_batches, self.progress)
        shifts = []
        with torch.no_grad():
            for node in layers:
                fq = node.args[1]
                w = graph.attr(fq.args[0].target)
                delta = fq.target(w, *[graph.attr(a.target) if isinstance(a, fx.Node) else a
                                       for a in fq.args[1:]]) - w
                mean = observers[node.args[0].name].mean().to(w.device)   # observers keep statistics on the CPU
                groups = node.args[6] if node.target in CONV_FUNCS and len(node.args) > 6 else 1
                per_in = delta.flatten(2).sum(2) if delta.dim() > 2 else delta   # out x in/groups
                if groups > 1:
                    mean = mean.view(groups, -1).repeat_interleave(delta.shape[0] // groups, 0)
                    shift = (per_in * mean).sum(1)
                else:
                    shift = per_in @ mean
                bias = graph.attr(node.args[2].target)
                bias.data -= shift
                shifts.append(shift.abs().max().item())
        stats = {"corrected": len(layers), "max_shift": max(shifts)}
        if no_bias:
            stats["skipped_no_bias"] = len(no_bias)
        return PassResult(graph, changed=True, stats=stats)
