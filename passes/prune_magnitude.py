"""Unstructured magnitude pruning: zero the smallest conv/linear weights.

Per layer (each layer loses the same fraction) or global (one threshold for all layers),
in one shot or along a gradual schedule (Zhu & Gupta's cubic ramp) with distillation
fine-tuning after each step; fine-tuning keeps pruned weights at exactly zero. Layers whose
filters hold only a few weights can stay dense (``min_fan_in``): a 3x3 depthwise filter left
with 2 of its 9 taps loses its channel, and such layers hold little of the model's size (Zhu &
Gupta left MobileNet's depthwise layers dense).
"""
from __future__ import annotations

import torch

from typing import Literal

from graphopt.ir import Graph
from graphopt.options import Count, Index, NonNegative, Positive, Sparsity, Tolerance
from graphopt.pass_base import Contract, Pass, PassContext, PassResult, register_pass
from graphopt.quant.weights import (annotate, configure_weight_pass, finetune_constrained, weight_layers,
                              zero_mask)



def schedule(sparsity: float, steps: int) -> list[float]:
    """Target sparsity after each of ``steps`` steps: fast at first, gentle near the end."""
    return [sparsity * (1 - (1 - i / steps) ** 3) for i in range(1, steps + 1)]


def _zero_smallest(weights: list[torch.Tensor], count: int) -> None:
    """Zero the ``count`` smallest-magnitude entries over all ``weights`` together."""
    magnitudes = torch.cat([w.detach().abs().reshape(-1) for w in weights])
    if count <= 0:
        return
    chosen = torch.argsort(magnitudes, stable=True)[:count]
    flat_mask = torch.zeros(magnitudes.numel(), dtype=torch.bool, device=magnitudes.device)
    flat_mask[chosen] = True
    start = 0
    with torch.no_grad():
        for w in weights:
            n = w.numel()
            w.masked_fill_(flat_mask[start:start + n].reshape(w.shape), 0.0)
            start += n


@register_pass("prune_magnitude")
class PruneMagnitude(Pass):
    """Zero the smallest-magnitude conv/linear weights (unstructured), per layer or globally.

    Options:
        sparsity: share of the weights set to zero
        scope: layer: every layer loses that share; global: one magnitude threshold for all layers
        steps: reach the sparsity in this many steps (a cubic schedule), fine-tuning after each
        finetune_epochs: fine-tune by distillation for this many epochs after each step (0: none)
        lr: fine-tuning learning rate
        probe_lr: first try lr, lr/10 and lr/100 for 20 steps each and fine-tune at the best
        max_batches: fine-tuning batches per epoch (default: the whole loader)
        layers: layers to prune (module name patterns; default: every conv/linear layer)
        exclude: layers to leave alone (module name patterns)
        min_fan_in: layers whose filters hold fewer weights than this stay dense (3x3 depthwise: 9)
        bound: largest relative output error accepted (default: no limit, the error is reported)
        progress: show a progress bar while fine-tuning
    """

    contract = Contract.BOUNDED
    preserves = frozenset({"shapes", "cost", "channel_groups"})  # values change, shapes and counts do not

    def __init__(self, sparsity: Sparsity = 0.5, scope: Literal["layer", "global"] = "layer", steps: Count = 1,
                 finetune_epochs: NonNegative = 0.0, lr: Positive = 1e-3, max_batches: Count | None = None,
                 layers: list[str] | None = None, exclude: list[str] | None = None, bound: Tolerance | None = None,
                 progress: bool = False, probe_lr: bool = False, min_fan_in: Index = 0):
        owner = "pass 'prune_magnitude'"
        self.owner = owner
        self.sparsity, self.scope, self.steps, self.min_fan_in = float(sparsity), scope, steps, min_fan_in
        configure_weight_pass(self, owner, layers, exclude, bound, finetune_epochs, lr, max_batches, progress,
                              probe_lr)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        targets = weight_layers(graph, self.layers, self.exclude, self.owner)
        dense = [path for path, module in targets if module.weight[0].numel() < self.min_fan_in]
        targets = [(path, module) for path, module in targets if path not in dense]
        if not targets:
            return PassResult(graph, changed=False, stats={"layers": 0, "dense": dense})
        weights = [module.weight for _, module in targets]
        losses = []
        for target in schedule(self.sparsity, self.steps):
            if self.scope == "global":
                _zero_smallest(weights, round(target * sum(w.numel() for w in weights)))
            else:
                for w in weights:
                    _zero_smallest([w], round(target * w.numel()))
            if self.finetune:
                masks = {w: zero_mask(w) for w in weights}
                rewrites = {w: (lambda g, m=m: g.masked_fill(m, 0.0)) for w, m in masks.items()}
                losses.append(finetune_constrained(graph, ctx.data, self.finetune, rewrites, self.progress))
                with torch.no_grad():
                    for w, m in masks.items():
                        w.masked_fill_(m, 0.0)
        per_layer = {}
        for path, module in targets:
            zeros = int(zero_mask(module.weight).sum())
            per_layer[path] = round(zeros / module.weight.numel(), 4)
            annotate(graph, f"{path}.weight", "sparsity", per_layer[path])
        total = sum(w.numel() for w in weights)
        zeroed = sum(int(zero_mask(w).sum()) for w in weights)
        stats = {"sparsity": round(zeroed / total, 4), "layers": len(targets), "zeroed": zeroed,
                 "per_layer": per_layer, "dense": dense}
        if losses:
            stats["distill_loss_last"] = round(losses[-1]["loss_last"], 4)
        return PassResult(graph, changed=zeroed > 0, stats=stats)
