"""Structured channel pruning over dependency groups, with the weights physically shrunk.

Plan: analyse channel groups (graphopt.pruning.channels), score channels with an importance
criterion, choose what to remove (uniform ratio, global ranking with a per-group cap,
per-layer overrides, rounding to a multiple, or a MACs/params budget: the shared cost model,
graphopt.cost.CostModel, prices a choice and the shared solver, graphopt.budget, finds the
least pruning that fits it), over the groups ``layers``/``exclude`` leave prunable
(graphopt.layer_selection).
Apply: slice every member of each group and rewrite shape literals. Oracle: the pass
hands the PassManager the original graph with the removed channels masked (consumer
columns zeroed) as its reference, and promises exact equality with it.
"""
from __future__ import annotations

import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import model_validator
from torch import fx

from graphopt.pruning.groups import blocking_summary  # noqa: F401  (re-exported)
from graphopt.pruning.channels import (DEPTHWISE, EMBED, HEADS, IN, MEAN, NORM, OUT, PARAM, SHAPE_ARG, SIZE_READ,
                                       SLICE, SPLIT,
                               ChannelGroup, ChannelPlan, channel_groups)
from graphopt.budget import Budget, Step, allocate, give_back, least
from graphopt.cost import Cost, CostModel, Resize
from graphopt.modules import PrunedLayerNorm, PrunedMultiheadAttention
from graphopt.errors import ConfigError, GraphoptError
from graphopt.ir import Graph
from graphopt.layer_selection import LayerPatterns, LayerSelection, is_table
from graphopt.options import Count, Options, Renamed, Share, Sparsity
from graphopt.pass_base import Contract, Pass, PassContext, PassResult, register_pass
from graphopt.passes.pruning_importance import Importance, ImportanceSpec, make_importance
from graphopt.pruning.slicing import apply_cuts, resize_group_norm, split_sizes


class NothingToPrune(GraphoptError):
    """Every channel group of the model is blocked (the reasons are in the message)."""


@dataclass
class PruneChoice:
    """What one planning step decided: channels to remove per group."""

    plan: ChannelPlan
    removed: dict[int, list[int]] = field(default_factory=dict)
    estimate: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        prunable = self.plan.prunable
        return {"groups": len(self.plan.groups), "prunable": len(prunable), "blocked": len(self.plan.blocked),
                "channels": sum(g.size for g in prunable),
                "removed": sum(len(v) for v in self.removed.values())}


