"""Weight sharing: each layer's weights take one of 2**bits shared values (per-layer k-means).

Deep Compression's trained quantization: centroids start evenly spaced between the
smallest and largest weight, Lloyd iterations refine them, and centroids are rounded to
fp16 so the packed file stores the codebook exactly. Pruned (zero) weights stay zero and
are not clustered. Optional distillation fine-tunes the centroids: every weight of a
cluster receives the cluster's mean gradient, so shared weights stay shared.
"""
from __future__ import annotations

import torch

from typing import Annotated

import annotated_types as at

from graphopt.ir import Graph
from graphopt.options import Count, NonNegative, Positive, Tolerance
from graphopt.pass_base import Contract, Pass, PassContext, PassResult, register_pass
from graphopt.quant.weights import (annotate, configure_weight_pass, finetune_constrained, forget,
                              tied_gradient, weight_layers)

Bits = Annotated[int, at.Ge(2), at.Le(8)]


def kmeans_1d(values: torch.Tensor, clusters: int, iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids, assignment) of 1-D ``values`` into ``clusters`` groups, linear initialisation."""
    values = values.double()
    centroids = torch.linspace(float(values.min()), float(values.max()), clusters, dtype=torch.float64,
                               device=values.device)
    assignment = None
    for _ in range(iterations):
        centroids, _ = torch.sort(centroids)
        new = torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        sums = torch.zeros(clusters, dtype=torch.float64, device=values.device).index_add_(0, assignment, values)
        counts = torch.bincount(assignment, minlength=clusters)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids.float(), assignment


@register_pass("share_weights")
class ShareWeights(Pass):
    """Cluster each conv/linear layer's weights into 2**bits shared values (k-means, fp16 codebook).

    Options:
        bits: each layer keeps 2**bits distinct weight values
        iterations: k-means (Lloyd) iterations per layer
        finetune_epochs: fine-tune the shared values by distillation for this many epochs (0: none)
        lr: fine-tuning learning rate
        probe_lr: first try lr, lr/10 and lr/100 for 20 steps each and fine-tune at the best
        max_batches: fine-tuning batches per epoch (default: the whole loader)
        layers: layers to compress (module name patterns; default: every conv/linear layer)
        exclude: layers to leave alone (module name patterns)
        bound: largest relative output error accepted (default: no limit, the error is reported)
        progress: show a progress bar while fine-tuning
    """

    contract = Contract.BOUNDED
    preserves = frozenset({"shapes", "cost", "channel_groups"})

    def __init__(self, bits: Bits = 4, iterations: Count = 30, finetune_epochs: NonNegative = 0.0, lr: Positive = 1e-4,
                 max_batches: Count | None = None, layers: list[str] | None = None,
                 exclude: list[str] | None = None, bound: Tolerance | None = None, progress: bool = False,
                 probe_lr: bool = False):
        owner = "pass 'share_weights'"
        self.owner = owner
        self.bits, self.iterations = bits, iterations
        configure_weight_pass(self, owner, layers, exclude, bound, finetune_epochs, lr, max_batches, progress,
                              probe_lr)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        clusters = 1 << self.bits
        targets = weight_layers(graph, self.layers, self.exclude, self.owner)
        plans = []
        errors = []
        for path, module in targets:
            w = module.weight
            flat = w.detach().reshape(-1).clone()  # the weight is overwritten below
            keep = flat != 0
            if not keep.any():
                continue
            centroids, assignment = kmeans_1d(flat[keep], clusters, self.iterations)
            index = torch.full((flat.numel(),), clusters, dtype=torch.long, device=flat.device)  # zeros: own cluster
            index[keep] = assignment
            plans.append((path, w, index))
            self._assign(w, index, centroids.half().float())
            errors.append(float((w.detach().reshape(-1) - flat).norm() / flat.norm().clamp(min=1e-12)))
        stats = {"bits": self.bits, "layers": len(plans)}
        if self.finetune and plans:
            rewrites = {w: tied_gradient(index, clusters) for _, w, index in plans}
            result = finetune_constrained(graph, ctx.data, self.finetune, rewrites, self.progress)
            stats["distill_loss_last"] = round(result["loss_last"], 4)
            for _, w, index in plans:  # re-snap: exact fp16 centroids, one value per cluster
                sums = torch.zeros(clusters + 1, device=w.device).index_add_(0, index, w.detach().reshape(-1))
                counts = torch.bincount(index, minlength=clusters + 1).clamp(min=1)
                self._assign(w, index, (sums / counts)[:clusters].half().float())
        for path, _, _ in plans:
            forget(graph, f"{path}.weight", "quant")
            annotate(graph, f"{path}.weight", "shared", {"bits": self.bits})
        if errors:
            stats["mean_weight_rel_error"] = round(sum(errors) / len(errors), 4)
        return PassResult(graph, changed=bool(plans), stats=stats)

    @staticmethod
    def _assign(weight: torch.Tensor, index: torch.Tensor, centroids: torch.Tensor) -> None:
        """weight = centroids[index], index len(centroids) meaning a pruned zero."""
        table = torch.cat([centroids, torch.zeros(1, device=centroids.device)])
        with torch.no_grad():
            weight.copy_(table[index].reshape(weight.shape))
