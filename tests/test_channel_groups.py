"""Golden channel groups for small synthetic models (the structures pruning must handle)."""
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.pruning.channels import DEPTHWISE, IN, NORM, OUT, PARAM, SHAPE_ARG, SPLIT, channel_groups


def groups_of(model, *inputs):
    plan = channel_groups(graphopt.trace(model.eval(), inputs))
    return plan, {g.name: g for g in plan.groups}


def roles(group):
    return sorted((m.role, m.target, m.offset, m.inner) for m in group.members)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        x = torch.relu(x + y)
        x = x + self.c3(x)  # a chain of residual adds
        return self.head(x.mean((2, 3)))


def test_residual_adds_merge_producers_into_one_group():
    plan, by_name = groups_of(Residual(), torch.randn(1, 3, 6, 6))
    assert sorted(by_name) == ["c1", "head", "stem + c2 + c3"]
    res = by_name["stem + c2 + c3"]
    assert res.size == 8 and res.prunable
    assert roles(res) == sorted([(OUT, "stem", 0, 1), (OUT, "c2", 0, 1), (OUT, "c3", 0, 1), (NORM, "b2", 0, 1),
                                 (IN, "c1", 0, 1), (IN, "c3", 0, 1), (IN, "head", 0, 1)])
    assert roles(by_name["c1"]) == sorted([(OUT, "c1", 0, 1), (NORM, "b1", 0, 1), (IN, "c2", 0, 1)])
    assert by_name["head"].blocked == ["reaches the model output"]


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(14)
        self.fc = nn.Linear(14 * 2 * 2, 4)

    def forward(self, x):
        y = self.bn(torch.cat([self.a(x), self.b(x)], dim=1))
        return self.fc(torch.flatten(torch.relu(y), 1))


