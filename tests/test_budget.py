"""The shared cost model (graphopt.cost.CostModel) and budget solver (graphopt.budget):
estimates against the measured cost of the graphs the passes build, and the solver's pieces."""
import pytest
import torch
import torch.nn as nn
import torchvision

import graphopt
from graphopt import ConfigError, PassManager
from graphopt.budget import Budget, Option, Step, allocate, give_back, least, lower_hull
from graphopt.cost import Cost, CostModel, Replace, Resize, chain_cost, product_cost
from graphopt.passes import PruneChannels, SplitLowRank
from graphopt.tools.digits import DigitsCNN

from conftest import randomize_bn
from test_channel_groups import Residual
from test_low_rank import ConvNet


class Block(nn.Module):
    """A transformer encoder block: attention (4 heads) and a feed-forward, residuals, a norm."""

    def __init__(self, d=32, heads=4, ff=64):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.attn(x, x, x)[0]
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


def measured(graph) -> dict:
    cost = graph.analysis("cost")
    return {"macs": cost.macs, "params": cost.params}


def pruned_estimate_and_cost(model, x, **options):
    graph = graphopt.trace(model.eval(), x)
    pruner = PruneChannels(**options)
    choice = pruner.plan(graph)
    pruner.apply(graph, choice)
    return choice.estimate, measured(graph)


def split_estimate_and_cost(model, x, **options):
    graph = graphopt.trace(model.eval(), x)
    splitter = SplitLowRank(progress=False, **options)
    estimate = splitter.plan(graph).estimate
    result = PassManager([splitter]).run(graph)
    assert result.records[1].changed
    return estimate, measured(result.graph)


# -- the cost model against the graphs the passes build ---------------------------------
PRUNE_CASES = [
    ("residual", lambda: randomize_bn(Residual()), torch.randn(2, 3, 6, 6)),
    ("digits", lambda: randomize_bn(DigitsCNN()), torch.randn(2, 1, 8, 8)),
    ("block", Block, torch.randn(2, 5, 32)),
]


@pytest.mark.parametrize("options", [{"ratio": 0.5}, {"target_macs": 0.5}, {"target_params": 0.6, "scope": "global"},
                                     {"target_macs": 0.4, "scope": "global", "max_ratio": 0.8, "round_to": 2}])
@pytest.mark.parametrize("name, make, x", PRUNE_CASES, ids=[c[0] for c in PRUNE_CASES])
def test_pruning_estimate_is_the_measured_cost(name, make, x, options):
    estimate, cost = pruned_estimate_and_cost(make(), x, **options)
    assert estimate == cost
    assert cost["macs"] < graphopt.trace(make().eval(), x).analysis("cost").macs


def test_pruning_estimate_is_the_measured_cost_on_resnet18():
    model = randomize_bn(torchvision.models.resnet18(weights=None))
    estimate, cost = pruned_estimate_and_cost(model, torch.randn(1, 3, 32, 32), target_macs=0.5, round_to=8,
                                              scope="global")
    assert estimate == cost


SPLIT_CASES = [
    ("convnet", ConvNet, torch.randn(2, 3, 12, 12), {"target_macs": 0.6}),
    ("convnet_tucker2", ConvNet, torch.randn(2, 3, 12, 12), {"ratio": 0.5, "conv_method": "tucker2"}),
    ("digits", lambda: randomize_bn(DigitsCNN()), torch.randn(2, 1, 8, 8), {"target_params": 0.5}),
    ("block", Block, torch.randn(2, 5, 32), {"target_macs": 0.6}),
]


