"""Golden channel groups for small synthetic models (the structures pruning must handle)."""
import torch
import torch.nn as nn

import graphopt
from graphopt.channels import DEPTHWISE, IN, NORM, OUT, PARAM, channel_groups


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


def test_depthwise_joins_its_input_group_and_grouped_conv_blocks():
    _, by_name = groups_of(Depthwise(), torch.randn(1, 3, 5, 5))
    expand = by_name["expand"]
    assert (DEPTHWISE, "dw", 0, 1) in roles(expand)
    assert expand.blocked == ["grouped: grouped conv (groups=3)"]
    assert by_name["grouped"].blocked[0] == "grouped: grouped conv (groups=3)"


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


def test_attention_module_and_layernorm_block():
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
    assert any("LayerNorm normalises over these channels" in r for r in proj.blocked)
