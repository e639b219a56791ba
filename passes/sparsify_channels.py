"""Sparsity-inducing training for structured pruning: fine-tune (distilling from the input
model) with a penalty on exactly the channel groups ``prune_channels`` will cut, so whole
groups fall toward zero before they are removed and pruning loses little.

Penalties: ``group_lasso`` (the sum over channels of the L2 norm of every weight slice a
channel owns, across all layers of its group, each group weighted by the square root of its
slice size: Wen et al. 2016) and ``bn_l1`` (L1 on BatchNorm scales: network slimming, Liu et al.
2017; run it before ``fold_batchnorm``). Follow with ``prune_channels(importance="l2")``
(group lasso) or ``importance="bn_scale"`` (network slimming): those criteria read the norms
the penalty shrank.

Given the pruning target (``ratio`` or ``target_macs``, as ``prune_channels`` takes them), the
penalty falls only on the channels that ``prune_channels`` with that target would cut, re-chosen
as training goes, with a strength that grows over the run (growing regularisation, Wang et al.
2021): in a short budget this drives exactly those channels toward zero while distillation moves
their work onto the channels that stay. Without a target, every prunable channel is penalised
(the classic recipes, which need long training to separate the channels).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn

from graphopt.errors import ConfigError
from graphopt.ir import Graph
from graphopt.layer_selection import LayerPatterns, LayerSelection
from graphopt.options import Count, Fraction, Positive, Share, Sparsity
from graphopt.pass_base import Contract, Pass, PassContext, PassResult, get_pass, register_pass
from graphopt.pruning.channels import NORM, ChannelGroup, channel_groups
from graphopt.pruning.groups import blocking_summary
from graphopt.training.distill import DistillConfig, distill
from graphopt.passes.pruning_importance import WEIGHT_ROLES



def _rows(tensor: torch.Tensor, axis: int, offset: int, inner: int, size: int) -> torch.Tensor:
    """The ``size`` x k matrix of a live tensor's entries that belong to each channel (with grad)."""
    return tensor.movedim(axis, 0)[offset:offset + size * inner].reshape(size, -1)


