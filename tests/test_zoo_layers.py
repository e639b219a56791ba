"""Layers of the models users bring (timm, Hugging Face) that the zoo sweep (benchmarks/zoo_sweep.py)
found graphopt refusing, each on a small model built here: norm + activation layers that call
``F.batch_norm`` themselves, in-place activations in torch.export graphs, TF-style 'same' padding,
in-place ops after quantized tensors in the int8 export's check; decoder attention with rotary
embeddings, grouped-query attention and per-head norms. timm's own layers are tested where timm is
installed (it is a benchmark extra); Hugging Face's where transformers is (requirements-minilm.txt)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt import PassContext, PassManager
from graphopt.backends import onnx_int8
from graphopt.passes import FoldBatchNorm, FoldQDQ, InsertQDQ, PruneChannels
from graphopt.modules import PrunedLayerNorm
from graphopt.pruning.channels import channel_groups

from conftest import randomize_bn


class NormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: a BatchNorm2d subclass whose forward calls F.batch_norm
    on its own statistics, then its activation module (torch.fx traces through it)."""

    def __init__(self, channels: int, inplace: bool = True):
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.SiLU(inplace=inplace)

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return self.act(self.drop(x))


class SamePad(nn.Conv2d):
    """TF 'same' padding as timm's Conv2dSame computes it: pad amounts from the input size at run
    time (torch.fx cannot trace the arithmetic; torch.export records the amounts)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        ph = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class InvertedResidual(nn.Module):
    """conv -> norm-act -> depthwise -> norm-act -> squeeze-excite -> conv -> norm, with a residual."""

    def __init__(self, c: int = 16, same: bool = False):
        super().__init__()
        conv = SamePad if same else nn.Conv2d
        self.stem = conv(3, c, 3, stride=2, padding=0 if same else 1, bias=False)
        self.bn0 = NormAct(c)
        self.pw = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.bn1 = NormAct(2 * c)
        self.dw = conv(2 * c, 2 * c, 3, stride=1, padding=0 if same else 1, groups=2 * c, bias=False)
        self.bn2 = NormAct(2 * c)
        self.se_reduce, self.se_expand = nn.Conv2d(2 * c, 8, 1), nn.Conv2d(8, 2 * c, 1)
        self.pwl = nn.Conv2d(2 * c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.bn0(self.stem(x))
        y = self.bn2(self.dw(self.bn1(self.pw(x))))
        y = y * torch.sigmoid(self.se_expand(F.silu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        x = x + self.bn3(self.pwl(y))
        return self.head(x.mean((2, 3)))


class GQA(nn.Module):
    """Llama/Qwen3-style attention: 4 query heads share 2 key/value heads, rotary embeddings on
    half of each head (rotate_half), an RMS norm per head, then a SiLU-gated MLP."""
    def __init__(self, dim=32, heads=4, kv=2, export=False):
        super().__init__()
        self.heads, self.kv, self.d, self.export = heads, kv, dim // heads, export
        self.q, self.k = nn.Linear(dim, dim, bias=False), nn.Linear(dim, kv * self.d, bias=False)
        self.v, self.o = nn.Linear(dim, kv * self.d, bias=False), nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.Parameter(torch.rand(self.d) + 0.5)
        self.gate, self.up, self.down = nn.Linear(dim, 48, bias=False), nn.Linear(dim, 48, bias=False), nn.Linear(48, dim)

    def rope(self, x, cos, sin):
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def forward(self, x):
        b, t, _ = x.shape
        if self.export and t > 1:
            x = x * 1.0
        q = self.q(x).view(b, t, self.heads, self.d)
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * self.q_norm
        q = q.transpose(1, 2)
        k = self.k(x).view(b, t, self.kv, self.d).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv, self.d).transpose(1, 2)
        pos = torch.arange(t, dtype=x.dtype)[:, None] * torch.arange(1, self.d + 1, dtype=x.dtype) / self.d
        q, k = self.rope(q, pos.cos(), pos.sin()), self.rope(k, pos.cos(), pos.sin())
        rep = self.heads // self.kv
        k = k[:, :, None].expand(b, self.kv, rep, t, self.d).reshape(b, self.kv * rep, t, self.d)
        v = v[:, :, None].expand(b, self.kv, rep, t, self.d).reshape(b, self.kv * rep, t, self.d)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        x = x + self.o(a)
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


def _norm_layers(graph):
    return {str(n.target): type(graph.module(n)) for n in graph.nodes if n.op == "call_module"
            and isinstance(graph.module(n), nn.modules.batchnorm._BatchNorm)}


def test_functional_batch_norm_of_a_norm_act_layer_becomes_a_batchnorm_at_its_path():
    model = randomize_bn(InvertedResidual()).eval()
    x = torch.randn(2, 3, 16, 16)
    graph = graphopt.trace(model, x)
    assert graph.captured_by == "torch.fx"
    assert _norm_layers(graph) == {f"bn{i}": nn.BatchNorm2d for i in range(4)}
    assert not [n for n in graph.nodes if n.target is F.batch_norm]
    lifted = graph.gm.get_submodule("bn1")
    assert lifted.weight is not model.bn1.weight  # trace works on a copy ...
    torch.testing.assert_close(lifted.running_var, model.bn1.running_var)   # ... of the same statistics
    assert isinstance(graph.gm.get_submodule("bn1.act"), nn.SiLU)           # the activation moved into it
    assert set(graph.gm.state_dict()) == set(model.state_dict())            # the model's state-dict keys
    torch.testing.assert_close(graph.run(x), model(x), rtol=0, atol=0)


def test_norm_act_layers_fold_prune_and_export_to_int8(tmp_path):
    model = randomize_bn(InvertedResidual()).eval()
    x = torch.randn(2, 3, 16, 16)
    folded = PassManager([FoldBatchNorm()]).run(graphopt.trace(model, x))
    assert folded.records[1].stats["folded"] == 4 and not _norm_layers(folded.graph)
    plan = channel_groups(folded.graph)
    assert len(plan.prunable) == 3 and len(plan.groups) == 4   # stem/residual, expansion, SE; the head's output
    pruned = PassManager([PruneChannels(ratio=0.25)]).run(folded.graph)
    assert pruned.records[1].contract_error < 1e-5
    assert pruned.graph.gm.get_submodule("dw").out_channels == 24
    data = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    quantized = PassManager([InsertQDQ(progress=False), FoldQDQ()],
                            context=PassContext({"calibration_data": data})).run(pruned.graph)
    report = onnx_int8.export(quantized.graph, tmp_path / "m.int8.onnx")
    assert report.details["within_one_step"] >= 0.99


def test_a_module_holding_more_than_batch_norm_state_keeps_the_rest():
    class Scaled(nn.BatchNorm2d):
        def __init__(self, c):
            super().__init__(c)
            self.gain = nn.Parameter(torch.full((c,), 2.0))

        def forward(self, x):
            x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
            return x * self.gain.view(1, -1, 1, 1)

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), Scaled(8))).eval()
    x = torch.randn(2, 3, 8, 8)
    graph = graphopt.trace(model, x)
    assert _norm_layers(graph) == {"1_1": nn.BatchNorm2d}
    assert graph.attr("1.gain").shape == (8,)
    torch.testing.assert_close(graph.run(x), model(x), rtol=0, atol=0)
    folded = PassManager([FoldBatchNorm()]).run(graph)
    assert folded.records[1].stats["folded"] == 1


def test_rank_asserts_are_dropped_and_other_asserts_kept():
    class Checked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.conv(x)
            torch._assert(y.ndim == 4, "expected 4D input")
            torch._assert(y.shape[1] == 8, "expected 8 channels")
            return self.bn(y)

    graph = graphopt.trace(Checked().eval(), torch.randn(2, 3, 8, 8))
    asserts = [n for n in graph.nodes if n.target is torch._assert]
    assert len(asserts) == 1 and "channels" in asserts[0].args[1]
    assert not [n for n in graph.nodes if n.op == "call_function" and n.target is getattr and n.args[1] == "ndim"]


class ChannelsLastNorms(nn.Module):
    """timm's LayerNorm2d (F.layer_norm over channels-last, between permutes) and a GroupNorm called
    as F.group_norm with keyword arguments, then nearest upsampling: fx traces the functions."""

    def __init__(self, export: bool = False):
        super().__init__()
        self.conv, self.mid, self.out = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 4, 1)
        self.ln_weight, self.ln_bias = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.rand(16))
        self.gn = nn.GroupNorm(4, 16)
        self.export = export

    def forward(self, x):
        if self.export and x.shape[-1] > 1:   # torch.fx cannot branch on a size: torch.export captures
            x = x * 1.0
        x = self.conv(x)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (16,), self.ln_weight, self.ln_bias, 1e-6).permute(0, 3, 1, 2)
        x = F.group_norm(self.mid(x), 4, weight=self.gn.weight, bias=self.gn.bias, eps=self.gn.eps)
        return self.out(F.interpolate(F.relu(x), scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize("export", [False, True])
def test_functional_layer_and_group_norms_become_modules_and_resizing_passes_channels(export):
    model = randomize_bn(ChannelsLastNorms(export)).eval()
    x = torch.randn(2, 3, 8, 8)
    graph = graphopt.trace(model, x)
    assert graph.captured_by == ("torch.export" if export else "torch.fx")
    called = {str(n.target): type(graph.module(n)) for n in graph.nodes if n.op == "call_module"}
    assert called["gn"] is nn.GroupNorm and nn.LayerNorm in called.values()
    torch.testing.assert_close(graph.run(x), model(x), rtol=1e-6, atol=1e-6)
    groups = channel_groups(graph).groups
    mid = next(g for g in groups if any(m.target == "mid" and m.role == "out" for m in g.members))
    assert not mid.blocked                                  # whole GroupNorm groups, through the resize
    first = next(g for g in groups if any(m.target == "conv" and m.role == "out" for m in g.members))
    assert not first.blocked                                # the channels-last LayerNorm counts the removed as zeros
    result = PassManager([PruneChannels(ratio=0.5)]).run(graph)
    assert result.graph.gm.get_submodule("gn").num_groups == 2 and result.records[1].contract_error < 1e-5
    norm = next(m for m in result.graph.modules().values() if isinstance(m, PrunedLayerNorm))
    assert (norm.normalized, norm.count) == (8, 16)


def test_training_mode_batch_norm_calls_stay_functional():
    class Batchwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.register_buffer("mean", torch.zeros(8))
            self.register_buffer("var", torch.ones(8))

        def forward(self, x):
            return F.batch_norm(self.conv(x), self.mean, self.var, training=True)

    graph = graphopt.trace(Batchwise(), torch.randn(2, 3, 8, 8))
    assert [n for n in graph.nodes if n.target is F.batch_norm] and not _norm_layers(graph)


def test_same_padding_and_in_place_activations_in_an_export_graph(tmp_path):
    model = randomize_bn(InvertedResidual(same=True)).eval()
    x = torch.randn(2, 3, 15, 15)
    graph = graphopt.trace(model, x)
    assert graph.captured_by == "torch.export"           # the pad arithmetic stops torch.fx
    assert set(_norm_layers(graph)) == {f"bn{i}" for i in range(4)}
    names = {graphopt.ops.op_name(n) for n in graph.nodes if n.op == "call_function"}
    assert {"pad", "silu_"} <= names
    assert {graph.kind(n) for n in graph.nodes if graphopt.ops.op_name(n) == "silu_"} == {graphopt.OpKind.ACTIVATION}
    folded = PassManager([FoldBatchNorm()]).run(graph)
    assert folded.records[1].stats["folded"] == 4
    assert len(channel_groups(folded.graph).prunable) == 3
    pruned = PassManager([PruneChannels(ratio=0.25)]).run(folded.graph)
    assert pruned.records[1].contract_error < 1e-5 and pruned.graph.gm.get_submodule("dw").out_channels == 24
    torch.testing.assert_close(graph.run(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("amounts, prunable", [([1, 1, 1, 1], True), ([0, 0, 0, 0, 1, 1], False)])
def test_padding_passes_channels_unless_it_pads_them(amounts, prunable):
    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8 + sum(amounts[4:6]), 4, 3)

        def forward(self, x):
            return self.b(F.pad(self.a(x), amounts))

    graph = graphopt.trace(Padded(), torch.randn(2, 3, 12, 12))
    group = next(g for g in channel_groups(graph).groups if any(m.target == "a" for m in g.members))
    assert (not group.blocked) == prunable
    if not prunable:
        assert any("pads along the channels" in r for r in group.blocked)


def test_in_place_activation_after_a_quantized_tensor_keeps_the_int8_check_exact(tmp_path):
    """conv -> Identity -> ReLU(inplace=True): the check feeds the artifact's conv output to the
    graph's ReLU, which must not overwrite it before it is compared (it read 89% within a step)."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.drop, self.act = nn.Conv2d(3, 16, 3, padding=1), nn.Identity(), nn.ReLU(inplace=True)
            self.out = nn.Conv2d(16, 8, 3)

        def forward(self, x):
            return self.out(self.act(self.drop(self.conv(x))))

    torch.manual_seed(0)
    graph = graphopt.trace(Block().eval(), torch.randn(2, 3, 16, 16))
    data = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    quantized = PassManager([InsertQDQ(progress=False), FoldQDQ()],
                            context=PassContext({"calibration_data": data})).run(graph)
    report = onnx_int8.export(quantized.graph, tmp_path / "m.int8.onnx")
    assert report.details["within_one_step"] == 1.0