def test_concat_offsets_and_flatten_into_linear():
    _, by_name = groups_of(Concat(), torch.randn(1, 3, 2, 2))
    # each concat input keeps its own group; the consumer sees them at offsets; flatten
    # spreads every channel over its 2x2 block of features
    assert roles(by_name["a"]) == sorted([(OUT, "a", 0, 1), (NORM, "bn", 0, 1), (IN, "fc", 0, 4)])
    assert roles(by_name["b"]) == sorted([(OUT, "b", 0, 1), (NORM, "bn", 8, 1), (IN, "fc", 32, 4)])


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(3, 12, 1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.project = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.project(self.grouped(self.dw(self.expand(x)))).sum()


def test_depthwise_joins_its_input_group_and_grouped_conv_takes_one_position_per_group():
    plan, by_name = groups_of(Depthwise(), torch.randn(1, 3, 5, 5))
    # the grouped conv (12 -> 12, groups=3) reads its 3 input blocks of 4 with the same 4
    # weight columns: a unit is position j of every block, so expand and dw lose 3 channels
    expand = by_name["expand[:4] + expand[4:][:4] + expand[4:][4:]"]
    assert expand.size == 4 and expand.unit == 3 and expand.prunable
    assert roles(expand) == sorted([(OUT, "expand", 0, 1), (OUT, "expand", 4, 1), (OUT, "expand", 8, 1),
                                    (DEPTHWISE, "dw", 0, 1), (DEPTHWISE, "dw", 4, 1), (DEPTHWISE, "dw", 8, 1),
                                    (IN, "grouped", 0, 1)])
    # its output keeps 3 equal blocks: a unit is row j of every block
    grouped = by_name["grouped"]
    assert grouped.size == 4 and grouped.unit == 3 and grouped.prunable
    assert roles(grouped) == sorted([(OUT, "grouped", 0, 1), (OUT, "grouped", 4, 1), (OUT, "grouped", 8, 1),
                                     (IN, "project", 0, 1), (IN, "project", 4, 1), (IN, "project", 8, 1)])
    assert len(plan.prunable) == 2


class ChannelsLast(nn.Module):
    """ConvNeXt-style: conv, permute to channels-last, Linear MLP, layer scale, permute back."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.fc1 = nn.Linear(6, 24)
        self.fc2 = nn.Linear(24, 6)
        self.gamma = nn.Parameter(torch.rand(6))
        self.stem = nn.Conv2d(3, 6, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.fc2(nn.functional.gelu(self.fc1(y)))
        return (x + y.permute(0, 3, 1, 2)).flatten(1).softmax(-1)


def test_permute_channels_last_mlp_and_layer_scale():
    _, by_name = groups_of(ChannelsLast(), torch.randn(1, 3, 4, 4))
    assert roles(by_name["fc1"]) == sorted([(OUT, "fc1", 0, 1), (IN, "fc2", 0, 1)])
    assert by_name["fc1"].prunable
    trunk = by_name["stem + fc2"]
    assert (PARAM, "gamma", 0, 1) in roles(trunk) and (DEPTHWISE, "dw", 0, 1) in roles(trunk)
    assert any("softmax over the channels" in r for r in trunk.blocked)


def test_unknown_ops_block_and_name_the_node():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 8, 1)
            self.c = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.c(torch.cumsum(self.b(torch.relu(self.a(x))), 1))

    plan, by_name = groups_of(Odd(), torch.randn(1, 3, 4, 4))
    assert by_name["a"].prunable
    assert by_name["b"].blocked == ["cumsum: cumsum (unknown) is not understood by the channel analysis"]


def test_attention_module_keeps_its_embedding_width():
    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.norm = nn.LayerNorm(16)
            self.ff1 = nn.Linear(16, 32)
            self.ff2 = nn.Linear(32, 16)

        def forward(self, x):
            x = self.proj(x)
            x = self.norm(x + self.attn(x, x, x)[0])
            return self.ff2(torch.relu(self.ff1(x))).sum()

    _, by_name = groups_of(Enc(), torch.randn(2, 5, 4))
    assert by_name["ff1"].prunable  # the FFN hidden dimension
    proj = next(g for n, g in by_name.items() if n.startswith("proj"))
    assert any("MultiheadAttention keeps its embedding width" in r for r in proj.blocked)
    heads = by_name["attn (heads)"]
    assert heads.prunable and heads.size == 2 and heads.unit == 8
    assert not any("LayerNorm" in r for r in proj.blocked)   # a LayerNorm module alone would not block


# -- split/chunk, channel shuffle, GroupNorm, hand-written attention heads -----------------

class GLU(nn.Module):
    """a, b = x.chunk(2); a * sigmoid(b): the halves are the same channels."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a, b = self.conv1(x).chunk(2, dim=1)
        return self.conv2(a * torch.sigmoid(b))


class Split(nn.Module):
    """Uneven torch.split and an even tensor.split of one tensor, reordered by a concat."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 1)
        self.a = nn.Conv2d(4, 6, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 1)
        self.c = nn.Conv2d(12, 6, 1)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        p, q = torch.split(y, [4, 8], dim=1)
        r = y.split(6, 1)
        return self.a(p) + self.b(q) + self.c(torch.cat([r[1], r[0]], 1))


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle with literal sizes: view(B, 2, 8, H, W), transpose, reshape."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, h, w = y.shape[0], y.shape[2], y.shape[3]
        return self.c(y.view(n, 2, 8, h, w).transpose(1, 2).reshape(n, 16, h, w))


class GroupNormNet(nn.Module):
    def __init__(self, groups=4, affine=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(groups, 16, affine=affine)
        self.conv2 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.gn(self.conv1(x))))


class SelfAttention(nn.Module):
    """BERT-style attention written by hand: q/k/v Linear, view into heads, transpose,
    matmul-softmax-matmul (or SDPA), transpose back, reshape, output Linear; then an FFN.
    ``style="hf"`` builds the view sizes as Hugging Face does: x.size()[:-1] + (h, d);
    ``style="timm"`` merges the heads back into the width it read from the input at run time
    (``B, N, C = x.shape``), which pruning must not leave at the unpruned width;
    ``style="einsum"`` multiplies with einsum (k given untransposed) and merges with swapaxes."""

    def __init__(self, dim=32, heads=4, style="matmul"):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.ff1, self.ff2 = nn.Linear(dim, 64), nn.Linear(64, dim)
        self.head = nn.Linear(dim, 3)
        self.h, self.d, self.style = heads, dim // heads, style

    def heads(self, x):
        if self.style == "hf":
            return x.view(x.size()[:-1] + (self.h, self.d)).permute(0, 2, 1, 3)
        return x.view(x.shape[0], x.shape[1], self.h, self.d).transpose(1, 2)

    def forward(self, x, mask):
        n, t = x.shape[0], x.shape[1]
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        if self.style == "sdpa":
            ctx = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif self.style == "einsum":
            att = torch.softmax(torch.einsum("bhid, bhjd -> bhij", q, k) / self.d ** 0.5 + mask, dim=-1)
            ctx = torch.einsum("bhij,bhjd->bhid", att, v)
        else:
            att = torch.softmax(q @ k.transpose(-1, -2) / self.d ** 0.5 + mask, dim=-1)
            ctx = att @ v
        if self.style == "hf":
            ctx = ctx.permute(0, 2, 1, 3).contiguous()
            ctx = ctx.view(ctx.size()[:-2] + (self.h * self.d,))
        elif self.style == "timm":
            ctx = ctx.transpose(1, 2).reshape(n, t, x.shape[2])
        elif self.style == "einsum":
            ctx = ctx.swapaxes(1, 2).reshape(n, t, self.h * self.d)
        else:
            ctx = ctx.transpose(1, 2).reshape(n, t, self.h * self.d)
        x = x + self.o(ctx)
        x = x + self.ff2(torch.relu(self.ff1(x)))
        return self.head(x)


def test_chunk_halves_of_a_glu_are_one_group():
    _, by_name = groups_of(GLU(), torch.randn(1, 3, 4, 4))
    glu = by_name["conv1[:8] + conv1[8:]"]
    assert glu.size == 8 and glu.prunable
    assert roles(glu) == sorted([(OUT, "conv1", 0, 1), (OUT, "conv1", 8, 1), (IN, "conv2", 0, 1),
                                 (SPLIT, "", 0, 1), (SPLIT, "", 0, 1)])


def test_split_outputs_take_index_ranges():
    _, by_name = groups_of(Split(), torch.randn(1, 3, 4, 4))
    # [4, 8] and [6, 6] cut the stem's 12 channels into [0:4], [4:6], [6:12]
    assert set(by_name) == {"a + b + c", "stem[:4]", "stem[4:][:2]", "stem[4:][2:]"}
    assert roles(by_name["stem[:4]"]) == sorted([(OUT, "stem", 0, 1), (IN, "a", 0, 1), (IN, "c", 6, 1),
                                                 (SPLIT, "", 0, 1), (SPLIT, "", 0, 1)])
    assert roles(by_name["stem[4:][:2]"]) == sorted([(OUT, "stem", 4, 1), (IN, "b", 0, 1), (IN, "c", 10, 1),
                                                     (SPLIT, "", 0, 1), (SPLIT, "", 4, 1)])
    assert roles(by_name["stem[4:][2:]"]) == sorted([(OUT, "stem", 6, 1), (IN, "b", 2, 1), (IN, "c", 0, 1),
                                                     (SPLIT, "", 2, 1), (SPLIT, "", 0, 1)])


def test_channel_shuffle_unites_the_shuffled_halves():
    _, by_name = groups_of(Shuffle(), torch.randn(1, 3, 4, 4))
    shuffled = by_name["a + b"]
    # a's and b's channel j sit side by side after the shuffle: each unit takes 2 inputs of c
    assert shuffled.size == 8 and shuffled.prunable
    assert [r for r in roles(shuffled) if r[0] != SHAPE_ARG] == sorted([(OUT, "a", 0, 1), (OUT, "b", 0, 1),
                                                                        (IN, "c", 0, 2)])
    literals = sorted((m.node, m.arg, m.inner) for m in shuffled.members if m.role == SHAPE_ARG)
    assert literals == [("reshape", 2, 2), ("view", 3, 1)]  # reshape(n, 16, ...) and view(n, 2, 8, ...)


def test_group_norm_prunes_whole_groups():
    _, by_name = groups_of(GroupNormNet(), torch.randn(1, 3, 4, 4))
    group = by_name["conv1"]
    assert group.size == 4 and group.unit == 4 and group.prunable
    assert roles(group) == sorted([(OUT, "conv1", 0, 4), (NORM, "gn", 0, 4), (IN, "conv2", 0, 4)])
    _, by_name = groups_of(GroupNormNet(groups=1), torch.randn(1, 3, 4, 4))
    assert by_name["conv1"].blocked == ["gn: GroupNorm with one group normalises over all channels"]


def test_group_norm_group_across_two_layers_blocks():
    class Straddle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 10, 1)
            self.gn = nn.GroupNorm(4, 16)
            self.c = nn.Conv2d(16, 2, 1)

        def forward(self, x):
            return self.c(self.gn(torch.cat([self.a(x), self.b(x)], 1)))

    _, by_name = groups_of(Straddle(), torch.randn(1, 3, 4, 4))
    reason = "gn: GroupNorm groups of 4 channels: a block of 4 positions would mix channels of different layers"
    assert by_name["a"].blocked == [reason] and by_name["b"].blocked == [reason]


@pytest.mark.parametrize("style", ["matmul", "sdpa", "hf", "timm", "einsum"])
def test_hand_written_attention_heads(style):
    _, by_name = groups_of(SelfAttention(style=style), torch.randn(2, 5, 32), torch.zeros(2, 1, 1, 5))
    heads = by_name["q + k + v"]
    assert heads.size == 4 and heads.unit == 8 and heads.prunable
    assert [r for r in roles(heads) if r[0] != SHAPE_ARG] == sorted(
        [(OUT, "q", 0, 8), (OUT, "k", 0, 8), (OUT, "v", 0, 8), (IN, "o", 0, 8)])
    # the head count in each of the three views, and h * d in the reshape back
    assert sorted(m.inner for m in heads.members if m.role == SHAPE_ARG) == [1, 1, 1, 8]
    assert by_name["ff1"].prunable
    assert any("combined with x, whose channels are not tracked" in r for r in by_name["o + ff2"].blocked)


def test_attention_structures_that_stay_blocked():
    class Fused(nn.Module):
        """timm-style fused qkv, but the stacked q/k/v go through an op the analysis does not
        follow on a stack (a product) before they are taken apart."""

        def __init__(self):
            super().__init__()
            self.qkv, self.o = nn.Linear(16, 48), nn.Linear(16, 16)

        def forward(self, x):
            qkv = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
            q, k, v = (qkv * 2).unbind(0)
            ctx = nn.functional.scaled_dot_product_attention(q, k, v)
            return self.o(ctx.transpose(1, 2).reshape(x.shape[0], x.shape[1], 16))

    class HeadSoftmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.o = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            q = self.q(x).view(x.shape[0], x.shape[1], 2, 8)
            return self.o(torch.softmax(q, dim=2).flatten(2))

    _, by_name = groups_of(Fused(), torch.randn(2, 5, 16))
    for part in ("qkv[:16]", "qkv[16:][:16]", "qkv[16:][16:]"):  # q, k and v: one range each
        assert "mul: mul on channels stacked along one axis (fused q/k/v) is not followed" in by_name[part].blocked
    class ChannelDot(nn.Module):
        """An einsum that contracts the channels themselves is no batched matmul over heads."""

        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return torch.einsum("btc,btc->bt", self.q(x), self.k(x))

    # a softmax across the heads leaves each column to itself: every head loses the same columns
    _, by_name = groups_of(HeadSoftmax(), torch.randn(2, 5, 16))
    assert by_name["q[:8] + q[8:]"].size == 8 and not by_name["q[:8] + q[8:]"].blocked
    _, by_name = groups_of(ChannelDot(), torch.randn(2, 5, 16))
    assert by_name["q"].blocked == by_name["k"].blocked == ["einsum: einsum 'btc,btc->bt' is not a batched matmul"]


def test_one_size_literal_for_two_independent_groups_blocks():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 2)

        def forward(self, x):
            shape = x.size()[:-1] + (2, 8)
            y = self.a(x).view(shape).flatten(2) * 2
            z = self.b(x).view(shape).flatten(2)
            return self.c(y), z.sum(-1)

    _, by_name = groups_of(Shared(), torch.randn(2, 3, 8))
    assert "add: one size literal serves channel groups that are pruned independently" in by_name["a"].blocked
    assert "add: one size literal serves channel groups that are pruned independently" in by_name["b"].blocked


def test_unbind_along_another_axis_keeps_channels_along_channels_blocks():
    class Unbind(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            rows = self.a(x).unbind(2)
            return self.b((rows[0] + rows[1]).unsqueeze(2)), self.c(x).unbind(1)[0]

    _, by_name = groups_of(Unbind(), torch.randn(1, 3, 2, 4))
    assert by_name["a"].prunable
    assert roles(by_name["a"]) == sorted([(OUT, "a", 0, 1), (IN, "b", 0, 1)])
    assert by_name["c"].blocked == ["unbind_1: unbind along the channels (one output per channel)"]


class GroupedChain(nn.Module):
    """ResNeXt-style: a grouped conv feeding another, a residual around them and one around a
    grouped conv whose input and output are the same channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.g1 = nn.Conv2d(16, 24, 3, padding=1, groups=4)
        self.bn1 = nn.BatchNorm2d(24)
        self.g2 = nn.Conv2d(24, 16, 1, groups=2)
        self.g3 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.g2(torch.relu(self.bn1(self.g1(x))))
        x = x + self.g3(x)
        return self.head(x.mean((2, 3)))


class GroupedShuffle(nn.Module):
    """ShuffleNet v1's unit: grouped 1x1, channel shuffle, depthwise, grouped 1x1, residual."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.g1 = nn.Conv2d(8, 16, 1, groups=2)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.g2 = nn.Conv2d(16, 8, 1, groups=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.bn1(self.g1(x)))
        n, h, w = y.shape[0], y.shape[2], y.shape[3]
        y = y.view(n, 2, 8, h, w).transpose(1, 2).reshape(n, 16, h, w)
        x = torch.relu(x + self.g2(self.dw(y)))
        return self.head(x.mean((2, 3)))


def test_grouped_conv_chain_and_residuals_share_within_group_positions():
    plan, by_name = groups_of(GroupedChain(), torch.randn(1, 3, 5, 5))
    assert [g.name for g in plan.blocked] == ["head"]
    # g1 (groups=4, 24 outputs) feeds g2 (groups=2): g2's group holds two of g1's blocks
    assert roles(by_name["g1"]) == sorted([(OUT, "g1", 0, 1), (OUT, "g1", 6, 1), (OUT, "g1", 12, 1),
                                           (OUT, "g1", 18, 1), (NORM, "bn1", 0, 1), (NORM, "bn1", 6, 1),
                                           (NORM, "bn1", 12, 1), (NORM, "bn1", 18, 1),
                                           (IN, "g2", 0, 1), (IN, "g2", 6, 1)])
    # the residuals tie stem, g2 and g3 (whose input and output are the same channels); g1
    # and g3 read 4 blocks of 4, so the unit is one position in every block of 4
    (trunk,) = [g for g in plan.prunable if g.name.startswith("stem")]
    assert trunk.size == 4 and trunk.unit == 4
    assert [r for r in roles(trunk) if r[0] == IN] == [(IN, "g1", 0, 1), (IN, "g3", 0, 1)] + \
        [(IN, "head", o, 1) for o in (0, 4, 8, 12)]
    assert sorted(r for r in roles(trunk) if r[0] == OUT) == sorted(
        (OUT, layer, o, 1) for layer in ("g2", "g3", "stem") for o in (0, 4, 8, 12))


def test_grouped_conv_through_a_channel_shuffle():
    plan, by_name = groups_of(GroupedShuffle(), torch.randn(1, 3, 5, 5))
    # g1's row i of block g lands at 2i + g after the shuffle; g2's groups take 8 of those:
    # a unit is g1's rows {u, u + 4} in both blocks, g2's within-group inputs 2u and 2u + 1
    mid = by_name["g1[:4] + g1[4:]"]
    assert mid.size == 4 and mid.unit == 4 and mid.prunable
    assert [r for r in roles(mid) if r[0] != SHAPE_ARG] == sorted(
        [(OUT, "g1", o, 1) for o in (0, 4, 8, 12)] + [(NORM, "bn1", o, 1) for o in (0, 4, 8, 12)] +
        [(DEPTHWISE, "dw", 0, 2), (DEPTHWISE, "dw", 8, 2), (IN, "g2", 0, 2)])
    assert by_name["stem[:4] + stem[4:] + g2"].unit == 2


class StraddledGroups(nn.Module):
    """Grouped convs over a concat of 3 + 5 channels, over GroupNorm groups wider than a conv
    group, and with a channel multiplier (one input channel per group)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1)
        self.b = nn.Conv2d(3, 5, 1)
        self.g = nn.Conv2d(8, 8, 1, groups=2)
        self.gn = nn.GroupNorm(2, 8)
        self.narrow = nn.Conv2d(8, 4, 1, groups=4)
        self.mult = nn.Conv2d(4, 8, 3, padding=1, groups=4)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.g(torch.cat([self.a(x), self.b(x)], 1))
        return self.head(self.mult(self.narrow(self.gn(y))))


def test_grouped_conv_over_a_concat_and_what_it_cannot_keep_exact():
    _, by_name = groups_of(StraddledGroups(), torch.randn(1, 3, 4, 4))
    # blocks [a0 a1 a2 b0] and [b1 b2 b3 b4]: position j of both blocks is one unit
    assert roles(by_name["a + b[1:][:3]"]) == sorted([(OUT, "a", 0, 1), (OUT, "b", 1, 1), (IN, "g", 0, 1)])
    assert roles(by_name["b[:1] + b[1:][3:]"]) == sorted([(OUT, "b", 0, 1), (OUT, "b", 4, 1), (IN, "g", 3, 1)])
    # GroupNorm keeps whole groups of 4 channels; narrow's groups of 2 would cut into them
    assert by_name["g"].blocked == ["narrow: grouped conv (groups=4) input: cuts inside a unit of 4 positions"]
    assert by_name["narrow"].blocked == ["mult: conv with one input channel per group and 8 outputs (groups=4)"]
    assert by_name["mult"].prunable and by_name["mult"].size == 2  # its output rows still go per group
