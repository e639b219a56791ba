"""Low-rank splitting: replace Linear and Conv2d layers by chains of thinner layers.

Ranks come from one of four rules (the budget vocabulary the pruning pass shares):
``ratio`` (share of the full rank kept), ``energy`` (share of sum(sigma^2) kept),
``target_macs`` / ``target_params`` (share of the whole graph's MACs / parameters to
reach; layers are cut greedily where the reconstruction error grows least per MAC or
parameter saved: the shared solver, graphopt.budget, over the lower convex hull of each
layer's (cost saved, error) candidates, costs from the shared model, graphopt.cost).
``overrides`` sets the rule per layer; ``layers``/``exclude`` choose which layers may be split
(graphopt.layer_selection), and a layer is split only where that lowers its MACs. ``plan`` says
what a run would do, and at what cost, without changing the graph.

With ``data_aware=True`` the Linear and 1x1-conv truncations minimise the error of each
layer's outputs on calibration data (``calibration_data`` in the context, else the held
batch) instead of its weights: the budget then also goes where outputs suffer least.

The split layer becomes an ``nn.Sequential`` under the same name, and the graph calls
its children one after another, so cost analysis, fx, ONNX and TorchScript all see
plain Linear / Conv2d modules.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import annotated_types as at
import torch.nn as nn
from pydantic import AfterValidator, model_validator
from torch import fx

from graphopt.budget import Budget, Option, allocate, lower_hull
from graphopt.cost import Cost, CostModel, Replace
from graphopt.quant.calibration import InputMomentObserver, calibrate
from graphopt.errors import ConfigError
from graphopt.ir import Graph
from graphopt.layer_selection import LayerPatterns, LayerSelection, is_table
from graphopt.options import Count, Expect, Index, Options, Renamed, Share
from graphopt.pass_base import Contract, Pass, PassContext, PassResult, register_pass
from graphopt.passes.low_rank_factors import Candidate, MatrixSVD, Tucker2, reconstruction_error

CONV_METHODS = ("auto", "spatial", "tucker2")
OVERRIDE_KEYS = ("rank", "ratio", "energy", "method")
_BUDGETS = ("ratio", "energy", "target_macs", "target_params")
DEFAULT_ENERGY = 0.95


@dataclass
class Layer:
    """One splittable module: its call sites' sizes and its decompositions by method."""

    name: str
    module: nn.Module
    macs: int
    params: int
    methods: dict[str, Any] = field(default_factory=dict)   # method -> MatrixSVD | Tucker2

    def keep(self) -> Candidate:
        return Candidate("keep", (), self.macs, self.params, 0.0)


@dataclass
class SplitChoice:
    """What planning decided: the splittable layers, the split chosen for some of them, why
    the others stay whole, and the graph's estimated cost after the splits."""

    layers: list[Layer]
    chosen: dict[str, Candidate]
    skipped: dict[str, str]
    estimate: dict[str, int]


def _unit(where: str, value: Any) -> float:
    """A share in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{where} must be a number in (0, 1], got {value!r}")
    return float(value)


def _check_override(name: str, spec: Any) -> dict[str, Any]:
    """An ``overrides`` entry: an int (rank), a float (ratio) or a table of OVERRIDE_KEYS."""
    where = f"pass 'split_low_rank': overrides[{name!r}]"
    if isinstance(spec, bool):
        raise ConfigError(f"{where} must be a rank (int), a ratio (float) or a table, got {spec!r}")
    if isinstance(spec, int):
        spec = {"rank": spec}
    elif isinstance(spec, float):
        spec = {"ratio": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a rank (int), a ratio (float) or a table, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(OVERRIDE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(OVERRIDE_KEYS)}")
    rules = [k for k in ("rank", "ratio", "energy") if k in spec]
    if len(rules) > 1:
        raise ConfigError(f"{where}: give one of rank, ratio, energy, not {' and '.join(rules)}")
    spec = dict(spec)
    if "rank" in spec:
        rank = spec["rank"]
        ranks = tuple(rank) if isinstance(rank, (list, tuple)) else (rank,)
        if not ranks or len(ranks) > 2 or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1
                                                  for r in ranks):
            raise ConfigError(f"{where}: rank must be a positive integer (or [r1, r2] for tucker2), got {rank!r}")
        spec["rank"] = ranks
    for key in ("ratio", "energy"):
        if key in spec:
            spec[key] = _unit(f"{where}.{key}", spec[key])
    method = spec.get("method")
    if method is not None and method not in ("svd",) + CONV_METHODS:
        raise ConfigError(f"{where}: unknown method {method!r}; valid: svd, {', '.join(CONV_METHODS)}")
    return spec


def _check_overrides(table: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``overrides`` option, each entry checked and spelt out as a table (ConfigError naming it)."""
    return {name: _check_override(name, spec) for name, spec in table.items()}