def test_a_layer_called_twice_folds_its_int8_weights_once(tmp_path):
    """CoaT applies one conv to several tensors: each call gets a fake-quantized weight, and
    fold_qdq must store the layer's int8 weights once for both (it failed on the second call)."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.shared, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            x = F.relu(self.stem(x))
            return self.head(self.shared(x) + self.shared(x * 0.5))

    torch.manual_seed(0)
    graph = graphopt.trace(Shared().eval(), torch.randn(2, 3, 12, 12))
    data = [torch.randn(2, 3, 12, 12) for _ in range(3)]
    result = PassManager([InsertQDQ(progress=False), FoldQDQ()], context=PassContext({"calibration_data": data})).run(graph)
    reads = [n for n in result.graph.nodes if n.op == "get_attr" and n.target == "shared.weight_int8"]
    assert len(reads) == 2 and result.graph.attr("shared.weight_int8").dtype == torch.int8
    assert onnx_int8.export(result.graph, tmp_path / "m.onnx").details["within_one_step"] >= 0.99


def test_reads_of_a_weight_dtype_and_device_become_constants(tmp_path):
    """EdgeNeXt's positional encoding reads ``self.proj.weight.device`` / ``.dtype``: the reads become
    constants, so fold_qdq can replace the layer (it left a dangling read of the weight)."""
    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.conv = nn.Conv2d(4, 8, 1), nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            grid = torch.ones(x.shape[0], 4, x.shape[2], x.shape[3]).to(device=self.proj.weight.device)
            return self.conv(x) + self.proj(grid.cumsum(2).to(self.proj.weight.dtype))

    torch.manual_seed(0)
    model = Positional().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = graphopt.trace(model, x)
    assert not [n for n in graph.nodes if n.op == "get_attr"]
    torch.testing.assert_close(graph.run(x), model(x))
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    quantized = PassManager([InsertQDQ(progress=False), FoldQDQ()], context=PassContext({"calibration_data": data})).run(graph)
    assert quantized.graph.attr("proj.weight_int8").dtype == torch.int8


def test_weights_computed_from_parameters_are_folded_and_the_layers_prune():
    """Weight standardisation (timm's ScaledStdConv2d in the NF-nets) computes a conv's weight from
    its parameters on every call: computed once at trace, it is a Conv2d at the layer's own path,
    the gain leaves the model, and the channels prune exactly; a weight computed from the input
    (a dynamic conv) is left alone."""
    class Standardised(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
            self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)

        def forward(self, x):
            w = F.batch_norm(self.weight.reshape(1, self.weight.shape[0], -1), None, None, training=True,
                             momentum=0.0, eps=1e-6).reshape_as(self.weight)
            return F.conv2d(x, w * self.gain, None, 1, 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = Standardised(3, 16), Standardised(16, 8), nn.Linear(8, 4)

        def forward(self, x):
            y = self.b(F.relu(self.a(x)))
            dynamic = F.conv2d(y, y.mean((0, 2, 3)).reshape(8, 1, 1, 1).expand(8, 1, 1, 1), groups=8)
            return self.head((y + dynamic).mean((2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = graphopt.trace(model, x)
    modules = graph.modules()
    assert isinstance(modules["a"], nn.Conv2d) and isinstance(modules["b"], nn.Conv2d)
    assert set(dict(graph.gm.named_parameters())) == {"a.weight", "b.weight", "head.weight", "head.bias"}
    assert sum(n.op == "call_function" and n.target is F.conv2d for n in graph.nodes) == 1   # the dynamic one
    torch.testing.assert_close(graph.run(x), model(x), rtol=1e-5, atol=1e-5)
    pruned = PassManager([PruneChannels(ratio=0.5)]).run(graph).graph
    assert pruned.modules()["a"].weight.shape == (8, 3, 3, 3)


def _capture(model, x, export):
    """The model as torch.fx captures it, or as torch.export does (aten ops, then lifted)."""
    from graphopt.ir import Graph
    from graphopt.trace import _export_capture

    return Graph(_export_capture(model, (x,)), (x,), captured_by="torch.export") if export \
        else graphopt.trace(model, x)


@pytest.mark.parametrize("export", [False, True])
def test_a_linear_written_as_a_matmul_with_the_transposed_weight_becomes_a_linear(export):
    """Falcon's FalconLinear computes ``x @ self.weight.T + self.bias``: a Linear with that bias at
    the layer's own path (state-dict keys unchanged), so its channels prune; a matmul of two
    activations stays a matmul."""
    class MatmulLinear(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.randn(cout, cin)), nn.Parameter(torch.randn(cout))

        def forward(self, x):
            return x @ self.weight.T + self.bias

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = MatmulLinear(8, 32), MatmulLinear(32, 8)

        def forward(self, x):
            y = self.down(torch.relu(self.up(x)))
            return y @ y.transpose(-1, -2)

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 5, 8)
    graph = _capture(model, x, export)
    up = graph.modules()["up"]
    assert isinstance(up, nn.Linear) and up.bias is not None and up.weight.shape == (32, 8)
    assert set(dict(graph.gm.named_parameters())) == {"up.weight", "up.bias", "down.weight", "down.bias"}
    torch.testing.assert_close(graph.run(x), model(x), rtol=1e-5, atol=1e-4)
    pruned = PassManager([PruneChannels(ratio=0.25)]).run(graph).graph
    assert pruned.modules()["up"].weight.shape == (24, 8) and pruned.modules()["down"].weight.shape == (8, 24)


# -- timm's own layers (timm is a benchmark extra: requirements-bench.txt) ----------------------------
def test_timm_norm_act_and_same_padding_models_prune_and_quantize(tmp_path):
    timm = pytest.importorskip("timm")
    from graphopt.tools.random_init import informative_init

    for name in ("test_efficientnet", "tf_mobilenetv3_small_minimal_100"):
        torch.manual_seed(0)
        model = informative_init(timm.create_model(name, pretrained=False, num_classes=4))
        x = torch.randn(2, 3, 32, 32)
        folded = PassManager([FoldBatchNorm()]).run(graphopt.trace(model, x))
        assert not _norm_layers(folded.graph), name
        plan = channel_groups(folded.graph)
        assert len(plan.prunable) >= len(plan.groups) - 1, (name, [g.blocked for g in plan.blocked])
        pruned = PassManager([PruneChannels(ratio=0.3)]).run(folded.graph)
        assert pruned.records[1].macs / pruned.records[0].macs < 0.8, name
        data = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
        quantized = PassManager([InsertQDQ(progress=False), FoldQDQ()],
                                context=PassContext({"calibration_data": data})).run(pruned.graph)
        assert onnx_int8.export(quantized.graph, tmp_path / f"{name}.onnx").details["within_one_step"] >= 0.99


# -- decoder attention: rotary embeddings, grouped-query attention, per-head norms ---------------------
@pytest.mark.parametrize("export", [False, True])
def test_grouped_query_attention_with_rotary_embeddings_loses_whole_key_value_groups(export):
    torch.manual_seed(0)
    model = GQA(export=export).eval()
    x = torch.randn(2, 6, 32)
    graph = graphopt.trace(model, x)
    assert graph.captured_by == ("torch.export" if export else "torch.fx")
    heads = next(g for g in channel_groups(graph).groups if any(m.target == "k" for m in g.members))
    assert heads.size == 2 and not heads.blocked          # a unit: one key/value head and its 2 query heads
    result = PassManager([PruneChannels(ratio=0.5)]).run(graph)
    shapes = {n: tuple(p.shape) for n, p in result.graph.gm.named_parameters()}
    assert shapes["q.weight"] == (16, 32) and shapes["k.weight"] == shapes["v.weight"] == (8, 32)
    assert shapes["o.weight"] == (32, 16) and shapes["q_norm"] == (8,)   # per-head weights stay whole
    record = result.records[1]
    assert record.contract_error < 1e-5 and record.max_error > 1e-3        # masked original matched; outputs moved


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma"])
def test_hugging_face_decoders_prune_heads_and_mlp(arch):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.AutoConfig.for_model(
        arch, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, vocab_size=128, max_position_embeddings=64, use_cache=False)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config).eval()
    graph = graphopt.trace(model, torch.randint(0, 128, (2, 12)))
    plan = channel_groups(graph)
    assert sorted(g.size for g in plan.prunable) == [2, 96], [(g.name, g.blocked[:2]) for g in plan.groups]
    result = PassManager([PruneChannels(ratio=0.5)]).run(graph)
    layer = result.graph.gm.get_submodule("layers.0")
    assert layer.self_attn.q_proj.out_features == 32 and layer.self_attn.k_proj.out_features == 16
    assert layer.mlp.up_proj.out_features == 48
    assert result.records[1].contract_error < 1e-5


# -- layers torch.export hands back as functions: GPT-2's Conv1D (addmm), ALBERT's shared layers --------
class Conv1DBlock(nn.Module):
    """GPT-2's MLP: Conv1D layers (``addmm(bias, x.view(-1, n), W)`` with ``W`` of shape (in, out)),
    and ALBERT's sharing: the same layer applied twice. The size branch makes torch.export capture it."""

    def __init__(self, dim=16, hidden=32):
        super().__init__()
        self.w_in, self.b_in = nn.Parameter(torch.randn(dim, hidden) * 0.2), nn.Parameter(torch.randn(hidden) * 0.1)
        self.w_out, self.b_out = nn.Parameter(torch.randn(hidden, dim) * 0.2), nn.Parameter(torch.randn(dim) * 0.1)
        self.shared = nn.Linear(dim, dim)

    def conv1d(self, x, w, b):
        return torch.addmm(b, x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[1])

    def forward(self, x):
        if x.shape[1] > 1:
            x = x * 1.0
        x = self.shared(torch.relu(self.shared(x)))
        return x + self.conv1d(F.gelu(self.conv1d(x, self.w_in, self.b_in)), self.w_out, self.b_out)


def test_addmm_and_shared_layers_in_an_export_graph_become_modules():
    torch.manual_seed(0)
    model = Conv1DBlock().eval()
    x = torch.randn(2, 5, 16)
    graph = graphopt.trace(model, x)
    assert graph.captured_by == "torch.export"
    calls = [str(n.target) for n in graph.nodes if n.op == "call_module" and n.target != "_guards_fn"]
    assert calls.count("shared") == 2                       # one module, called twice
    linears = {t: graph.gm.get_submodule(t) for t in calls}
    assert all(type(m) is nn.Linear for m in linears.values())
    lifted = [m for t, m in linears.items() if t != "shared"]
    assert sorted(m.out_features for m in lifted) == [16, 32]
    torch.testing.assert_close(graph.run(x), model(x), rtol=1e-5, atol=1e-6)
    hidden = next(g for g in channel_groups(graph).groups if g.size == 32)
    assert not hidden.blocked
    result = PassManager([PruneChannels(ratio=0.25)]).run(graph)
    assert sorted(m.out_features for m in result.graph.gm.modules() if isinstance(m, nn.Linear)) == [16, 16, 24]
    assert result.records[1].contract_error < 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "albert"])