@register_pass("prune_channels")
class PruneChannels(Pass):
    """Remove whole channels (conv filters, linear features) across dependency groups; weights shrink.

    Options:
        ratio: share of each group's channels removed (scope = "global": of all channels, ranked together)
        target_macs: prune until the estimated MACs are this share of the original's (searched)
        target_params: prune until the estimated parameters are this share of the original's (searched)
        importance: how channels are ranked (taylor needs train_data; an Importance object: your own criterion)
        scope: uniform: each group loses the same share (the nearest whole count: 3 heads at 0.3 lose one); global: channels ranked across groups
        max_ratio: no group loses more than this share of its channels
        round_to: keep a multiple of this many channels per group (hardware-friendly widths)
        layers: layers whose channels may be removed (module name patterns; default: all); a group is pruned
            only if every layer producing its channels is chosen
        exclude: layers whose channels are never removed (module name patterns)
        overrides: per-layer ratio, module name -> share removed from that layer's group
        steps: prune in this many rounds (importance recomputed between rounds)
        layer_norm_stats: what a pruned LayerNorm's mean and variance run over. all: every channel it
            was traced with, the removed ones counted as zeros (a PrunedLayerNorm: the masked
            original exactly, but unfused: ConvNeXt-T at half its MACs runs 1.74x instead of 1.86x in
            eager at batch 1); kept: the channels kept (a plain nn.LayerNorm, as Torch-Pruning leaves
            it, its weight scaled by sqrt(traced / kept) and its eps by traced / kept so the output
            keeps its scale; exact against the masked original whose LayerNorms compute the same)
    """

    contract = Contract.EXACT  # against the masked original (see PassResult.reference)

    class Rules(Options):
        """Exactly one of ratio, target_macs and target_params."""

        renamed = {"protected": "exclude", "layers": Renamed("overrides", when=is_table, spelling="as a table")}

        @model_validator(mode="after")
        def _one_budget(self):
            chosen = [n for n in ("ratio", "target_macs", "target_params") if getattr(self, n) is not None]
            if len(chosen) != 1:
                raise ValueError("give exactly one of ratio, target_macs, target_params"
                                 + (f" (got {', '.join(chosen)})" if chosen else ""))
            return self

    def __init__(self, ratio: Sparsity | None = None, target_macs: Share | None = None,
                 target_params: Share | None = None, importance: ImportanceSpec = "l2",
                 scope: Literal["uniform", "global"] = "uniform", max_ratio: Sparsity = 0.9, round_to: Count = 1,
                 layers: LayerPatterns | None = None, exclude: LayerPatterns | None = None,
                 overrides: dict[str, Sparsity] | None = None, steps: Count = 1,
                 layer_norm_stats: Literal["all", "kept"] = "all"):
        self.ratio, self.target_macs, self.target_params = ratio, target_macs, target_params
        self.layer_norm_stats = layer_norm_stats
        self.scope, self.max_ratio, self.round_to = scope, max_ratio, round_to
        self.selection = LayerSelection.of(layers, exclude)
        self.overrides = dict(overrides or {})
        self.steps = steps
        self.importance: Importance = make_importance(importance)
        self.requires = frozenset({"train_data"}) if self.importance.needs_data else frozenset()

    # -- planning --------------------------------------------------------------------
    def check_names(self, graph: Graph) -> set[str]:
        """The modules whose channels stay (excluded, or not in ``layers``); a pattern or an
        override that names no layer of the model is refused."""
        modules = graph.modules()
        owners = [n for n, m in modules.items() if n and next(m.parameters(recurse=False), None) is not None]
        self.selection.check(owners, "pass 'prune_channels'", "layer")
        for name in self.overrides:
            if name not in modules or name == "":
                layers = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))][:6]
                raise ConfigError(f"prune_channels: layer {name!r} does not exist in the model; "
                                  f"e.g. {', '.join(layers)}")
        return {n for n in modules if n and not self.selection.selects(n)}

    def plan(self, graph: Graph, ctx: PassContext | None = None, ratio: float | None = None,
             goal: float | None = None) -> PruneChoice:
        """Decide what to remove, without changing ``graph``: ``ratio`` of each group's
        channels, or the least pruning whose estimated cost is ``goal`` x the current one
        (default: this pass's own ratio or target)."""
        plan = channel_groups(graph, self.check_names(graph))
        if not plan.groups:
            raise NothingToPrune("nothing prunable: the model has no conv, linear or embedding layer "
                                 "called as a module")
        if not plan.prunable:
            raise NothingToPrune(f"nothing prunable: all {len(plan.groups)} channel groups are blocked; "
                                 f"{blocking_summary(plan.blocked)}")
        if self.importance.needs_data:
            data = (ctx.data if ctx else {}).get("train_data")
            if data is None:
                raise ConfigError(f"prune_channels: importance {self.importance.name!r} needs train_data")
            self.importance.prepare(graph, data)
        scores = {g.id: self.importance.scores(graph, g).float() for g in plan.prunable}
        estimator = _CostEstimator(graph, plan)
        if ratio is None and goal is None:
            ratio, goal = self.ratio, self.target_macs or self.target_params
        if ratio is not None:
            removed = self.select(plan, scores, ratio)
        else:
            removed = self.search(plan, scores, estimator, self.budget_key, goal)
        return PruneChoice(plan, removed, estimator.estimate(removed))

    @property
    def budget_key(self) -> str:
        return "params" if self.target_params is not None else "macs"

    def group_ratio(self, group: ChannelGroup, ratio: float) -> float:
        for target in group.targets(OUT) + group.targets(EMBED):
            if target in self.overrides:
                return self.overrides[target]
        return ratio

    def keep_count(self, size: int, remove: int, unit: int = 1) -> int:
        """Units kept: at least one, and ``keep * unit`` a multiple of ``round_to``."""
        step = self.round_to // math.gcd(self.round_to, unit)
        keep = max(1, size - remove)
        return min(size, math.ceil(keep / step) * step)

    def select(self, plan: ChannelPlan, scores: dict[int, torch.Tensor], ratio: float) -> dict[int, list[int]]:
        counts: dict[int, int] = {}
        overridden = {g.id for g in plan.prunable if self.group_ratio(g, -1.0) >= 0}
        if self.scope == "uniform":
            for g in plan.prunable:   # the count nearest the share (3 heads at 0.3: one head, not none)
                share = min(self.group_ratio(g, ratio), self.max_ratio)
                counts[g.id] = min(math.floor(g.size * share + 0.5), math.floor(g.size * self.max_ratio))
        else:
            for g in plan.prunable:
                if g.id in overridden:
                    counts[g.id] = int(g.size * self.group_ratio(g, ratio))
            pool = sorted((g for g in plan.prunable if g.id not in overridden), key=lambda g: g.id)
            # one step a channel, scored relative to its group's mean; each group's least
            # important first, at most max_ratio of it; the solver takes the cheapest steps
            steps = []
            for g in pool:
                relative = (scores[g.id] / scores[g.id].mean().clamp_min(1e-12)).tolist()
                order = sorted(range(g.size), key=relative.__getitem__)[:int(g.size * self.max_ratio)]
                steps += [Step(g.id, 1, relative[c], c) for c in order]
            taken, _ = allocate(steps, int(sum(g.size for g in pool) * ratio))
            counts.update({g.id: len(taken.get(g.id, ())) for g in pool})
        removed = {}
        for g in plan.prunable:
            n = g.size - self.keep_count(g.size, counts.get(g.id, 0), g.unit)
            if n > 0:
                removed[g.id] = sorted(torch.argsort(scores[g.id], stable=True)[:n].tolist())
        return removed

    def search(self, plan, scores, estimator, key: str, goal: float) -> dict[int, list[int]]:
        """Smallest ratio whose estimated cost is within ``goal`` x the original (the solver's
        bisection: a group's MACs fall with both its own and its neighbours' cuts, so savings
        do not add up), then channels given back while the budget holds (``fill``)."""
        budget = Budget.of(key, min(goal, 1.0))   # a goal above 1 asks for no cut, as 1 does

        def fits(removed: dict[int, list[int]]) -> bool:
            return budget.fits(estimator.cost(removed), estimator.total)

        best = self.select(plan, scores, self.max_ratio)
        reachable = estimator.estimate(best)[key] / estimator.base[key]
        if reachable > goal + 1e-9:
            raise ConfigError(f"prune_channels: cannot reach {key} <= {goal:.1%} of the original: pruning every "
                              f"prunable group by max_ratio={self.max_ratio} gives {reachable:.1%}")
        best = least(lambda ratio: self.select(plan, scores, ratio), fits, self.max_ratio, best)
        return self.fill(plan, scores, fits, best)

    def fill(self, plan, scores, fits, removed: dict[int, list[int]]) -> dict[int, list[int]]:
        """Give channels back, one rounding step of one group at a time, while the budget holds
        (``fits``). With ``round_to`` a group's width moves in coarse steps, so the ratio alone can
        land well under the goal (MobileNetV2 at round_to 32: 0.45 of the MACs for a 0.5 goal);
        the most important removed block (scores relative to its group's mean) goes back first.
        Groups with a per-layer override keep exactly what was asked of them."""
        groups = {g.id: g for g in plan.prunable if self.group_ratio(g, -1.0) < 0}
        steps = {gid: self.round_to // math.gcd(self.round_to, g.unit) for gid, g in groups.items()}

        def offer(gid: int, channels: list[int]):
            """The group's most important removed channels, one rounding step of them."""
            if gid not in groups or not channels:
                return None
            back = sorted(channels, key=lambda c: float(scores[gid][c]))[-steps[gid]:]
            value = float(scores[gid][back].sum() / scores[gid].mean().clamp_min(1e-12))
            back = set(back)
            return [c for c in channels if c not in back], value

        removed = give_back(removed, offer, fits)
        return {gid: channels for gid, channels in removed.items() if channels}

    # -- applying --------------------------------------------------------------------
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        original = graph.clone()
        start = original.analysis("cost")
        keeps: dict[tuple[str, int], torch.Tensor] = {}
        masked: set[tuple[str, int]] = set()
        norms: dict[str, torch.Tensor] = {}   # LayerNorm -> channels kept, of those traced ("kept" stats)
        summaries = []
        for step in range(1, self.steps + 1):
            if self.ratio is not None:  # each step keeps the same share, compounding to 1 - ratio
                choice = self.plan(graph, ctx, ratio=1 - (1 - self.ratio) ** (1 / self.steps))
            else:  # each step aims at its share of the way to the budget, from where it stands
                key, target = self.budget_key, self.target_macs or self.target_params
                now = getattr(graph.analysis("cost"), key)
                choice = self.plan(graph, ctx, goal=min(1.0, target ** (step / self.steps) * getattr(start, key) / now))
            summaries.append(choice.summary())
            resized: dict[str, set[int]] | None = {} if self.layer_norm_stats == "kept" else None
            for (name, dim), removed in self.apply(graph, choice, masked, resized).items():
                keeps[(name, dim)] = _without(keeps.get((name, dim), original.attr(name).shape[dim]), removed)
            for target, removed in (resized or {}).items():
                width = original.gm.get_submodule(target).normalized_shape[0]
                norms[target] = _without(norms.get(target, width), removed)
        first = summaries[0]
        stats = {"groups": first["groups"], "prunable": first["prunable"], "blocked": first["blocked"],
                 "channels_removed": sum(s["removed"] for s in summaries), "importance": self.importance.name}
        if self.steps > 1:
            stats["steps"] = self.steps
        return PassResult(graph, changed=stats["channels_removed"] > 0, stats=stats,
                          reference=_masked(original, keeps, masked, norms))

    def apply(self, graph: Graph, choice: PruneChoice, masked: set[tuple[str, int]] | None = None,
              resized: dict[str, set[int]] | None = None) -> dict[tuple[str, int], set[int]]:
        """Slice every member of every chosen group; returns the cuts made, by (tensor, axis).
        ``masked`` collects the (tensor, axis) pairs the masked original zeroes at the removed
        positions: every consumer's columns (IN members), and every member of a group a
        LayerNorm or a mean normalises, whose removed channels must be zeros there; ``resized``
        the channels removed from each LayerNorm that now normalises over the kept ones."""
        masked = set() if masked is None else masked
        cuts: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
        literal_edits: dict[tuple[str, int, int, str], int] = defaultdict(int)
        split_edits: dict[tuple[str, int], dict[int, int]] = defaultdict(lambda: defaultdict(int))
        group_norms: dict[str, set[int]] = defaultdict(set)
        layer_norms: dict[str, tuple[int, int, set[int]]] = {}   # target -> (width now, traced width, removed)
        means: dict[str, tuple[int, int]] = {}              # mean node -> (width it averages, removed)
        reads: dict[str, int] = {}                          # width read at run time -> its traced value
        depthwise = set()
        heads_kept: dict[str, int] = {}
        groups = {g.id: g for g in choice.plan.groups}
        modules = graph.modules()
        for gid, channels in choice.removed.items():
            group = groups[gid]
            normalised = any(m.role == MEAN or (m.role == NORM and isinstance(modules.get(m.target), _LAYER_NORMS))
                             for m in group.members)
            for m in group.members:
                positions = {m.offset + c * m.inner + k for c in channels for k in range(m.inner)}
                if m.role in (SHAPE_ARG, SLICE):   # a SLICE member's target names the bound
                    literal_edits[(m.node, m.arg, m.axis, m.target, m.size)] += len(positions)
                    continue
                if m.role == SPLIT:
                    split_edits[(m.node, m.arg)][m.axis] += len(positions)
                    continue
                if m.role == SIZE_READ:
                    reads[m.node] = m.size
                    continue
                if m.role == MEAN:
                    means[m.node] = (m.size, means.get(m.node, (0, 0))[1] + len(positions))
                    continue
                if m.role == NORM and isinstance(modules.get(m.target), nn.GroupNorm):
                    group_norms[m.target] |= positions
                    continue
                norm = modules.get(m.target) if m.role == NORM else None
                if isinstance(norm, _LAYER_NORMS):
                    width = norm.normalized_shape[0]
                    layer_norms.setdefault(m.target, (width, getattr(norm, "count", width), set()))[2].update(positions)
                module_tensors = _tensors_of(graph, m)
                for tensor_name, axis in module_tensors:
                    cuts[tensor_name][axis] |= positions
                if m.role == IN or normalised:
                    masked.update(module_tensors)
                if m.role == DEPTHWISE:
                    depthwise.add(m.target)
                if m.role == HEADS:
                    heads_kept[m.target] = group.size - len(channels)
        apply_cuts(graph, {k: dict(v) for k, v in cuts.items()}, depthwise)
        for target, kept in heads_kept.items():
            graph.replace_module(target, PrunedMultiheadAttention.from_sliced(graph.gm.get_submodule(target), kept))
        for target, positions in group_norms.items():
            resize_group_norm(graph, target, positions)
        for target, (width, count, removed) in layer_norms.items():
            sliced, kept = graph.gm.get_submodule(target), width - len(removed)
            graph.replace_module(target, _kept_stats_norm(sliced, sliced.weight, sliced.bias, kept, width)
                                 if self.layer_norm_stats == "kept" else PrunedLayerNorm.from_sliced(sliced, kept, count))
            if resized is not None:
                resized[target] = removed
        _freeze_reads(graph, reads)
        _rewrite_literals(graph, literal_edits)
        for node_name, (width, removed) in means.items():
            _count_removed_zeros(graph, graph.node(node_name), (width - removed) / width)
        for (node_name, dim), removed in split_edits.items():
            split_sizes(graph.node(node_name), dim, removed)
        graph.commit()
        return {(name, axis): removed for name, axes in cuts.items() for axis, removed in axes.items()}


_LAYER_NORMS = (nn.LayerNorm, PrunedLayerNorm)


def _tensors_of(graph: Graph, m) -> list[tuple[str, int]]:
    """(tensor qualname, axis) pairs a member cuts."""
    if m.role == PARAM:
        return [(m.target, m.axis)]
    if m.tensors:   # named by the rule (a user's layer)
        return [(f"{m.target}.{n}", m.axis) for n in m.tensors]
    module = graph.gm.get_submodule(m.target)
    names = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
    if m.role == IN:
        return [(f"{m.target}.weight", 1)]
    if m.role == HEADS:
        return [(f"{m.target}.{n}", 0) for n in ("in_proj_weight", "in_proj_bias") if names.get(n) is not None]
    if m.role == EMBED:
        return [(f"{m.target}.weight", 1)]
    if m.role in (OUT, DEPTHWISE):
        return [(f"{m.target}.{n}", 0) for n in ("weight", "bias") if names.get(n) is not None]
    if m.role == NORM:
        return [(f"{m.target}.{n}", 0) for n in ("weight", "bias", "running_mean", "running_var")
                if names.get(n) is not None]
    return []


def _freeze_reads(graph: Graph, reads: dict[str, int]) -> None:
    """A width of pruned channels read at run time becomes the width traced: what it sizes
    keeps its meaning, and this group's own reshapes see a literal they rewrite."""
    for name, size in reads.items():
        node = graph.node(name)
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a: size if a is node else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: size if a is node else a)
        graph.gm.graph.erase_node(node)


