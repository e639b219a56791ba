"""Users teach graphopt their own layers and ops without editing it: op kinds, channel rules."""
import re

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.passes import PruneChannels
from graphopt.pruning import NORM, ChannelRuleError, channel_groups, channel_rule, strict_rules
from graphopt.pruning.rules import set_strict
from test_readme import python_blocks


def _readme_layer_scope():
    scope = {}
    exec(next(b for b in python_blocks() if "channel_rule" in b), scope)
    return scope


def test_readme_custom_layer_rule_prunes_through_the_users_layer():
    scope = _readme_layer_scope()
    pruned = scope["result"].graph
    assert tuple(pruned.gm.get_submodule("1").scale.shape) == (8,)
    assert pruned.gm.get_submodule("0").out_channels == 8
    assert pruned.gm.get_submodule("3").in_channels == 8
    assert [n.op for n in pruned.nodes].count("call_module") == 4        # the layer stayed one node
    # the kept channels' scales are the original ones, in order
    original = scope["model"][1].scale.detach()
    kept = pruned.gm.get_submodule("1").scale.detach()
    assert all(bool((original == v).any()) for v in kept)
    assert scope["result"].records[-1].contract_error <= 1e-5


def test_the_users_layer_does_not_trace_without_its_registration():
    class Gate(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(graphopt.TraceError, match="Gate"):
        graphopt.trace(nn.Sequential(nn.Conv2d(3, 4, 1), Gate()), torch.randn(1, 3, 4, 4))


def test_a_registered_layer_without_a_rule_blocks_its_groups_by_name():
    class Opaque(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    graphopt.register_op_kind("elementwise", module=Opaque)
    graph = graphopt.trace(nn.Sequential(nn.Conv2d(3, 4, 1), Opaque(), nn.Conv2d(4, 2, 1)), torch.randn(1, 3, 4, 4))
    conv0 = next(g for g in channel_groups(graph).groups if "0" in g.targets("out"))
    assert not conv0.prunable
    assert any(re.search(r"Opaque is not understood by the channel analysis", r) for r in conv0.blocked)


class _Doubler(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


graphopt.register_op_kind("elementwise", module=_Doubler)


@channel_rule(module=_Doubler)
def _broken_rule(analysis, node, module, x):
    raise KeyError("no such axis")


def _doubler_graph():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _Doubler(), nn.Conv2d(4, 2, 1))
    return graphopt.trace(model, torch.randn(1, 3, 4, 4))


def test_a_failing_rule_blocks_with_its_error_when_not_strict():
    set_strict(False)
    try:
        plan = channel_groups(_doubler_graph())
    finally:
        set_strict(True)
    conv0 = next(g for g in plan.groups if "0" in g.targets("out"))
    assert any("analysis failed (KeyError" in r for r in conv0.blocked)


def test_a_failing_rule_raises_naming_node_and_rule_in_strict_mode():
    with strict_rules(), pytest.raises(ChannelRuleError, match=r"_broken_rule failed on node '_1'.*KeyError"):
        channel_groups(_doubler_graph())


def test_a_second_rule_for_the_same_key_is_refused():
    # the one registry behaviour (graphopt.registry): a ConfigError naming the key and the owner
    with pytest.raises(graphopt.ConfigError, match="channel rule for module type _Doubler is already registered: "
                                                   r"test_extension_points\._broken_rule"):
        @channel_rule(module=_Doubler)
        def another(analysis, node, module, x):
            return x
    with pytest.raises(graphopt.GraphoptError, match="one of module=, op= or kind="):
        channel_rule(module=_Doubler, op="add")


def test_an_op_kind_cannot_change_once_registered():
    with pytest.raises(graphopt.GraphoptError, match="already of kind 'elementwise', not 'conv'"):
        graphopt.register_op_kind("conv", module=_Doubler)
    with pytest.raises(graphopt.GraphoptError, match="nn.Module classes"):
        graphopt.register_op_kind("conv", module=int)


def channel_shuffle_free(x):          # a user's own op (module level, as torch.fx wraps it): keeps channels
    return torch.tanh(x)


def test_an_op_rule_by_name_serves_a_users_function():
    calls = []
    graphopt.register_op_kind("unknown", function=channel_shuffle_free)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.b(channel_shuffle_free(self.a(x)))

    graph = graphopt.trace(Net(), torch.randn(1, 3, 4, 4))
    assert not next(g for g in channel_groups(graph).groups if "a" in g.targets("out")).prunable

    @channel_rule(op="channel_shuffle_free")
    def keeps_channels(analysis, node):
        calls.append(node.name)
        return analysis.get(node.args[0])

    graph = graphopt.trace(Net(), torch.randn(1, 3, 4, 4))
    assert next(g for g in channel_groups(graph).groups if "a" in g.targets("out")).prunable
    result = graphopt.PassManager([PruneChannels(ratio=0.5)]).run(graph)
    assert result.graph.gm.a.out_channels == 3 and calls


def test_a_users_layer_exports_to_int8_onnx_through_its_lowering_rule(tmp_path):
    import numpy as np

    from graphopt.backends import onnx_int8
    from graphopt.passes import FoldQDQ, InsertQDQ

    scope = _readme_layer_scope()
    SoftClip = scope["SoftClip"]
    model = nn.Sequential(nn.Conv2d(3, 16, 3), SoftClip(16), nn.ReLU(), nn.Conv2d(16, 8, 3))
    data = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    graph = graphopt.trace(model, data[0])
    ctx = graphopt.PassContext({"calibration_data": data})
    quantized = graphopt.PassManager([InsertQDQ(), FoldQDQ()], context=ctx).run(graph).graph
    with pytest.raises(graphopt.ExportError, match=r"no ONNX lowering for node '_1'"):
        onnx_int8.export(quantized, str(tmp_path / "refused.onnx"), lowering="direct")

    @onnx_int8.int8_lowering(module=SoftClip)
    def soft_clip_onnx(lowering, node, module):
        scale = lowering.const("scale", module.scale.detach().reshape(1, -1, 1, 1).numpy())
        y = lowering.emit("Mul", [lowering.as_float(node.args[0]), scale], "soft_clip")
        bounds = [lowering.const(s, np.array(v, np.float32)) for s, v in (("lo", -6.0), ("hi", 6.0))]
        return lowering.emit("Clip", [y, *bounds], "clip")

    report = onnx_int8.export(quantized, str(tmp_path / "m.onnx"), lowering="direct")
    assert report.max_abs_error < 0.05 * float(quantized.run(data[0]).abs().max())
    assert report.details["int8_layers"]
    import onnx
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "Mul" in ops and "Clip" in ops and "QLinearConv" in ops, ops
    with pytest.raises(graphopt.ConfigError, match="already registered"):
        onnx_int8.int8_lowering(module=SoftClip)(lambda lowering, node, module: "")