def test_hugging_face_gpt2_and_albert_prune(arch):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    sizes = (dict(n_embd=64, n_layer=2, n_head=4, n_positions=64) if arch == "gpt2" else
             dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, embedding_size=32))
    config = transformers.AutoConfig.for_model(arch, vocab_size=128, use_cache=False, **sizes)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config).eval()
    graph = graphopt.trace(model, torch.randint(0, 128, (2, 12)))
    plan = channel_groups(graph)
    # GPT-2: heads and MLP of each of 2 layers; ALBERT: its one shared layer's heads and MLP, and its
    # factorised embedding (32 wide, normalised by a LayerNorm, then mapped to the hidden size)
    assert len(plan.prunable) == (4 if arch == "gpt2" else 3), [(g.name, g.blocked[:2]) for g in plan.groups]
    result = PassManager([PruneChannels(ratio=0.5)]).run(graph)
    assert result.records[1].contract_error < 1e-5 and result.records[1].macs < 0.8 * result.records[0].macs


def test_hugging_face_swin_exports_to_int8(tmp_path):
    """Swin's export graph calls aten.contiguous after a transpose; torch.onnx's decomposition of
    the re-exported graph dropped it and failed on the view after it ('Cannot view a tensor')."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.AutoConfig.for_model("swin", image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                               num_heads=[2, 2], window_size=4)
    torch.manual_seed(0)
    graph = graphopt.trace(transformers.AutoModel.from_config(config).eval(), torch.randn(2, 3, 32, 32))
    assert any(n.target is torch.ops.aten.contiguous.default for n in graph.nodes)
    data = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    quantized = PassManager([InsertQDQ(progress=False), FoldQDQ()],
                            context=PassContext({"calibration_data": data})).run(graph)
    report = onnx_int8.export(quantized.graph, tmp_path / "swin.int8.onnx")
    assert report.details["within_one_step"] >= 0.99 and report.details["lowering"] == "torch_onnx"
    assert any(n.target is torch.ops.aten.contiguous.default for n in quantized.graph.nodes)   # the IR is as it was


def test_timm_beit_attention_exports_to_int8(tmp_path):
    """BEiT reshapes the transposed output of scaled_dot_product_attention (with its relative
    position bias); torch.onnx's decomposition turned that reshape into a view, which failed on
    the CPU kernel's strides ('Cannot view a tensor')."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", num_classes=4, img_size=32, patch_size=8, depth=1,
                              embed_dim=64, num_heads=2).eval()
    graph = graphopt.trace(model, torch.randn(2, 3, 32, 32))
    data = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    quantized = PassManager([InsertQDQ(progress=False), FoldQDQ()],
                            context=PassContext({"calibration_data": data})).run(graph)
    code = quantized.graph.gm.code
    assert onnx_int8.export(quantized.graph, tmp_path / "beit.onnx").details["within_one_step"] >= 0.99
    assert quantized.graph.gm.code == code                  # the export's rewrite is undone