@pytest.mark.parametrize("name, make, x, options", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_low_rank_estimate_is_the_measured_cost(name, make, x, options):
    estimate, cost = split_estimate_and_cost(make(), x, **options)
    assert estimate == cost


def test_low_rank_estimate_is_the_measured_cost_on_resnet18():
    model = randomize_bn(torchvision.models.resnet18(weights=None))
    estimate, cost = split_estimate_and_cost(model, torch.randn(1, 3, 32, 32), target_macs=0.7, rank_multiple=16,
                                             conv_method="spatial")
    assert estimate == cost


def test_pruning_and_low_rank_price_the_same_graph_with_one_model():
    graph = graphopt.trace(ConvNet().eval(), torch.randn(2, 3, 12, 12))
    cost = graph.analysis("cost")
    total = CostModel(graph).total
    assert total == Cost(cost.macs, cost.params)
    untouched = {"macs": cost.macs, "params": cost.params}
    assert PruneChannels(ratio=0.0).plan(graph).estimate == untouched
    kept = SplitLowRank(ratio=1.0).plan(graph)   # at full rank no split is cheaper
    assert kept.chosen == {} and kept.estimate == untouched
    # one layer, priced both ways: fc1 (32 -> 48, 2 rows) losing half its outputs, or split at rank 8
    model = CostModel(graph)
    halved = model.estimate({"fc1": Resize(keep_out=0.5)})
    assert halved == Cost(cost.macs - 2 * 32 * 24, cost.params - 32 * 24 - 24)
    split = model.estimate({"fc1": Replace(chain_cost([(2, 32, 8), (2, 8, 48)], bias=48))})
    assert split == Cost(cost.macs - 2 * 32 * 48 + 2 * 8 * 80, cost.params - 32 * 48 + 8 * 80)
    # what the passes estimate for those changes is what the model says
    planned = SplitLowRank(layers={"fc1": 8}, protected=["stem", "body", "point", "fc2"]).plan(graph)
    assert set(planned.chosen) == {"fc1"} and planned.estimate == split._asdict()


def test_one_budget_spread_over_pruning_and_low_rank():
    prune, factor = Budget(macs=0.5).split(0.6, 0.4)
    assert prune.share * factor.share == pytest.approx(0.5)
    assert prune.options() == {"target_macs": 0.5 ** 0.6}
    model = randomize_bn(Residual())
    graph = graphopt.trace(model.eval(), torch.randn(2, 3, 6, 6))
    result = PassManager([PruneChannels(**prune.options()), SplitLowRank(**factor.options())]).run(graph)
    start, pruned, split = (r.macs for r in result.records)
    assert pruned <= prune.share * start and split <= factor.share * pruned
    assert split <= 0.5 * start


def test_layer_costs_come_from_the_cost_analysis():
    graph = graphopt.trace(ConvNet().eval(), torch.randn(2, 3, 12, 12))
    model = CostModel(graph)
    cost = graph.analysis("cost")
    assert model.layer("stem") == Cost(cost.nodes["stem"].macs, 24 * 3 * 9 + 24)
    # the analysis' count of a conv node is one dense product: positions x fan_in x fan_out
    assert product_cost(2 * 12 * 12, 3 * 9, 24, bias=24) == model.layer("stem")
    assert product_cost(2 * 6 * 5, 32 // 4 * 9, 32, bias=32) == model.layer("grouped")   # after body's stride 2


# -- the solver --------------------------------------------------------------------------
def test_lower_hull_keeps_the_convex_options_and_gives_their_steps():
    options = [Option(0, 0.0, "keep"), Option(2, 0.1, "a"), Option(4, 0.4, "b"), Option(3, 0.5, "worse"),
               Option(6, 0.5, "c"), Option(6, 0.9, "same saving, more loss"), Option(-1, 0.0, "costs more")]
    steps = lower_hull("layer", options)
    # (4, 0.4) lies above the chord from (2, 0.1) to (6, 0.5): dropped
    assert [(s.saving, round(s.loss, 9), s.value) for s in steps] == [(2, 0.1, "a"), (4, 0.4, "c")]
    assert [s.rate for s in steps] == pytest.approx([0.05, 0.1])


def test_allocate_takes_the_least_loss_per_saving_until_the_need_is_met():
    steps = [Step("a", 10, 1.0, "a1"), Step("a", 10, 3.0, "a2"), Step("b", 5, 0.25, "b1"), Step("b", 20, 4.0, "b2")]
    taken, left = allocate(steps, 15)   # rates: b1 0.05, a1 0.1, b2 0.2, a2 0.3
    assert {k: [s.value for s in v] for k, v in taken.items()} == {"b": ["b1"], "a": ["a1"]} and left == 0
    taken, left = allocate(steps, 16)   # one more unit: the next step in line, whole
    assert {k: [s.value for s in v] for k, v in taken.items()} == {"b": ["b1", "b2"], "a": ["a1"]} and left == -19
    taken, left = allocate(steps, 100)
    assert left == 55 and sum(len(v) for v in taken.values()) == 4   # short of the need
    ties = [Step("x", 1, 0.5, 0), Step("y", 2, 1.0, 0), Step("z", 1, 0.5, 0)]
    assert list(allocate(ties, 3)[0]) == ["y", "x"]   # equal rates: the larger saving, then the order given


def test_least_finds_the_smallest_setting_that_fits():
    assert least(lambda r: int(r * 100), lambda n: n >= 37, hi=0.9) == 37
    assert least(lambda r: r, lambda r: True, hi=0.5) == pytest.approx(0.0, abs=1e-8)


def test_give_back_returns_the_most_valuable_cuts_while_the_budget_holds():
    values = {"a": 1.0, "b": 2.0}   # what a unit given back is worth; c offers nothing

    def offer(item, cut):
        return (cut - 1, values[item]) if cut and item in values else None

    taken = {"a": 3, "b": 3, "c": 1}   # units cut
    # at least 6 cut: b's unit (worth more) goes back first; then a's would break the budget
    assert give_back(taken, offer, lambda t: sum(t.values()) >= 6) == {"a": 3, "b": 2, "c": 1}
    # at least 4 cut: round one returns a unit of each; round two b's (tried first), then a's breaks it
    assert give_back(taken, offer, lambda t: sum(t.values()) >= 4) == {"a": 2, "b": 1, "c": 1}
    assert give_back(taken, offer, lambda t: True) == {"a": 0, "b": 0, "c": 1}


# -- the budget ----------------------------------------------------------------------------
def test_budget_values_and_errors():
    budget = Budget(params=0.25)
    assert (budget.key, budget.share, budget.options()) == ("params", 0.25, {"target_params": 0.25})
    assert Budget.of("macs", 0.5) == Budget(macs=0.5)
    base = Cost(1000, 400)
    assert budget.fits(Cost(0, 100), base) and not budget.fits(Cost(0, 101), base)
    assert budget.short(Cost(0, 160), base) == 60
    for kwargs, message in (({}, "give exactly one of macs, params"),
                            ({"macs": 0.5, "params": 0.5}, r"give exactly one of macs, params \(got macs, params\)"),
                            ({"macs": 0.0}, r"macs must be a share in \(0, 1\], got 0.0"),
                            ({"params": 2}, r"params must be a share in \(0, 1\], got 2"),
                            ({"macs": True}, "got True")):
        with pytest.raises(ConfigError, match=message):
            Budget(**kwargs)
    with pytest.raises(ConfigError, match="cost must be one of macs, params, got 'latency'"):
        Budget.of("latency", 0.5)
    with pytest.raises(ConfigError, match="weights must be non-negative"):
        Budget(macs=0.5).split(0, 0)
    assert [b.share for b in Budget(macs=0.25).split(1, 1)] == pytest.approx([0.5, 0.5])
    assert Budget(macs=0.25).split(1, 0)[1].share == 1.0
