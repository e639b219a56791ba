"""Typed options: the model generated for each pass and backend, its messages, the option reference
the command line prints, the deprecated names of the layer vocabulary, and the one registry
behaviour every extension point shares."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import graphopt
from graphopt import ConfigError, PassManager
from graphopt.analysis import ANALYSES, register_analysis
from graphopt.app.pipeline import load_pipeline
from graphopt.backend import options_model
from graphopt.options import option_reference
from graphopt.pass_base import Pass, register_pass
from graphopt.passes import Binarize, InsertQDQ, PruneChannels, SplitLowRank
from graphopt.passes.pruning_importance import CRITERIA, L2, register_importance
from graphopt.quant.calibration import OBSERVERS, Observer, make_observer, register_observer
from graphopt.registry import Registry
from graphopt.tools.cli import main as cli_main
from graphopt.tools.digits import CHECKPOINT, DigitsCNN


def _row(model, name):
    return next(r for r in option_reference(model) if r.name == name)


# -- the generated model -------------------------------------------------------------------------------
def test_the_model_has_one_field_per_option_with_its_default():
    model = PruneChannels.options_model()
    assert list(model.model_fields) == ["ratio", "target_macs", "target_params", "importance", "scope", "max_ratio",
                                        "round_to", "layers", "exclude", "overrides", "steps", "layer_norm_stats"]
    assert model.model_fields["max_ratio"].default == 0.9
    assert PruneChannels.options_model() is model   # built once per class
    assert list(options_model("onnx").model_fields) == ["opset", "simplify", "tolerance", "dynamic_batch"]


@pytest.mark.parametrize("options, message", [
    ({"ratio": "0.3"}, "option 'ratio' must be float or None, got str '0.3'"),           # no str -> number
    ({"ratio": True}, "option 'ratio' must be float or None, got bool True"),             # no bool -> number
    ({"ratio": math.nan}, "option 'ratio' must be a number, not NaN, got float nan"),
    ({"ratio": 0.3, "round_to": 2.0}, "option 'round_to' must be int, got float 2.0"),
    ({"ratio": 0.3, "max_ratio": math.inf}, "option 'max_ratio' must be a finite float >= 0 and < 1, got float inf"),
    ({"ratio": 0.3, "layers": "conv*"}, r"option 'layers' must be list[str] or None, got str 'conv*' (write ['conv*'])"),
    ({"ratio": 0.3, "overrides": {"a": 2.0}}, "option 'overrides' must be a table of float values or None"),
    ({"ratio": 0.3, "scop": "global"}, "unknown option 'scop'; valid options: ratio, target_macs, target_params, "
                                       "importance, scope, max_ratio, round_to, layers, exclude, overrides, steps, "
                                       "layer_norm_stats (did you mean 'scope'?)"),
    ({"ratio": 0.3, "layer_norm_stats": "some"}, "option 'layer_norm_stats' must be one of all, kept, got str 'some'"),
    ({"ratio": 0.3, "target_params": 0.5}, "pass 'prune_channels': give exactly one of ratio, target_macs, "
                                           "target_params (got ratio, target_params)"),
])
def test_values_are_checked_strictly_and_named(options, message):
    with pytest.raises(ConfigError) as info:
        PruneChannels(**options)
    assert str(info.value).startswith("pass 'prune_channels': ") and message in str(info.value)


def test_checked_values_reach_the_pass():
    pruner = PruneChannels(0.25, layers=("features.*",), overrides={"features.0": 0})   # positional, tuple, int
    assert pruner.ratio == 0.25 and pruner.selection.layers == ("features.*",)
    assert pruner.overrides == {"features.0": 0.0} and isinstance(pruner.overrides["features.0"], float)
    with pytest.raises(ConfigError, match="pass 'prune_channels': option 'ratio' given twice"):
        PruneChannels(0.25, ratio=0.5)


def test_a_custom_pass_gets_the_same_checks():
    @register_pass("test_options_custom")
    class Custom(Pass):
        def __init__(self, factor: float = 1.0, names: list[str] | None = None):
            self.factor, self.names = factor, names

    assert Custom(factor=2).factor == 2.0 and Custom(names=("a",)).names == ["a"]
    with pytest.raises(ConfigError, match="pass 'test_options_custom': option 'factor' must be float, got str 'x'"):
        Custom(factor="x")
    assert [r.name for r in option_reference(Custom.options_model())] == ["factor", "names"]


def test_observers_options_are_typed_too():
    assert make_observer("percentile", percentile=99.0).percentile == 99.0
    with pytest.raises(ConfigError, match="observer 'percentile': option 'bins' must be an int >= 16 and a multiple "
                                          "of 4, got int 18"):
        make_observer("percentile", bins=18)


# -- the option reference -------------------------------------------------------------------------------
def test_the_reference_gives_type_default_range_and_description():
    ratio = _row(PruneChannels.options_model(), "ratio")
    assert (ratio.type, ratio.default, ratio.allowed) == ("float or None", "none", ">= 0 and < 1")
    assert ratio.description.startswith("share of each group's channels removed")
    scope = _row(PruneChannels.options_model(), "scope")
    assert (scope.type, scope.default, scope.allowed) == ("str", '"uniform"', "one of uniform, global")
    observer = _row(InsertQDQ.options_model(), "observer")
    assert observer.allowed == "one of minmax, moving_average, mse, percentile"
    opset = _row(options_model("onnx"), "opset")
    assert (opset.type, opset.default, opset.allowed) == ("int", "18", ">= 17")


def test_every_option_of_every_pass_and_backend_is_described():
    models = [cls.options_model() for cls in graphopt.registered_passes().values() if not cls.__module__.startswith(
        ("test_", "tests."))] + [options_model(name) for name in graphopt.registered_backends()]
    missing = [f"{m.owner}: {r.name}" for m in models for r in option_reference(m) if not r.description]
    assert missing == []


def test_cli_prints_the_reference_of_a_pass_and_a_backend(capsys):
    assert cli_main(["passes", "prune_channels"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("prune_channels: Remove whole channels")
    line = next(line for line in out.splitlines() if line.strip().startswith("ratio "))
    assert line.split() == ["ratio", "float", "or", "None", "none", ">=", "0", "and", "<", "1"]
    assert "share of each group's channels removed" in out
    assert "rules: Exactly one of ratio, target_macs and target_params." in out
    assert "deprecated (still taken, with a warning): protected -> exclude; layers as a table -> overrides" in out
    assert cli_main(["backends", "onnx_int8"]) == 0
    out = capsys.readouterr().out
    assert "form" in out and "one of auto, qoperator, qdq, tune" in out
    assert cli_main(["passes", "fold_batchnrom"]) == 2
    assert "unknown pass 'fold_batchnrom'; registered passes: adaround, bias_correction" in capsys.readouterr().err


# -- one vocabulary for which layers ----------------------------------------------------------------------------
@pytest.mark.parametrize("make, old, new, check", [
    (lambda: Binarize(include=["features.*"]), "include", "layers", lambda p: p.selection.layers == ("features.*",)),
    (lambda: InsertQDQ(keep_float=["conv1"]), "keep_float", "exclude", lambda p: p.selection.exclude == ("conv1",)),
    (lambda: PruneChannels(ratio=0.3, protected=["c1"]), "protected", "exclude",
     lambda p: p.selection.exclude == ("c1",)),
    (lambda: PruneChannels(ratio=0.3, layers={"c1": 0.5}), "layers' as a table", "overrides",
     lambda p: p.overrides == {"c1": 0.5} and p.selection.layers is None),
    (lambda: SplitLowRank(protected=["fc1"]), "protected", "exclude", lambda p: p.selection.exclude == ("fc1",)),
    (lambda: SplitLowRank(layers={"fc1": 4}), "layers' as a table", "overrides",
     lambda p: p.overrides == {"fc1": {"rank": (4,)}}),
])
def test_old_names_still_work_and_warn_naming_the_new_one(make, old, new, check):
    with pytest.warns(DeprecationWarning, match=f"option '{old}'? is deprecated; write '{new}'") as record:
        made = make()
    assert check(made)
    assert record[0].filename == __file__   # attributed to the caller's line


def test_an_old_and_a_new_name_together_are_refused():
    with pytest.raises(ConfigError, match="pass 'binarize': give layers, not both layers and include"):
        Binarize(include=["a"], layers=["b"])


def test_a_pipeline_file_with_an_old_name_loads_and_warns(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(f'[model]\nfactory = "graphopt.tools.digits:DigitsCNN"\ncheckpoint = "{CHECKPOINT}"\n'
                    f'input_shape = [1, 1, 8, 8]\n[[passes]]\nname = "prune_channels"\nratio = 0.25\n'
                    f'protected = ["features.0"]\n')
    with pytest.warns(DeprecationWarning, match="pass 'prune_channels': option 'protected' is deprecated; "
                                                "write 'exclude'"):
        config = load_pipeline(str(path))
    assert config.passes[0].selection.exclude == ("features.0",)


def test_the_cli_shows_the_deprecation(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(f'[model]\nfactory = "graphopt.tools.digits:DigitsCNN"\ncheckpoint = "{CHECKPOINT}"\n'
                    f'input_shape = [1, 1, 8, 8]\n[[passes]]\nname = "binarize"\ninclude = ["features.3"]\n'
                    f'progress = false\nkeep_last = false\n')
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("ignore")   # what Python does outside __main__; the command line shows them
        assert cli_main(["run", str(path), "--quiet"]) == 0
    assert [str(w.message) for w in shown] == ["pass 'binarize': option 'include' is deprecated; write 'layers'"]


def test_layers_and_exclude_choose_the_same_way_in_every_weight_pass():
    graph = graphopt.trace(DigitsCNN().eval(), torch.rand(2, 1, 8, 8))
    for name in ("prune_magnitude", "quantize_weights", "share_weights", "binarize"):
        cls = graphopt.get_pass(name)
        options = {"keep_first": False, "keep_last": False, "progress": False} if name == "binarize" else {}
        result = PassManager([cls(layers=["features.*"], exclude=["features.0"], **options)],
                             verify=False).run(graph.clone())
        stats = result.records[-1].stats
        chosen = stats.get("per_layer") or stats.get("layers")
        assert (list(chosen) if isinstance(chosen, dict) else chosen if isinstance(chosen, list)
                else [None] * chosen) in (["features.3"], [None]), (name, stats)


# -- one registry behaviour --------------------------------------------------------------------------------
def test_a_taken_name_is_refused_naming_its_owner_and_the_same_class_may_register_again():
    with pytest.raises(ConfigError, match="importance criterion name 'l2' is taken by "
                                          "graphopt.passes.pruning_importance.L2"):
        @register_importance("l2")
        class Other(L2):
            pass
    register_importance("l2")(L2)   # a reload: the same qualified name
    with pytest.raises(ConfigError, match="observer name 'mse' is taken by graphopt.quant.calibration.MSEObserver"):
        register_observer("mse")(type("MSEObserver2", (Observer,), {}))
    with pytest.raises(ConfigError, match="analysis name 'shapes' is taken by graphopt.shapes"):
        register_analysis("shapes")(lambda graph: None)


def test_unknown_names_list_the_registered_ones():
    for registry, kind in ((CRITERIA, "importance criterion"), (OBSERVERS, "observer"), (ANALYSES, "analysis")):
        with pytest.raises(ConfigError, match=f"unknown {kind} 'nope'; registered {registry.plural}: "
                                              f"{', '.join(registry.names())}$"):
            registry.get("nope")


def test_a_registered_importance_criterion_is_usable_by_name(monkeypatch):
    monkeypatch.setattr(CRITERIA, "_entries", dict(CRITERIA._entries))

    @register_importance("test_reverse_l2")
    class ReverseL2(L2):
        def scores(self, graph, group):
            return -super().scores(graph, group)

    assert isinstance(PruneChannels(ratio=0.5, importance="test_reverse_l2").importance, ReverseL2)
    assert "test_reverse_l2" in _row(PruneChannels.options_model(), "importance").allowed


def test_plugins_are_loaded_before_a_name_is_looked_up(monkeypatch):
    from graphopt import plugins

    class Entry:
        def load(self):
            registry.add("from_plugin", object)

    registry = Registry("widget")
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [Entry()] if group == "graphopt.plugins" else [])
    assert registry.get("from_plugin") is object
    assert registry.names() == ["from_plugin"]