# -- attention over the channel axis (EfficientViT), selective kernels (SKNet) --------------------------
class ChannelAttention(nn.Module):
    """EfficientViT (MSRA)'s attention: q, k, v split from one conv's channels, attention over the
    pixels (q.T @ k sums over the key channels), v @ attn.T keeps the value channels as rows."""

    def __init__(self, c=16, key=4, val=8):
        super().__init__()
        self.key, self.val = key, val
        self.qkv = nn.Conv2d(c, 2 * key + val, 1)
        self.proj = nn.Conv2d(val, c, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = self.qkv(x).split([self.key, self.key, self.val], dim=1)
        q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
        attn = (q.transpose(-2, -1) @ k).softmax(dim=-1)
        return x + self.proj((v @ attn.transpose(-2, -1)).view(b, self.val, h, w))


class SelectiveKernel(nn.Module):
    """SKNet: two conv paths stacked, a squeeze to attention logits per path and channel, a softmax
    over the paths, the paths weighted and summed; ``expand_as`` for the gate."""

    def __init__(self, c=16):
        super().__init__()
        self.paths = nn.ModuleList([nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=2, dilation=2)])
        self.reduce, self.attn = nn.Conv2d(c, 8, 1), nn.Conv2d(8, 2 * c, 1)
        self.out = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        feats = torch.stack([F.relu(p(x)) for p in self.paths], dim=1)          # (B, 2, C, H, W)
        b, n, c, h, w = feats.shape
        logits = self.attn(F.relu(self.reduce(feats.sum(1).mean((2, 3), keepdim=True))))
        weights = logits.view(b, n, c, 1, 1).softmax(dim=1)
        mixed = (feats * weights).sum(dim=1)
        gate = torch.sigmoid(mixed.mean((2, 3), keepdim=True))
        return self.out(mixed * gate.expand_as(mixed))


