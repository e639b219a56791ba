"""Low-bit weight quantization (int8, int4, int2) with per-channel or per-group scales.

Weights stay float in the graph, replaced by ``code * scale`` (symmetric, codes in
[-qmax, qmax] with qmax = 2**(bits-1) - 1, so int2 is ternary); the scales, rounded to fp16
where that is exact, are recorded as the weight's annotation so the packed backend stores
the codes bit-packed and the scales once per channel or group.
"""
from __future__ import annotations

import torch

from typing import Literal

from graphopt.ir import Graph
from graphopt.options import Count, Tolerance
from graphopt.pass_base import Contract, Pass, PassContext, PassResult, register_pass
from graphopt.quant.weights import annotate, configure_weight_pass, forget, group_scales, weight_layers



@register_pass("quantize_weights")
class QuantizeWeights(Pass):
    """Round conv/linear weights to int8/int4/int2 codes times per-channel or per-group scales.

    Options:
        bits: code width (2 is ternary: codes -1, 0, 1)
        granularity: one scale per output channel, or per group of group_size weights of a channel
        group_size: weights per scale with granularity = "group" (a channel that does not divide keeps one scale)
        layers: layers to quantize (module name patterns; default: every conv/linear layer)
        exclude: layers to leave alone (module name patterns)
        bound: largest relative output error accepted (default: no limit, the error is reported)
    """

    contract = Contract.BOUNDED
    preserves = frozenset({"shapes", "cost", "channel_groups"})

    def __init__(self, bits: Literal[2, 4, 8] = 4, granularity: Literal["channel", "group"] = "channel",
                 group_size: Count = 64,
                 layers: list[str] | None = None, exclude: list[str] | None = None, bound: Tolerance | None = None):
        owner = "pass 'quantize_weights'"
        self.owner = owner
        self.bits, self.granularity, self.group_size = bits, granularity, group_size
        configure_weight_pass(self, owner, layers, exclude, bound)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        qmax = (1 << (self.bits - 1)) - 1
        per_channel_fallback, errors, count = [], [], 0
        for path, module in weight_layers(graph, self.layers, self.exclude, self.owner):
            w = module.weight
            channels = w.shape[0]
            row = w.numel() // channels
            group = row
            if self.granularity == "group":
                if row % self.group_size == 0:
                    group = self.group_size
                else:
                    per_channel_fallback.append(path)
            rows = w.detach().reshape(-1, group)
            scales = group_scales(rows, qmax)
            codes = torch.clamp(torch.round(rows / scales[:, None]), -qmax, qmax) + 0.0  # no -0.0 codes
            quantized = (codes * scales[:, None]).reshape(w.shape)
            errors.append(float((quantized - w.detach()).norm() / w.detach().norm().clamp(min=1e-12)))
            with torch.no_grad():
                w.copy_(quantized)
            forget(graph, f"{path}.weight", "shared")
            annotate(graph, f"{path}.weight", "quant", {"bits": self.bits, "group_size": group, "scales": scales})
            count += 1
        stats = {"bits": self.bits, "granularity": self.granularity, "layers": count}
        if self.granularity == "group":
            stats["group_size"] = self.group_size
        if per_channel_fallback:
            stats["per_channel_fallback"] = len(per_channel_fallback)
        if errors:
            stats["mean_weight_rel_error"] = round(sum(errors) / len(errors), 4)
        return PassResult(graph, changed=count > 0, stats=stats)