def _count_removed_zeros(graph: Graph, node: fx.Node, kept_share: float) -> None:
    """A mean over channels some of which are gone, as the mean over all of them with the
    removed ones the zeros they are in the masked original: scaled by the share kept."""
    with graph.gm.graph.inserting_after(node):
        scaled = graph.gm.graph.call_function(operator.mul, (node, kept_share))
    node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)


def _shrunk(literal: Any, removed: int, bound: str, size: int = 0, siblings: Any = ()) -> Any:
    if isinstance(literal, fx.Node):    # a channel count read at run time (see Member.size)
        return -1 if -1 not in siblings else size - removed
    if not bound:                       # a size
        return literal - removed
    fields = {"start": literal.start, "stop": literal.stop, "step": literal.step}
    fields[bound] -= removed            # a slice bound
    return slice(fields["start"], fields["stop"], fields["step"])


def _rewrite_literals(graph: Graph, edits: dict[tuple[str, int, int, str, int], int]) -> None:
    """Shrink the literals pruning depends on: ``node.args[arg]`` itself (element -1) or one
    element of it; a size (``bound`` empty) or a slice's ``start``/``stop``; a size read at run
    time becomes -1 where no other size is -1, else the new size."""
    for (node_name, arg, element, bound, size), removed in edits.items():
        node = graph.node(node_name)
        args = list(node.args)
        if element < 0:
            args[arg] = _shrunk(args[arg], removed, bound, size, args[1:])
        else:
            items = list(args[arg])
            items[element] = _shrunk(items[element], removed, bound, size, items)
            args[arg] = type(args[arg])(items)
        node.args = tuple(args)