def test_value_channels_of_channel_attention_prune_and_the_summed_key_channels_block():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), ChannelAttention(), nn.Conv2d(16, 4, 1)).eval()
    graph = graphopt.trace(model, torch.randn(2, 3, 6, 6))
    groups = channel_groups(graph).groups
    qkv = [g for g in groups if any(m.target == "1.qkv" and m.role == "out" for m in g.members)]
    assert sorted((g.size, bool(g.blocked)) for g in qkv) == [(4, True), (4, True), (8, False)]
    assert any("a matmul sums over these channels" in r for g in qkv for r in g.blocked)
    result = PassManager([PruneChannels(ratio=0.5)]).run(graph)
    assert result.graph.gm.get_submodule("1.proj").in_channels == 4 and result.records[1].contract_error < 1e-5


def test_selective_kernel_paths_lose_the_same_channels():
    torch.manual_seed(0)
    graph = graphopt.trace(SelectiveKernel().eval(), torch.randn(2, 16, 8, 8))
    plan = channel_groups(graph)
    paths = next(g for g in plan.groups if any(m.target == "paths.0" and m.role == "out" for m in g.members))
    assert not paths.blocked and {m.target for m in paths.members if m.role == "out"} >= {"paths.0", "paths.1", "attn"}
    result = PassManager([PruneChannels(ratio=0.5)]).run(graph)
    gm = result.graph.gm
    assert gm.get_submodule("paths.1").out_channels == 8 and gm.get_submodule("attn").out_channels == 16
    assert result.records[1].contract_error < 1e-5


