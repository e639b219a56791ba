import json
import os
from collections import OrderedDict

import pytest
import torch

import graphopt
from graphopt import (Contract, ContractViolation, GraphLintError, Pass, PassContext, PassFailed, PassManager,
                      PassResult, RequirementError, register_pass)
from graphopt.passes import EliminateDeadCode, FoldBatchNorm, RemoveIdentity
from graphopt.tools.cli import main as cli_main

from conftest import digits_pipeline


@register_pass("test_scale_second_conv")
class ScaleSecondConv(Pass):
    """Claims to be exact but scales one conv's weights: the contract check must catch it."""

    contract = Contract.EXACT

    def __init__(self, factor: float = 1.5):
        self.factor = factor

    def run(self, graph, ctx):
        with torch.no_grad():
            graph.gm.get_submodule("features.3").weight.mul_(self.factor)
        return PassResult(graph, changed=True)


@register_pass("test_needs_calibration")
class NeedsCalibration(Pass):
    """Needs a calibration loader."""

    requires = frozenset({"calibration_data"})
    runs = 0

    def run(self, graph, ctx):
        NeedsCalibration.runs += 1
        assert ctx.data["calibration_data"] == "loader"
        return PassResult(graph, changed=False)


@register_pass("test_needs_folded")
class NeedsFolded(Pass):
    """Needs BatchNorm folded first."""

    requires = frozenset({"folded_norms"})

    def run(self, graph, ctx):
        return PassResult(graph, changed=False)


class Perturb(Pass):
    name = "perturb"
    contract = Contract.BOUNDED

    def __init__(self, bound):
        self.bound = bound

    def run(self, graph, ctx):
        with torch.no_grad():
            w = graph.gm.get_submodule("classifier.2").weight
            w.add_(1e-3 * torch.randn_like(w))
        return PassResult(graph, changed=True, stats={"noise": 1e-3})


def test_exact_pipeline_records_every_pass(digits_graph):
    result = PassManager([FoldBatchNorm(), RemoveIdentity(), EliminateDeadCode()]).run(digits_graph)
    names = [r.name for r in result.records]
    assert names == ["input", "fold_batchnorm", "remove_identity", "eliminate_dead_code"]
    fold = result.records[1]
    assert fold.stats == {"folded": 2} and fold.changed
    assert 0 <= fold.max_error <= 1e-5
    # BN weight+bias gone; the bias-free convs gain a bias each
    assert fold.params == result.records[0].params - 2 * (16 + 32) + (16 + 32)
    assert fold.macs == result.records[0].macs
    assert fold.bytes < result.records[0].bytes
    assert result.records[2].stats == {"removed": 1}
    assert "folded_norms" in result.graph.properties
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(result.graph.run(x), digits_graph.run(x), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in result.graph.gm.modules())
    # the input graph is left as it was
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in digits_graph.gm.modules()) == 2


def test_wrong_pass_is_caught_by_exact_contract_naming_pass_and_node(digits_graph):
    before = digits_graph.run()
    with pytest.raises(PassFailed) as info:
        PassManager([FoldBatchNorm(), ScaleSecondConv()]).run(digits_graph)
    failure = info.value
    assert failure.pass_name == "test_scale_second_conv"
    assert failure.node == "features_3"
    assert isinstance(failure.cause, ContractViolation)
    assert failure.cause.error > 1e-5
    assert "test_scale_second_conv" in str(failure) and "features_3" in str(failure)
    # the last good graph is the one after fold_batchnorm, untouched by the bad pass
    assert "folded_norms" in failure.last_good.properties
    torch.testing.assert_close(failure.last_good.run(), before, rtol=1e-5, atol=1e-5)
    assert [r.name for r in failure.records] == ["input", "fold_batchnorm"]


def test_missing_requirement_fails_before_any_pass_runs(digits_graph):
    NeedsCalibration.runs = 0
    with pytest.raises(RequirementError, match="'test_needs_calibration' requires 'calibration_data'"):
        PassManager([FoldBatchNorm(), NeedsCalibration()]).run(digits_graph)
    assert NeedsCalibration.runs == 0
    PassManager([NeedsCalibration()], context=PassContext({"calibration_data": "loader"})).run(digits_graph)
    assert NeedsCalibration.runs == 1


def test_property_requirement_is_met_only_by_an_earlier_pass(digits_graph):
    with pytest.raises(RequirementError, match="folded_norms"):
        PassManager([NeedsFolded(), FoldBatchNorm()]).run(digits_graph)
    PassManager([FoldBatchNorm(), NeedsFolded()]).run(digits_graph)


def test_bounded_contract_measures_and_enforces_bound(digits_graph):
    result = PassManager([Perturb(bound=0.5)]).run(digits_graph)
    err = result.records[1].max_error
    assert 0 < err <= 0.5
    assert result.records[1].contract == "bounded"
    with pytest.raises(PassFailed, match="bounded contract") as info:
        PassManager([Perturb(bound=err / 100)]).run(digits_graph)
    assert info.value.node == "classifier_2"