class _Slices:
    """Where each prunable group's channels live in the student's parameters, resolved once;
    ``norms()`` gives each group's per-channel norms from the live weights."""

    def __init__(self, graph: Graph, groups: list[ChannelGroup], penalty: str):
        self.gm, self.entries = graph.gm, []
        for g in groups:
            if penalty == "bn_l1":
                slices = [(m.target, "weight", m) for m in g.members if m.role == NORM and
                          isinstance(graph.gm.get_submodule(m.target), nn.modules.batchnorm._BatchNorm)
                          and graph.gm.get_submodule(m.target).weight is not None]
            else:
                slices = [(m.target, "in_proj_weight" if m.role == "heads" else "weight", m)
                          for m in g.members if m.role in WEIGHT_ROLES]
            if slices:
                self.entries.append((g, slices))

    def norms(self, penalty: str, masks: dict[int, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per group, each channel's norm (times its mask: 1 where penalised)."""
        out = []
        for g, slices in self.entries:
            if masks is not None and g.id not in masks:
                continue
            parts = [_rows(getattr(self.gm.get_submodule(t), attr), m.axis, m.offset, m.inner, g.size)
                     for t, attr, m in slices]
            if penalty == "bn_l1":
                out.append(sum(p.abs().sum(1) for p in parts))
            else:
                width = sum(p.shape[1] for p in parts)
                out.append(math.sqrt(width) * sum(p.pow(2).sum(1) for p in parts).add(1e-12).sqrt())
            if masks is not None:
                out[-1] = out[-1] * masks[g.id]
        return out


@register_pass("sparsify_channels")
class SparsifyChannels(Pass):
    """Train with a group-lasso (or BatchNorm-scale L1) penalty on the prunable channel groups.

    Options:
        penalty: group_lasso (norms of every weight slice a channel owns) or bn_l1 (BatchNorm scales)
        strength: weight of the penalty against the distillation loss (default 1.0 with a target, else 1e-3)
        schedule: ramp grows the penalty from 0 over the first half of the run; constant holds it
        epochs: passes over the training data (may be fractional)
        lr: learning rate (AdamW)
        max_batches: batches per epoch (default: the whole loader)
        alpha: weight of the distillation term; 1 - alpha goes to the hard labels
        temperature: softening of both models' logits in the distillation loss
        exclude: layers whose channels are never penalised (module name patterns)
        ratio: penalise only what prune_channels(ratio=...) would cut
        target_macs: penalise only what prune_channels(target_macs=...) would cut
        importance: the criterion prune_channels would rank channels by (with a target)
        replan: how many times during the run the penalised channels are chosen again
        progress: show a progress bar
        amp: mixed precision for the training steps: bf16, or fp16 on CUDA (default: float32)
    """

    contract = Contract.NONE
    requires = frozenset({"train_data"})
    preserves = frozenset({"shapes", "cost", "channel_groups"})   # weights change, structure does not

    def __init__(self, penalty: Literal["group_lasso", "bn_l1"] = "group_lasso", strength: Positive | None = None,
                 schedule: Literal["constant", "ramp"] = "ramp",
                 epochs: Positive = 1.0, lr: Positive = 1e-3, max_batches: Count | None = None,
                 alpha: Fraction = 0.7, temperature: Positive = 4.0, exclude: LayerPatterns | None = None,
                 ratio: Sparsity | None = None, target_macs: Share | None = None, importance: str = "l2",
                 replan: Count = 4, progress: bool = True, amp: Literal["bf16", "fp16"] | None = None):
        self.penalty, self.schedule = penalty, schedule
        self.exclude = list(exclude or [])
        if ratio is not None and target_macs is not None:
            raise ConfigError("pass 'sparsify_channels': give at most one of ratio, target_macs")
        self.target = {"ratio": ratio} if ratio is not None else {"target_macs": target_macs} \
            if target_macs is not None else None
        self.importance, self.replan = importance, replan
        # the penalty's weight against the distillation loss: a targeted penalty may be strong (only
        # channels about to be cut feel it); an untargeted one shrinks every channel, so gently
        self.strength = strength if strength is not None else 1.0 if self.target else 1e-3
        self.config = DistillConfig(epochs=float(epochs), lr=lr, max_batches=max_batches, alpha=alpha,
                                    temperature=temperature, amp=amp)
        self.config.check()
        self.progress = progress

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        plan = channel_groups(graph, self._excluded(graph))
        if not plan.prunable:
            raise ConfigError(f"sparsify_channels: the model has no prunable channel group to penalise "
                              f"({len(plan.groups)} groups, all blocked: {blocking_summary(plan.blocked)})")
        slices = _Slices(graph, plan.prunable, self.penalty)
        if not slices.entries:
            raise ConfigError("sparsify_channels: penalty 'bn_l1' needs BatchNorm layers on the prunable channels "
                              "(run it before fold_batchnorm, or use penalty 'group_lasso')")
        masks = self._masks(graph, ctx) if self.target else None
        with torch.no_grad():
            before = [n.detach() for n in slices.norms(self.penalty, masks)]
        strength, state = self.strength, {"next": 1}

        def penalty(progress: float) -> torch.Tensor:
            nonlocal masks
            if masks is not None and progress * self.replan >= state["next"]:   # re-choose as norms move
                state["next"] += 1
                masks = self._masks(graph, ctx)
            ramp = min(1.0, 2 * progress) if self.schedule == "ramp" else 1.0
            return strength * ramp * sum(n.sum() for n in slices.norms(self.penalty, masks))

        teacher = ctx.data.get("teacher") or ctx.data["input_graph"]
        stats = distill(graph, teacher, ctx.data["train_data"], self.config, progress=self.progress,
                        penalty=penalty)
        with torch.no_grad():
            after = [n.detach() for n in slices.norms(self.penalty, masks)]
            kept = slices.norms(self.penalty)
        stats |= {"groups": len(slices.entries), "penalty_before": float(sum(n.sum() for n in before)),
                  "penalty_after": float(sum(n.sum() for n in after)),
                  "near_zero_channels": _near_zero(kept), "channels": sum(n.numel() for n in kept)}
        if masks is not None:
            stats["penalised_channels"] = int(sum(m.sum() for m in masks.values()))
        return PassResult(graph, changed=True, stats={k: round(v, 4) if isinstance(v, float) else v
                                                      for k, v in stats.items()})

    def _excluded(self, graph: Graph) -> set[str]:
        """Module paths the ``exclude`` patterns name (each pattern must name a layer)."""
        selection = LayerSelection.of(exclude=self.exclude)
        paths = [p for p in graph.modules() if p]
        selection.check(paths, "pass 'sparsify_channels'", what="layer")
        return {path for path in paths if not selection.selects(path)}

    def _masks(self, graph: Graph, ctx: PassContext) -> dict[int, torch.Tensor]:
        """Per group id, 1 for each channel ``prune_channels`` with this target would cut now."""
        pruner = get_pass("prune_channels")(**self.target, importance=self.importance,
                                            exclude=self.exclude or None)
        choice = pruner.plan(graph, ctx)
        masks = {}
        for g in choice.plan.groups:
            if choice.removed.get(g.id):
                mask = torch.zeros(g.size, device=graph.device)
                mask[list(choice.removed[g.id])] = 1.0
                masks[g.id] = mask
        return masks


def _near_zero(norms: list[torch.Tensor], share: float = 0.05) -> int:
    """Channels whose norm fell below ``share`` of the largest in their group."""
    return int(sum(int((n < share * n.max().clamp(min=1e-12)).sum()) for n in norms))