Overrides = Annotated[dict[str, Any], Expect("a table of module name -> rank (int), ratio (float) or a table of "
                                             f"{', '.join(OVERRIDE_KEYS)}"), AfterValidator(_check_overrides)]


@register_pass("split_low_rank")
class SplitLowRank(Pass):
    """Split Linear / Conv2d layers into low-rank chains (truncated SVD, spatial SVD, Tucker-2).

    Options:
        ratio: share of each layer's full rank kept
        energy: share of each layer's sum(sigma^2) kept (the default rule, 0.95)
        target_macs: split until the graph's MACs are this share of the original's (least error per MAC saved)
        target_params: split until the graph's parameters are this share of the original's
        conv_method: how k x k convs split: spatial (kx1 then 1xk), tucker2 (1x1, kxk, 1x1) or auto (the cheaper)
        rank_multiple: ranks are rounded up to a multiple of this
        hooi_iters: HOOI refinement iterations of Tucker-2
        layers: layers that may be split (module name patterns; default: every Linear and Conv2d)
        exclude: layers never split (module name patterns)
        overrides: per-layer settings that replace the rule for those layers (see allowed)
        only_if_cheaper: split a layer only where that lowers its MACs
        max_error: largest relative output error accepted (default: no limit, the error is reported)
        data_aware: truncate to minimise the error of each layer's outputs on calibration data, not of its weights
        calibration_batches: batches read with data_aware
        progress: show a progress bar while reading calibration data
    """

    contract = Contract.BOUNDED

    class Rules(Options):
        """At most one of ratio, energy, target_macs and target_params (none given: energy = 0.95); no
        layer both excluded and given an override."""

        renamed = {"protected": "exclude", "layers": Renamed("overrides", when=is_table, spelling="as a table")}

        @model_validator(mode="after")
        def _one_budget(self):
            given = [k for k in _BUDGETS if getattr(self, k) is not None]
            if len(given) > 1:
                raise ValueError(f"give one of {', '.join(_BUDGETS)}, not {' and '.join(given)}")
            both = sorted(n for n in self.overrides or {} if not LayerSelection.of(exclude=self.exclude).selects(n))
            if both:
                raise ValueError(f"layer {both[0]!r} is both excluded and given an override")
            return self

    def __init__(self, ratio: Share | None = None, energy: Share | None = None, target_macs: Share | None = None,
                 target_params: Share | None = None, conv_method: Literal["auto", "spatial", "tucker2"] = "auto",
                 rank_multiple: Count = 1, hooi_iters: Index = 2, layers: LayerPatterns | None = None,
                 exclude: LayerPatterns | None = None, overrides: Overrides | None = None,
                 only_if_cheaper: bool = True,
                 max_error: Annotated[float, at.Gt(0)] | None = None, data_aware: bool = False,
                 calibration_batches: Count = 8, progress: bool = True):
        given = {k: v for k, v in zip(_BUDGETS, (ratio, energy, target_macs, target_params)) if v is not None}
        self.rule, self.value = next(iter(given.items())) if given else ("energy", DEFAULT_ENERGY)
        self.overrides = dict(overrides or {})
        self.selection = LayerSelection.of(layers, exclude)
        self.data_aware, self.calibration_batches, self.progress = data_aware, calibration_batches, progress
        self.moments: dict[str, Any] = {}
        self.conv_method = conv_method
        self.rank_multiple = rank_multiple
        self.hooi_iters = hooi_iters
        self.only_if_cheaper = only_if_cheaper
        self.bound = max_error
        full = self.rule in ("ratio", "energy") and self.value == 1.0
        if full and all(spec.get("ratio", 1.0) == 1.0 and spec.get("energy", 1.0) == 1.0 and "rank" not in spec
                        for spec in self.overrides.values()):
            self.contract = Contract.EXACT  # every split keeps the full rank

    # -- finding layers -----------------------------------------------------------------
    def _collect(self, graph: Graph, model: CostModel) -> tuple[list[Layer], dict[str, str]]:
        modules = graph.modules()
        for name in self.overrides:
            if name not in modules or name == "":
                close = difflib.get_close_matches(name, [m for m in modules if m], n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ConfigError(f"split_low_rank: overrides names {name!r}, which is not a module of the graph{hint}")
        calls: dict[str, list] = {}
        for node in graph.nodes:
            if node.op == "call_module" and isinstance(modules[node.target], (nn.Linear, nn.modules.conv._ConvNd)):
                calls.setdefault(node.target, []).append(node)
        self.selection.check(list(calls), "pass 'split_low_rank'")
        for name in self.overrides:
            if name not in calls:
                raise ConfigError(f"split_low_rank: overrides[{name!r}] is a {type(modules[name]).__name__}, "
                                  f"not a Linear or Conv2d the graph calls")
        layers, skipped = [], {}
        for name, nodes in calls.items():
            reason = self.selection.reason(name) or self._unsplittable(graph, modules[name], nodes)
            if reason is None:
                layers.append(self._layer(graph, model, name, modules[name], nodes))
                continue
            if name in self.overrides:
                raise ConfigError(f"split_low_rank: overrides[{name!r}] cannot be split: {reason}")
            skipped[name] = reason
        return layers, skipped

    @staticmethod
    def _unsplittable(graph: Graph, module: nn.Module, nodes) -> str | None:
        """Why this Linear or conv cannot be split (None if it can)."""
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            return f"{type(module).__name__} is not supported (Linear and Conv2d only)"
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            if module.groups == module.in_channels:
                return f"depthwise conv (groups={module.groups}): already one filter per channel"
            return f"grouped conv (groups={module.groups}): only groups=1 is split"
        if any(not _static(graph.shape(n)) or not n.args or not _static(graph.shape(n.args[0])) for n in nodes):
            return "no static input/output shape"
        return None

    def _layer(self, graph: Graph, model: CostModel, name: str, module: nn.Module, nodes) -> Layer:
        """The layer's cost (from the cost model) and its decompositions (one per method it may use)."""
        shapes = [(graph.shape(n.args[0]), graph.shape(n)) for n in nodes]
        method = self.overrides.get(name, {}).get("method")
        matrix_like = isinstance(module, nn.Linear) or tuple(module.kernel_size) == (1, 1)
        if method is not None and method != "auto" and (method == "svd") != matrix_like:
            valid = "svd" if matrix_like else "spatial, tucker2"
            raise ConfigError(f"split_low_rank: overrides[{name!r}]: method {method!r} does not apply to a "
                              f"{_describe(module)}; valid: auto, {valid}")
        moment = self._moment(nodes)
        layer = Layer(name, module, *model.layer(name))
        if isinstance(module, nn.Linear):
            rows = [math.prod(out) // module.out_features for _, out in shapes]
            layer.methods["svd"] = MatrixSVD(module, [(r, r) for r in rows], moment)
            return layer
        # per call: output positions, positions of the kh x 1 factor's output, input positions
        sites = [(out[0] * out[2] * out[3], out[0] * out[2] * inp[3], out[0] * inp[2] * inp[3]) for inp, out in shapes]
        if matrix_like:
            layer.methods["svd"] = MatrixSVD(module, [(s[0], s[1]) for s in sites], moment)
            return layer
        method = method or self.conv_method
        if method in ("auto", "spatial"):
            layer.methods["spatial"] = MatrixSVD(module, [(s[0], s[1]) for s in sites])
        if method in ("auto", "tucker2"):
            layer.methods["tucker2"] = Tucker2(module, [(s[0], s[2]) for s in sites])
        return layer

    def _observe_inputs(self, graph: Graph, ctx: PassContext) -> None:
        """``E[x x^T]`` of the input of every Linear / 1x1 conv, for data-aware splitting."""
        observers, modules = {}, graph.modules()
        for node in graph.nodes:
            module = modules.get(node.target) if node.op == "call_module" else None
            matrix_like = isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1
                                                            and tuple(module.kernel_size) == (1, 1))
            if matrix_like and node.args and isinstance(node.args[0], fx.Node):
                observers[node.args[0].name] = InputMomentObserver(-1 if isinstance(module, nn.Linear) else 1)
        data = ctx.data.get("calibration_data") or [graph.example_inputs]
        calibrate(graph, observers, data, self.calibration_batches, self.progress)
        self.moments = {name: obs.moment() for name, obs in observers.items()}

    def _moment(self, nodes) -> Any:
        """The summed input moment over a layer's call sites (None unless data-aware)."""
        if not self.data_aware:
            return None
        moments = [self.moments[n.args[0].name] for n in nodes if n.args[0].name in self.moments]
        return sum(moments) / len(moments) if len(moments) == len(nodes) else None

    # -- choosing ranks -------------------------------------------------------------------
    def _by_rule(self, layer: Layer, rule: str, value: Any) -> Candidate | str:
        """The candidate a per-layer rule picks, or the reason nothing is split."""
        options, problems = [], []
        for deco in layer.methods.values():
            if rule == "rank":   # under "auto" a rank need only fit one of the methods
                problem = deco.check_ranks(value)
                if problem:
                    problems.append(problem)
                else:
                    options.append(deco.candidate(value))
            elif rule == "ratio":
                options.append(deco.candidate(deco.ratio_ranks(value, self.rank_multiple)))
            else:  # energy: the cheapest split that keeps at least this share of sum(sigma^2)
                fits = [c for c in deco.candidates(self.rank_multiple) if c.error <= 1 - value + 1e-12]
                options.append(min(fits, key=lambda c: (c.macs, c.error)))
        if not options:
            raise ConfigError(f"split_low_rank: overrides[{layer.name!r}]: {'; '.join(problems)}")
        cheaper = [c for c in options if c.macs < layer.macs]
        if not cheaper:
            if self.only_if_cheaper:
                best = min(options, key=lambda c: c.macs)
                return (f"{best.method} at rank {_ranks(best.ranks)} would not lower MACs "
                        f"({best.macs} >= {layer.macs})")
            return min(options, key=lambda c: (c.error, c.macs))
        # several methods ("auto"): the one that loses least per MAC it saves
        return min(cheaper, key=lambda c: (c.error / (layer.macs - c.macs), c.macs))

    def _by_budget(self, free: list[Layer], spent: Cost, total: Cost) -> dict[str, Candidate]:
        """Greedy allocation (the shared solver): cut where the error grows least per unit of
        cost saved, along each layer's lower convex hull, until the graph's cost (``spent``
        with the other layers as planned) is at most ``self.value`` of ``total``."""
        budget = Budget.of("macs" if self.rule == "target_macs" else "params", self.value)
        cost_key = budget.key
        steps = []
        for layer in free:
            points = [layer.keep()] + [c for m in layer.methods.values() for c in m.candidates(self.rank_multiple)
                                       if c.macs < layer.macs and c.params <= layer.params]
            start = getattr(layer, cost_key)
            steps += lower_hull(layer.name, [Option(start - getattr(p, cost_key), p.error, p) for p in points])
        taken, need = allocate(steps, budget.short(spent, total))
        if need > 0:
            total = getattr(total, cost_key)
            floor = (self.value * total + need) / total
            raise ConfigError(f"split_low_rank: {self.rule}={self.value:g} cannot be reached: splitting every "
                              f"chosen layer as far as it lowers {cost_key} leaves {floor:.3f} of the "
                              f"original {cost_key}")
        return {name: layer_steps[-1].value for name, layer_steps in taken.items()}

    def plan(self, graph: Graph, ctx: PassContext | None = None) -> SplitChoice:
        """Decide which layers to split and at which ranks, without changing ``graph``; the
        estimate is the graph's cost after those splits, from the shared cost model."""
        if self.data_aware:
            self._observe_inputs(graph, ctx or PassContext())
        model = CostModel(graph)
        layers, skipped = self._collect(graph, model)
        chosen = self._choose(model, layers, skipped)
        estimate = model.estimate({name: Replace(Cost(c.macs, c.params)) for name, c in chosen.items()})
        return SplitChoice(layers, chosen, skipped, estimate._asdict())

    def _choose(self, model: CostModel, layers: list[Layer], skipped: dict[str, str]) -> dict[str, Candidate]:
        chosen: dict[str, Candidate] = {}
        free = []
        for layer in layers:
            spec = self.overrides.get(layer.name)
            if spec is None and self.rule in ("target_macs", "target_params"):
                free.append(layer)
                continue
            rule = next((k for k in ("rank", "ratio", "energy") if k in (spec or {})), None)
            choice = self._by_rule(layer, rule or self.rule, spec[rule] if rule else self.value)
            if isinstance(choice, str):
                skipped[layer.name] = choice
            else:
                chosen[layer.name] = choice
        if free:
            spent = model.estimate({name: Replace(Cost(c.macs, c.params)) for name, c in chosen.items()})
            chosen.update(self._by_budget(free, spent, model.total))
            for layer in free:
                if layer.name not in chosen:
                    skipped[layer.name] = "kept whole by the budget allocation"
        return chosen

    # -- rewriting ------------------------------------------------------------------------
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        planned = self.plan(graph, ctx)
        skipped = planned.skipped
        details = {}
        for layer in planned.layers:
            choice = planned.chosen.get(layer.name)
            if choice is None:
                continue
            factors = layer.methods[choice.method].build(choice.ranks, self.hooi_iters)
            error = reconstruction_error(layer.module, factors)
            _split(graph, layer.name, factors)
            details[layer.name] = {
                "method": choice.method, "rank": _ranks(choice.ranks),
                "full_rank": _ranks(layer.methods[choice.method].full_ranks),
                "error": round(error, 6), **self._output_error(layer, choice), "macs": [layer.macs, choice.macs], "params": [layer.params, choice.params]}
        if details:
            graph.commit()
        stats: dict[str, Any] = {"split": len(details), "skipped": len(skipped)}
        if details:
            before = sum(d["macs"][0] for d in details.values())
            stats["layer_macs_kept"] = round(sum(d["macs"][1] for d in details.values()) / before, 4)
            stats["max_layer_error"] = max(d["error"] for d in details.values())
        stats["layers"] = details
        stats["skipped_layers"] = skipped
        return PassResult(graph, changed=bool(details), stats=stats)


    @staticmethod
    def _output_error(layer: Layer, choice: Candidate) -> dict[str, float]:
        """For a data-aware split, the relative error of the layer's outputs on the calibration data."""
        if getattr(layer.methods[choice.method], "data_aware", False):
            return {"output_error": round(math.sqrt(choice.error), 6)}
        return {}


def _split(graph: Graph, name: str, factors: list[nn.Module]) -> None:
    """Put ``nn.Sequential(*factors)`` at ``name`` and make every call of it a chain of
    calls to the children (``name.0``, ``name.1``, ...)."""
    graph.replace_module(name, nn.Sequential(*factors))
    fx_graph = graph.gm.graph
    for node in graph.users_of_module(name):
        with fx_graph.inserting_before(node):
            value = fx_graph.call_module(f"{name}.0", node.args, node.kwargs)
            for index in range(1, len(factors)):
                value = fx_graph.call_module(f"{name}.{index}", (value,))
        graph.bypass(node, value)


def _ranks(ranks: tuple[int, ...]) -> int | list[int]:
    return ranks[0] if len(ranks) == 1 else list(ranks)


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "Linear"
    return f"{'x'.join(map(str, module.kernel_size))} {type(module).__name__}"


def _static(shape) -> bool:
    return isinstance(shape, tuple) and bool(shape) and all(isinstance(d, int) for d in shape)
