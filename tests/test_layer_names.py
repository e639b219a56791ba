"""Every option that names layers refuses a name the model does not have, and a string where a
list is due (one rule for all passes: a misspelt layer is never silently left alone)."""
import pytest
import torch

import graphopt
from graphopt import ConfigError, PassContext, PassFailed, PassManager
from graphopt.training.distill import DistillConfig, distill
from graphopt.passes import InsertQDQ, PruneMagnitude, QuantizeWeights, ShareWeights
from graphopt.tools.digits import DigitsCNN


@pytest.fixture(scope="module")
def graph():
    torch.manual_seed(0)
    return graphopt.trace(DigitsCNN().eval(), torch.rand(2, 1, 8, 8))


def _run(graph, pass_):
    data = [torch.rand(4, 1, 8, 8) for _ in range(2)]
    return PassManager([pass_], context=PassContext({"calibration_data": data})).run(graph.clone())


@pytest.mark.parametrize("make, message", [
    (lambda: InsertQDQ(exclude="conv1"), r"option 'exclude' must be list\[str\] or None, got str 'conv1' \(write \['conv1'\]\)"),
    (lambda: InsertQDQ(keep_float=[3]), r"option 'exclude' \(given as 'keep_float'\) must be list\[str\] or None, "
                                        r"got list \[3\]"),
    (lambda: PruneMagnitude(layers="features.0"), r"option 'layers' must be list\[str\] or None, got str 'features.0' \(write"),
    (lambda: DistillConfig(feature_nodes="relu").check(), r"feature_nodes must be a list of node names, got 'relu'"),
])
def test_a_string_where_a_list_is_due_is_refused(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize("pass_, message", [
    (InsertQDQ(exclude=["conv9"], progress=False), "exclude pattern 'conv9' matches no conv/linear layer or "
                                                   "embedding of the model"),
    (InsertQDQ(layers=["fc*"], progress=False), r"layers pattern 'fc\*' matches no conv/linear layer or embedding"),
    (PruneMagnitude(layers=["conv9*"]), "layers pattern 'conv9\\*' matches no conv/linear layer of the model"),
    (QuantizeWeights(exclude=["fc9"]), "exclude pattern 'fc9' matches no conv/linear layer of the model"),
    (ShareWeights(layers=["nope"]), "layers pattern 'nope' matches no conv/linear layer"),
])
def test_a_layer_name_the_model_does_not_have_is_refused(graph, pass_, message):
    with pytest.raises(PassFailed, match=message) as info:
        _run(graph, pass_)
    assert isinstance(info.value.cause, ConfigError)


def test_names_that_exist_are_used(graph):
    first = next(n for n in graph.nodes if n.op == "call_module" and isinstance(graph.module(n), torch.nn.Conv2d))
    for name in (str(first.target), first.name):   # a module path or a node name
        result = _run(graph, InsertQDQ(exclude=[name], progress=False))
        assert result.records[-1].stats["float_layers"] == {first.name: "kept float (excluded)"}
    others = {n.name for n in graph.nodes if n.op == "call_module" and isinstance(graph.module(n), (torch.nn.Conv2d,
                                                                                               torch.nn.Linear))}
    result = _run(graph, InsertQDQ(layers=[str(first.target)], progress=False))
    assert result.records[-1].stats["float_layers"] == {n: "kept float (not in layers)" for n in others - {first.name}}


def test_distillation_feature_nodes_must_exist(graph):
    with pytest.raises(ConfigError, match="feature_nodes names 'relu9', which is not a node of the student"):
        distill(graph.clone(), graph, [torch.rand(4, 1, 8, 8)], DistillConfig(feature_nodes=("relu9",)),
                progress=False)


@pytest.mark.parametrize("make", [lambda: PruneMagnitude(), lambda: QuantizeWeights(), lambda: ShareWeights(),
                                  lambda: __import__("graphopt.passes", fromlist=["Binarize"]).Binarize()])
def test_nan_weights_are_named_not_compressed(graph, make):
    broken = graph.clone()
    with torch.no_grad():   # every conv: binarize keeps the first (input) layer full precision
        for conv in (m for m in broken.gm.modules() if isinstance(m, torch.nn.Conv2d)):
            conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(PassFailed, match="holds NaN or Inf values") as info:
        PassManager([make()], verify=False).run(broken)
    assert isinstance(info.value.cause, graphopt.DataError)


def test_evaluation_refuses_labels_of_the_wrong_length_and_nan_inputs(graph):
    from graphopt.app.evaluate import top1_accuracy

    x = torch.rand(4, 1, 8, 8)
    assert 0 <= top1_accuracy(graph, [(x, torch.randint(0, 10, (4,)))]) <= 1
    with pytest.raises(graphopt.DataError, match=r"evaluation batch 1: labels of shape \(2,\) for predictions of "
                                                  r"shape \(4,\)"):
        top1_accuracy(graph, [(x, torch.zeros(4, dtype=torch.long)), (x, torch.zeros(2, dtype=torch.long))])
    with pytest.raises(graphopt.DataError, match="evaluation batch 0: input 0 holds NaN"):
        top1_accuracy(graph, [(torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long))])
