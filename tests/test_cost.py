import torch
import torch.nn as nn

import graphopt
from graphopt.tools.digits import DigitsCNN


def test_cost_counts_macs_params_and_bytes():
    g = graphopt.trace(DigitsCNN(), torch.randn(1, 1, 8, 8))
    cost = g.analysis("cost")
    # conv1: 16 out * 64 px * 1 in * 9; conv2: 32 * 64 * 16 * 9; fc: 512 * 10
    assert cost.nodes["features_0"].macs == 16 * 64 * 9
    assert cost.nodes["features_3"].macs == 32 * 64 * 16 * 9
    assert cost.nodes["classifier_2"].macs == 512 * 10
    assert cost.macs == 16 * 64 * 9 + 32 * 64 * 16 * 9 + 5120
    expected_params = sum(p.numel() for p in DigitsCNN().parameters())
    assert cost.params == expected_params
    state_bytes = sum(t.numel() * t.element_size() for t in DigitsCNN().state_dict().values())
    assert cost.bytes == state_bytes
    assert cost.bytes_by_dtype["int64"] == 16  # two num_batches_tracked counters


def test_cost_scales_with_batch_and_counts_shared_weights_once():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.fc(x))

    g = graphopt.trace(Shared(), torch.randn(4, 8))
    cost = g.analysis("cost")
    assert cost.macs == 2 * 4 * 8 * 8
    assert cost.params == 8 * 8 + 8


def test_cost_of_grouped_conv_matmul_and_attention():
    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x, t):
            y = self.dw(x)
            a, _ = self.attn(t, t, t)
            return y, a @ t.transpose(1, 2)

    g = graphopt.trace(Mix(), (torch.randn(1, 8, 5, 5), torch.randn(2, 6, 16)))
    cost = g.analysis("cost")
    assert cost.nodes["dw"].macs == 8 * 25 * 9
    attn_macs = 4 * (2 * 6) * 16 * 16 + 2 * (2 * 6) * 6 * 16
    assert cost.nodes["attn"].macs == attn_macs
    matmul = next(n for n in g.nodes if n.name.startswith("matmul"))
    assert cost.nodes[matmul.name].macs == 2 * 6 * 6 * 16


def test_cost_is_cached_until_invalidated():
    g = graphopt.trace(DigitsCNN(), torch.randn(1, 1, 8, 8))
    first = g.analysis("cost")
    assert g.analysis("cost") is first
    g.invalidate({"cost"})
    assert g.analysis("cost") is not first
