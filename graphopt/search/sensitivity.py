"""The cheap first stage of the search: how much each layer minds being pruned or quantized, and
how far uniform pruning can go before fine-tuning, measured in seconds on the held batch and a
few evaluations, so the costly trials only sample ranges that can pay off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from graphopt.distributed import active, broadcast_object, map_shared
from graphopt.pruning.channels import OUT, channel_groups
from graphopt.errors import GraphoptError
from graphopt.ir import Graph
from graphopt.pass_base import PassContext, get_pass
from graphopt.pass_manager import PassManager
from graphopt.training.distill import DistillConfig, epoch_seconds
from graphopt.verify import compare_outputs

SWEEP = (0.2, 0.4, 0.6, 0.8)     # shares of the MACs removed, before any fine-tuning
GRID = 0.05                       # the search samples pruning shares on this grid
GROUP_RATIO = 0.5                 # each group alone loses this share of its channels
MAX_GROUPS = 80                   # beyond this, the groups with the most MACs are measured
# epochs of distillation -> share of the MACs pruned it brought back to within a point
# (MobileNetV2 on the Fashion-MNIST probe, 84.1%: 50% cut -0.1 after 2 epochs; 65% cut -0.85 after 8)
RECOVERED = ((2.0, 0.5), (8.0, 0.65))


@dataclass
class Sensitivity:
    prune_layers: dict[str, float] = field(default_factory=dict)   # layer -> output error, half its channels cut
    quant_layers: dict[str, float] = field(default_factory=dict)   # layer -> output error, quantized alone
    sweep: dict[float, float] = field(default_factory=dict)        # share of MACs pruned -> metric, no fine-tune
    reach: float = 1.0                                             # most of the MACs structured pruning removes
    epoch_seconds: float | None = None                             # one epoch of distillation, measured
    longest_recovery: float = 8.0                                  # the longest distillation sampled (epochs)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def protected_order(self) -> list[str]:
        return sorted(self.prune_layers, key=self.prune_layers.get, reverse=True)

    def max_prune(self, original: float, allowed: float, epochs: float, ceiling: float) -> float:
        """The largest swept share whose drop before fine-tuning stays within reach (twice the
        allowed drop; ten times when ``epochs`` of distillation can recover), the first grid point
        at least, and halfway to the next. With distillation never below what ``RECOVERED`` says
        that many epochs bring back: the sweep says little there (MobileNetV2 is at chance at 20%
        before fine-tuning, yet within 0.1 points at 50% after 2 epochs of distillation)."""
        reach = allowed * (10 if epochs > 0 else 2)
        ok = [r for r, m in sorted(self.sweep.items()) if original - m <= reach]
        best = max(ok, default=min(self.sweep, default=ceiling))
        nxt = [r for r in sorted(self.sweep) if r > best]
        share = (best + nxt[0]) / 2 if nxt else best   # halfway to the first miss
        recovered = max((r for e, r in RECOVERED if e <= epochs), default=0.0)
        return round(min(ceiling, on_grid(self.reach), max(share, recovered)), 4)

    def to_dict(self) -> dict:
        return {"prune_layers": self.prune_layers, "quant_layers": self.quant_layers,
                "sweep": {str(k): v for k, v in self.sweep.items()}, "reach": round(self.reach, 4),
                "epoch_seconds": None if self.epoch_seconds is None else round(self.epoch_seconds, 2),
                "longest_recovery": self.longest_recovery,
                "notes": self.notes, "seconds": round(self.seconds, 2)}


def prune_layer_sensitivity(base: Graph) -> dict[str, float]:
    """Output error (relative, on the held batch) with one channel group cut by half, named by its
    producing layer; groups that cannot be pruned alone are left out."""
    cost = base.analysis("cost")
    layer_macs = {n.target: cost.nodes[n.name].macs for n in base.nodes if n.op == "call_module"}
    groups = [g for g in channel_groups(base).prunable if g.targets(OUT)]
    groups.sort(key=lambda g: -sum(layer_macs.get(t, 0) for t in g.targets(OUT)))
    reference = base.run()
    layers = [group.targets(OUT)[0] for group in groups[:MAX_GROUPS]]

    def error(layer: str) -> float | None:
        step = get_pass("prune_channels")(ratio=0.0, overrides={layer: GROUP_RATIO})
        try:
            graph = PassManager([step], verify=False).run(base).graph
        except GraphoptError:
            return None
        return compare_outputs(reference, graph.run())[1]
    # under torchrun each rank measures a share of the layers; every rank gets them all
    return {layer: e for layer, e in zip(layers, map_shared(error, layers)) if e is not None}


def quant_layer_sensitivity(base: Graph, data: dict) -> dict[str, float]:
    """insert_qdq's own per-layer analysis (each layer quantized alone, output error)."""
    step = get_pass("insert_qdq")(sensitive_float=1, progress=False, bound=float("inf"))
    result = PassManager([step], context=PassContext(dict(data)), verify=False).run(base)
    return dict(result.records[-1].stats.get("sensitivity", {}))


def prune_reach(base: Graph, exclude: list[str] | None = None, round_to: int = 1) -> float:
    """The share of the MACs structured pruning removes at most (every prunable group cut by
    prune_channels' ``max_ratio``, widths kept multiples of ``round_to``, ``exclude`` kept whole),
    so the search asks for no share that can only fail: the Fashion-MNIST CNN at multiples of 16
    reaches 53.8%, and four of a latency run's first 23 trials asked for 55-65%."""
    step = get_pass("prune_channels")(ratio=0.0, exclude=list(exclude or ()), round_to=round_to)
    try:
        choice = step.plan(base, ratio=step.max_ratio)
    except GraphoptError:   # nothing left to prune (every group excluded or blocked)
        return 0.0
    return 1 - choice.estimate["macs"] / max(base.analysis("cost").macs, 1)


def distill_epoch_seconds(base: Graph, data, max_batches: int | None) -> float | None:
    """One epoch of the recovery the trials run (distillation from ``base``, at most
    ``max_batches`` batches an epoch), timed on a few steps of an unpruned student: pruned
    students cost less, so the search plans on the safe side. Rank 0's measurement under
    torchrun (every rank must build the same search space). None where the data cannot tell an
    epoch's length."""
    config = DistillConfig(epochs=1.0, max_batches=max_batches)
    seconds = epoch_seconds(base.clone(), base, data, config)
    return broadcast_object(seconds) if active() else seconds


def on_grid(share: float) -> float:
    """The largest grid point at or below ``share`` (0.7 / 0.05 is 13.999...)."""
    return round(math.floor(round(share / GRID, 6)) * GRID, 4)


def prune_sweep(base: Graph, metric: Callable[[Graph], float]) -> dict[float, float]:
    """The metric at each swept pruning share, without fine-tuning (global importance); under
    torchrun each rank measures a share of the points."""
    def point(share: float) -> float | None:
        step = get_pass("prune_channels")(target_macs=round(1 - share, 4), scope="global")
        try:
            graph = PassManager([step], verify=False).run(base).graph
        except GraphoptError:
            return None
        return metric(graph)
    if not active():
        out = {}
        for share in SWEEP:
            value = point(share)
            if value is None:
                break   # the budget cannot be reached: larger shares cannot either
            out[share] = value
        return out
    values = map_shared(point, SWEEP)
    reached = next((i for i, v in enumerate(values) if v is None), len(values))
    return dict(zip(SWEEP[:reached], values[:reached]))