# -- the direct int8 lowering: float ops between int8 layers ------------------------------------------
class FloatOps(nn.Module):
    """The float ops of timm's CNNs between int8 layers: activations, squeeze-excitation, split and
    concat, a channels-last LayerNorm, a layer scale reshaped from a constant, arithmetic."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.se_reduce, self.se_expand = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.acts = nn.ModuleList([nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.LeakyReLU(0.1), nn.ELU(),
                                   nn.Hardsigmoid(), nn.Mish(), nn.Softplus()])
        self.norm = nn.LayerNorm(16)
        self.gamma = nn.Parameter(torch.rand(16) + 0.5)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        for act in self.acts:
            x = act(x) - 0.25
        gate = F.silu(self.se_reduce(x.mean((2, 3), keepdim=True)))
        x = x * self.se_expand(gate).sigmoid()
        left, right = x.chunk(2, dim=1)
        x = torch.cat([F.leaky_relu(self.a(left)), self.b(right) / 6], dim=1)
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(x * self.gamma.reshape(1, -1, 1, 1) + 1.0)


@pytest.mark.parametrize("form", ["qoperator", "qdq"])
def test_float_ops_between_int8_layers_lower_directly(form, tmp_path):
    torch.manual_seed(0)
    graph = graphopt.trace(FloatOps().eval(), torch.randn(2, 3, 12, 12))
    data = [torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    quantized = PassManager([InsertQDQ(progress=False), FoldQDQ()],
                            context=PassContext({"calibration_data": data})).run(graph).graph
    report = onnx_int8.export(quantized, tmp_path / "m.onnx", form=form, lowering="direct")
    assert report.details["lowering"] == "direct" and report.details["within_one_step"] >= 0.99
    assert report.max_rel_error < 0.02 and report.details["int8_layers"] == 6
    share, _ = onnx_int8.reference_check(quantized, form)    # standard ONNX ops: the reference evaluator runs them
    assert share >= 0.99


def test_sizes_added_at_run_time_are_no_int8_adds(tmp_path):
    """Hiera-style sizes computed from shapes (``h + w``): an add of two ints is not an int8 add
    anchor (calibration tried to observe an int: 'int' object has no attribute 'detach')."""
    class SizeArithmetic(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = F.relu(self.a(x))
            area = y.shape[2] + y.shape[3]
            return self.b(y) / area

    torch.manual_seed(0)
    graph = graphopt.trace(SizeArithmetic().eval(), torch.randn(2, 3, 8, 8))
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    result = PassManager([InsertQDQ(progress=False), FoldQDQ()], context=PassContext({"calibration_data": data})).run(graph)
    assert result.records[1].stats["quantized_adds"] == 0
    assert onnx_int8.export(result.graph, tmp_path / "m.onnx").details["within_one_step"] >= 0.99


def test_attention_over_five_axes_exports_through_torch_onnx(tmp_path):
    """timm's Hiera attends over (batch, heads, windows, tokens, dim); torch.onnx writes attention
    for 4-D tensors only, so the export merges the first two axes around the call."""
    class WindowAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

        def forward(self, x):                                   # (B, windows, tokens, 16)
            b, w, t, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, w, t, 3, 2, 8).permute(3, 0, 4, 1, 2, 5).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v)       # (B, heads, windows, tokens, 8)
            return self.proj(out.permute(0, 2, 3, 1, 4).reshape(b, w, t, 16))

    torch.manual_seed(0)
    graph = graphopt.trace(WindowAttention().eval(), torch.randn(2, 3, 4, 16))
    data = [torch.randn(2, 3, 4, 16) for _ in range(2)]
    quantized = PassManager([InsertQDQ(progress=False), FoldQDQ()], context=PassContext({"calibration_data": data})).run(graph)
    code = quantized.graph.gm.code
    report = onnx_int8.export(quantized.graph, tmp_path / "m.onnx")
    assert report.details["lowering"] == "torch_onnx" and report.details["within_one_step"] >= 0.99
    assert quantized.graph.gm.code == code


def test_hugging_face_bert_int8_layers_are_read_from_the_file_written(tmp_path):
    """onnxruntime fuses the simplified file's DequantizeLinear -> MatMul pairs into integer kernels;
    the report read the kernels of the model as built and said 0.5% of the MACs ran in int8."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.AutoConfig.for_model("bert", hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                               intermediate_size=96, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    graph = graphopt.trace(transformers.AutoModel.from_config(config).eval(), torch.randint(0, 128, (2, 12)))
    data = [torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    quantized = PassManager([InsertQDQ(progress=False), FoldQDQ()], context=PassContext({"calibration_data": data})).run(graph)
    report = onnx_int8.export(quantized.graph, tmp_path / "bert.onnx")
    assert report.details["simplified"] and report.details["int8_mac_share"] > 0.95, report.details["float_layers"]


# -- BEiT / EVA attention: a qkv bias made of constants, a relative-position bias, interleaved rotary ---
class BeitAttention(nn.Module):
    """BEiT's and EVA's attention: F.linear with ``cat((q_bias, k_bias, v_bias))`` as its bias, a
    relative-position bias table gathered and passed as the attention mask, and EVA's interleaved
    rotary embedding (``stack((-x[..., 1::2], x[..., ::2]), -1).reshape(x.shape)``)."""

    def __init__(self, dim=32, heads=4, tokens=5):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim) * 0.1), nn.Parameter(torch.randn(dim) * 0.1)
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.table = nn.Parameter(torch.randn(2 * tokens - 1, heads) * 0.1)
        index = torch.arange(tokens)[:, None] - torch.arange(tokens)[None, :] + tokens - 1
        self.register_buffer("index", index, persistent=False)
        self.proj = nn.Linear(dim, dim)

    def rope(self, x):
        return x * 0.8 + torch.stack((-x[..., 1::2], x[..., ::2]), -1).reshape(x.shape) * 0.6

    def forward(self, x):
        b, n, c = x.shape
        qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(self.rope(q), self.rope(k), v, attn_mask=bias)
        return x + self.proj(out.transpose(1, 2).reshape(b, n, c))