def _without(kept: torch.Tensor | int, removed: set[int]) -> torch.Tensor:
    """The original indices ``kept`` (or all ``kept`` of them) less the positions ``removed`` from them."""
    kept = torch.arange(kept) if isinstance(kept, int) else kept
    return kept[[i for i in range(len(kept)) if i not in removed]]


def _kept_stats_norm(norm: nn.Module, weight: torch.Tensor | None, bias: torch.Tensor | None, kept: int,
                     width: int) -> nn.LayerNorm:
    """``norm`` (``width`` channels) as a plain nn.LayerNorm over ``kept`` of them with ``weight`` and
    ``bias`` (already cut to those), its output kept at scale (see PruneChannels' ``layer_norm_stats``)."""
    out = nn.LayerNorm(kept, eps=norm.eps * width / kept, elementwise_affine=weight is not None, bias=bias is not None)
    with torch.no_grad():
        if weight is not None:
            out.weight = nn.Parameter(weight.detach() * math.sqrt(width / kept), requires_grad=weight.requires_grad)
        if bias is not None:
            out.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return out.to(weight.device if weight is not None else "cpu")


class _KeptStatsReference(nn.Module):
    """The masked original's LayerNorm under ``layer_norm_stats="kept"``: the ``keep`` channels
    through the LayerNorm the pruned graph holds, zeros where channels were removed."""

    def __init__(self, norm: nn.Module, keep: torch.Tensor):
        super().__init__()
        self.register_buffer("keep", keep.to(norm.weight.device if norm.weight is not None else "cpu"))
        self.norm = _kept_stats_norm(norm, None if norm.weight is None else norm.weight[self.keep],
                                     None if norm.bias is None else norm.bias[self.keep], len(keep),
                                     norm.normalized_shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x).index_copy(-1, self.keep, self.norm(x.index_select(-1, self.keep)))