def test_crashing_pass_is_named_and_keeps_last_good(digits_graph):
    class Crash(Pass):
        name = "crash"

        def run(self, graph, ctx):
            raise ValueError("boom")

    with pytest.raises(PassFailed, match="pass 'crash' failed: ValueError: boom") as info:
        PassManager([Crash()]).run(digits_graph)
    assert info.value.last_good is digits_graph


def test_malformed_graph_is_caught_by_lint(digits_graph):
    class Dangling(Pass):
        name = "dangling"

        def run(self, graph, ctx):
            delattr(graph.gm.get_submodule("classifier"), "2")
            return PassResult(graph, changed=True)

    with pytest.raises(PassFailed) as info:
        PassManager([Dangling()]).run(digits_graph)
    assert isinstance(info.value.cause, GraphLintError)
    assert info.value.node == "classifier_2"


def test_registering_a_non_pass_or_a_taken_name_is_refused():
    with pytest.raises(graphopt.GraphoptError, match="subclass of Pass"):
        register_pass("not_a_pass")(object)
    with pytest.raises(graphopt.GraphoptError, match="taken"):
        @register_pass("fold_batchnorm")
        class Impostor(Pass):
            pass


def test_custom_pass_from_test_file_runs_in_toml_pipeline(tmp_path, capsys):
    @register_pass("test_halve_then_double")
    class HalveThenDouble(Pass):
        """Scales the last layer by 0.5 then its output by 2: exact overall."""

        def __init__(self, layer: str = "classifier.2"):
            self.layer = layer

        def run(self, graph, ctx):
            linear = graph.gm.get_submodule(self.layer)
            with torch.no_grad():
                linear.weight.mul_(0.5)
                linear.bias.mul_(0.5)
            node = next(n for n in graph.nodes if n.op == "call_module" and n.target == self.layer)
            with graph.gm.graph.inserting_after(node):
                doubled = graph.gm.graph.call_function(torch.mul, (node, 2.0))
            node.replace_all_uses_with(doubled, delete_user_cb=lambda user: user is not doubled)
            graph.commit()
            return PassResult(graph, changed=True, stats={"layer": self.layer})

    pipeline = digits_pipeline(tmp_path, """

[[passes]]
name = "test_halve_then_double"
layer = "classifier.2"

[[passes]]
name = "fold_batchnorm"

[report]
json = "report.json"
""", batch=2, name="custom.toml")
    assert cli_main(["run", str(pipeline), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "test_halve_then_double" in out
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {r["name"]: r for r in report["passes"]}
    assert rows["test_halve_then_double"]["stats"] == {"layer": "classifier.2"}
    assert rows["test_halve_then_double"]["max_error"] <= 1e-5
    assert rows["fold_batchnorm"]["stats"]["folded"] == 2


def test_vacuous_verification_is_refused():
    """An empty held batch or a model without tensor outputs would verify any pass with error 0."""
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(graphopt.ConfigError, match="example input 0 is empty"):
        graphopt.trace(Head(), torch.randn(0, 4))
    with pytest.raises(graphopt.ConfigError, match="example input 0 holds NaN"):
        graphopt.trace(Head(), torch.full((2, 4), float("nan")))

    class NoTensor(torch.nn.Module):
        def forward(self, x):
            return None

    graph = graphopt.trace(NoTensor(), torch.randn(2, 4))
    with pytest.raises(graphopt.ConfigError, match="returns no \\(non-empty\\) tensor"):
        graphopt.PassManager([]).run(graph)


def test_python_callers_get_the_same_option_checks_as_pipeline_files():
    from graphopt.passes import FoldQDQ, InsertQDQ

    with pytest.raises(graphopt.ConfigError, match="pass 'fold_qdq': option 'bound' must be float, got str 'x'"):
        FoldQDQ(bound="x")
    with pytest.raises(graphopt.ConfigError, match="pass 'insert_qdq': unknown option 'observr'; valid options: "):
        InsertQDQ(observr="mse")
    assert FoldQDQ(bound=1).bound == 1


class _OffsetThenNorm(torch.nn.Module):
    """A conv whose large bias the BatchNorm subtracts again (running_mean 2000, tiny variance):
    float32 loses ~1e-4 of the output to that cancellation before any pass runs, as deep nets with
    real weights lose ~1e-5."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), \
            torch.nn.Conv2d(16, 4, 1)
        with torch.no_grad():
            self.conv.bias.fill_(2000.0)
            self.bn.running_mean.fill_(2000.0)
            self.bn.running_var.fill_(0.01)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


class _ScaleHead(Pass):
    name = "scale_head"
    contract = Contract.EXACT

    def __init__(self, factor):
        self.factor = factor

    def run(self, graph, ctx):
        with torch.no_grad():
            graph.gm.get_submodule("head").weight.mul_(self.factor)
        return PassResult(graph, changed=True)


def test_exactness_allows_float32_rounding_the_graph_already_had_and_nothing_more():
    graph = graphopt.trace(_OffsetThenNorm().eval(), torch.randn(4, 3, 16, 16))
    result = PassManager([FoldBatchNorm()]).run(graph)
    check = result.records[1].stats["exact_vs_float64"]
    assert check["float32_rounding_before"] > 1e-5          # the old rule (1e-5 vs the float32 run) refused this fold
    assert result.records[1].max_error > 1e-5
    assert check["error"] < check["float32_rounding_before"]  # folded, it is closer to the float64 truth
    # a pass that changes the function is still refused, here and on a well-conditioned graph
    with pytest.raises(PassFailed, match="broke its exact contract"):
        PassManager([FoldBatchNorm(), _ScaleHead(1.001)]).run(graph)
    plain = graphopt.trace(torch.nn.Sequential(OrderedDict(head=torch.nn.Conv2d(3, 4, 3))).eval(),
                           torch.randn(2, 3, 8, 8))
    with pytest.raises(PassFailed, match="broke its exact contract"):
        PassManager([_ScaleHead(1 + 3e-5)]).run(plain)


# -- instruments and preserved analyses ---------------------------------------------------
def _two_layer_graph():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    return graphopt.trace(model, torch.randn(2, 4))


def test_instruments_see_every_pass_in_order_and_the_ir_dump_shows_each_graph(tmp_path):
    from graphopt.instruments import Instrument, IRDump, RecordLog
    from graphopt.passes import EliminateDeadCode, RemoveIdentity

    seen = []

    class Spy(Instrument):
        def run_begin(self, graph, passes):
            seen.append(("begin", len(passes)))

        def before_pass(self, index, p, graph):
            seen.append(("before", index, p.name))

        def after_pass(self, index, p, graph, record):
            seen.append(("after", index, record.name))

        def run_end(self, result):
            seen.append(("end", len(result.records)))

    dump, log = tmp_path / "ir", tmp_path / "records.jsonl"
    PassManager([RemoveIdentity(), EliminateDeadCode()],
                instruments=[Spy(), IRDump(dump), RecordLog(log)]).run(_two_layer_graph())
    assert seen == [("begin", 2), ("before", 0, "remove_identity"), ("after", 0, "remove_identity"),
                    ("before", 1, "eliminate_dead_code"), ("after", 1, "eliminate_dead_code"), ("end", 3)]
    assert sorted(os.listdir(dump)) == ["00_input.py", "01_remove_identity.py", "02_eliminate_dead_code.py"]
    assert "kind=linear shape=(2, 8)" in (dump / "00_input.py").read_text()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["name"] for r in rows] == ["remove_identity", "eliminate_dead_code"]
    with pytest.raises(graphopt.ConfigError, match="not empty"):
        IRDump(dump)


def test_a_failing_pass_is_logged_by_the_record_log(tmp_path):
    from graphopt.instruments import RecordLog

    log = tmp_path / "records.jsonl"
    with pytest.raises(graphopt.PassFailed):
        PassManager([Breaks()], instruments=[RecordLog(log)]).run(_two_layer_graph())
    (row,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert row["name"] == "test_breaks" and "contract" in row["failed"]


@graphopt.register_pass("test_breaks")
class Breaks(graphopt.Pass):
    """Doubles the output while claiming to be exact."""

    def run(self, graph, ctx):
        out = next(n for n in graph.nodes if n.op == "output")
        with graph.gm.graph.inserting_before(out):
            doubled = graph.gm.graph.call_function(torch.mul, (out.args[0], 2.0))
        out.args = (doubled,)
        graph.commit()
        return graphopt.PassResult(graph, changed=True)


def test_only_the_analyses_a_pass_preserves_survive_its_change():
    calls = []

    @graphopt.register_analysis("test_counted")
    def counted(graph):
        calls.append(1)
        return len(calls)

    @graphopt.register_pass("test_value_edit")
    class ValueEdit(graphopt.Pass):
        """Reads an analysis and reports a change (a value-only edit that changes nothing numerically)."""
        preserves = frozenset({"shapes"})

        def run(self, graph, ctx):
            graph.analysis("test_counted")
            return graphopt.PassResult(graph, changed=True)

    graph = _two_layer_graph()
    graph.analysis("test_counted")
    shapes = graph.analysis("shapes")
    result = PassManager([ValueEdit(), ValueEdit()]).run(graph)
    assert result.graph.analysis("shapes") is shapes           # preserved through both passes
    assert result.graph.analysis("test_counted") == 3          # dropped after each change, recomputed after