def test_beit_attention_loses_whole_heads_with_their_bias_parts_and_table_columns():
    torch.manual_seed(0)
    model = BeitAttention().eval()
    x = torch.randn(2, 5, 32)
    graph = graphopt.trace(model, x)
    heads = next(g for g in channel_groups(graph).groups if any(m.target == "q_bias" for m in g.members))
    assert heads.size == 4 and not heads.blocked, heads.blocked
    assert {m.target for m in heads.members if m.role == "param"} == {"q_bias", "k_bias", "v_bias", "table"}
    result = PassManager([PruneChannels(ratio=0.5)]).run(graph)
    gm = result.graph.gm
    assert gm.qkv.out_features == 48 and tuple(gm.table.shape) == (9, 2) and gm.q_bias.shape == (16,)
    assert result.records[1].contract_error < 1e-5


def test_hugging_face_phi3_fused_projections_with_full_rotary_prune():
    """Phi-3 slices q, k, v out of one projection and rotates all of each head, leaving an empty
    remainder that it concatenates back (an empty slice of a head's columns refused pruning)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.AutoConfig.for_model(
        "phi3", hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, vocab_size=128, max_position_embeddings=64, use_cache=False, pad_token_id=0)
    torch.manual_seed(0)
    graph = graphopt.trace(transformers.AutoModel.from_config(config).eval(), torch.randint(0, 128, (2, 12)))
    assert sorted(g.size for g in channel_groups(graph).prunable) == [2, 96]
    result = PassManager([PruneChannels(ratio=0.5)]).run(graph)
    attn = result.graph.gm.get_submodule("layers.0.self_attn")
    assert attn.qkv_proj.out_features == 64 and attn.o_proj.in_features == 32   # 2 of 4 query heads, 1 of 2 kv
    assert result.records[1].contract_error < 1e-5


def test_attention_over_three_axes_with_a_mask_exports_through_torch_onnx(tmp_path):
    """SAM's ViT attends over (batch x heads, tokens, dim) with a relative-position mask."""
    class FlatHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)
            self.bias = nn.Parameter(torch.randn(1, 6, 6) * 0.1)

        def forward(self, x):                                   # (B, tokens, 16)
            b, t, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, t, 3, 2, 8).permute(2, 0, 3, 1, 4).reshape(3, b * 2, t, 8).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias.expand(b * 2, t, t))
            return self.proj(out.view(b, 2, t, 8).permute(0, 2, 1, 3).reshape(b, t, 16))

    torch.manual_seed(0)
    graph = graphopt.trace(FlatHeads().eval(), torch.randn(2, 6, 16))
    data = [torch.randn(2, 6, 16) for _ in range(2)]
    quantized = PassManager([InsertQDQ(progress=False), FoldQDQ()], context=PassContext({"calibration_data": data})).run(graph)
    code = quantized.graph.gm.code
    report = onnx_int8.export(quantized.graph, tmp_path / "m.onnx", dynamic_batch=False)
    assert report.details["lowering"] == "torch_onnx" and report.details["within_one_step"] >= 0.99
    assert quantized.graph.gm.code == code