def _masked(original: Graph, keeps: dict[tuple[str, int], torch.Tensor], masked: set[tuple[str, int]],
            norms: dict[str, torch.Tensor] | None = None) -> Graph:
    """The original graph (edited in place: the pass's own copy) with the removed positions of
    every ``masked`` tensor zeroed (see ``PruneChannels.apply``), and each LayerNorm of ``norms``
    normalising its kept channels alone: what the pruned graph must compute exactly."""
    with torch.no_grad():
        for (name, dim), keep in keeps.items():
            if (name, dim) in masked:
                tensor = original.attr(name)
                gone = torch.ones(tensor.shape[dim], dtype=torch.bool, device=tensor.device)
                gone[keep] = False
                tensor.index_fill_(dim, gone.nonzero().flatten(), 0)
    for target, keep in (norms or {}).items():   # after the zeroing: these hold the kept weights only
        original.replace_module(target, _KeptStatsReference(original.gm.get_submodule(target), keep))
    return original


class _CostEstimator:
    """MACs and params after a removal choice, without building the pruned graph: each layer's
    share of input and output features kept, priced by the shared cost model."""

    def __init__(self, graph: Graph, plan: ChannelPlan):
        self.graph = graph
        self.plan = plan
        self.model = CostModel(graph)
        self.total = self.model.total
        self.base = self.total._asdict()
        self.modules = self.model.modules

    def changes(self, removed: dict[int, list[int]]) -> dict[str, Resize]:
        """Each layer's shares of features kept under ``removed``."""
        gone: dict[tuple[str, str], int] = defaultdict(int)  # (module, role) -> elements removed on its axis
        for g in self.plan.groups:
            n = len(removed.get(g.id, ()))
            if not n:
                continue
            for m in g.members:
                if m.role in (OUT, IN, DEPTHWISE, NORM, EMBED, HEADS):
                    gone[(m.target, m.role)] += n * m.inner * (1 if m.role != HEADS or m.offset == 0 else 0)
        changes = {}
        for target in dict.fromkeys(t for t, _ in gone):
            module = self.modules.get(target)
            fin, fout = self._fractions(module, target, gone) if module is not None else (1.0, 1.0)
            if not fin == fout == 1.0:
                changes[target] = Resize(fin, fout)
        return changes

    def cost(self, removed: dict[int, list[int]]) -> Cost:
        return self.model.estimate(self.changes(removed))

    def estimate(self, removed: dict[int, list[int]]) -> dict[str, int]:
        return self.cost(removed)._asdict()

    @staticmethod
    def _fractions(module: nn.Module, target: str, gone) -> tuple[float, float]:
        if isinstance(module, nn.MultiheadAttention):  # every term of attention scales with the heads kept
            return 1.0, 1 - gone.get((target, HEADS), 0) / module.embed_dim
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor):
            return 1.0, 1.0
        if (target, DEPTHWISE) in gone or (target, NORM) in gone:
            n = gone.get((target, DEPTHWISE), 0) or gone.get((target, NORM), 0)
            return 1.0, 1 - n / w.shape[0]
        fin = 1 - gone.get((target, IN), 0) / w.shape[1] if w.dim() > 1 else 1.0
        fin -= gone.get((target, EMBED), 0) / w.shape[1] if w.dim() > 1 else 0.0
        fout = 1 - gone.get((target, OUT), 0) / w.shape[0]
        return fin, fout