def test_a_transformer_residual_stream_stays_float_and_a_near_zero_class_token_survives():
    """XCiT concatenates a class token of tiny values to the patch tokens: a per-tensor rounding of
    the residual stream at each int8 add erased it (SQNR 3 dB, insert_qdq's bound refused). Adds of
    token sequences stay float under layer_outputs='auto', as in torch.export graphs."""
    class ClassTokenBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls = nn.Parameter(torch.randn(1, 1, 32) * 0.02)
            self.embed, self.norm, self.fc1, self.fc2 = nn.Linear(12, 32), nn.LayerNorm(32), nn.Linear(32, 64), nn.Linear(64, 32)
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1)
            for _ in range(3):
                x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
            return self.head(self.norm(x)[:, 0])

    torch.manual_seed(0)
    graph = graphopt.trace(ClassTokenBlock().eval(), torch.randn(2, 9, 12) * 3)
    data = [torch.randn(2, 9, 12) * 3 for _ in range(3)]
    auto = PassManager([InsertQDQ(progress=False)], context=PassContext({"calibration_data": data})).run(graph)
    assert auto.records[1].stats["quantized_adds"] == 0 and auto.records[1].stats["sqnr_db"] > 25
    forced = PassManager([InsertQDQ(progress=False, layer_outputs="int8", bound=100.0)],
                         context=PassContext({"calibration_data": data})).run(graph)
    assert forced.records[1].stats["quantized_adds"] == 3
    assert forced.records[1].stats["sqnr_db"] < auto.records[1].stats["sqnr_db"] - 10


def test_hugging_face_decoder_traced_as_users_call_it_with_a_mask_and_a_cache_default():
    """(input_ids, attention_mask) on the model itself, use_cache left at its default (True): the
    graph returns the model's ModelOutput without the cache, honours the mask, keeps batch and
    sequence symbolic, and loses whole key/value head groups when pruned."""
    transformers = pytest.importorskip("transformers")
    from torch.export import Dim

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=100)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0                                                    # left padding
    dims = {0: Dim("batch", max=16), 1: Dim("seq", min=2, max=64)}
    graph = graphopt.trace(model, (ids, mask), dynamic_shapes=(dims, dims))
    assert model.config.use_cache                                      # the caller's model is untouched
    out = graph.run(ids, mask)
    assert list(out.keys()) == ["logits"]
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, use_cache=False).logits
    assert torch.allclose(out["logits"], expected, atol=1e-5)
    unmasked = graph.run(ids, torch.ones_like(mask))["logits"]
    assert torch.allclose(unmasked[0], out["logits"][0], atol=1e-5)   # sample 0 had no padding
    assert not torch.allclose(unmasked[1, 4:], out["logits"][1, 4:], atol=1e-3)
    longer = graph.run(torch.randint(0, 100, (3, 20)), torch.ones(3, 20, dtype=torch.long))["logits"]
    assert longer.shape == (3, 20, 100)
    result = PassManager([PruneChannels(ratio=0.5)]).run(graph)
    k_rows = [p.shape[0] for n, p in result.graph.gm.named_parameters() if n.endswith("k_proj.weight")]
    assert k_rows and all(r in (16,) for r in k_rows)                   # one of two kv heads (dim 16) left
