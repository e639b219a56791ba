"""Measured milliseconds saved per pruned channel, for latency-aware channel selection.

MACs say little about what a channel costs at small batch: a 1x1 conv on a 56x56 map is
bound by memory traffic, a layer on 7x7 maps by its weights, and torch changes kernels at some
sizes. ``GroupLatency`` times each conv/linear layer a channel group touches, alone, at full
width and with a share of the group's channels removed (torch eager, the graph's example
batch, this machine's threads), and gives each group's seconds saved per channel: the cost
side of a selection that removes channels in order of importance per second saved (the
knapsack of hardware-aware pruning, solved greedily).
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn

from graphopt.channels import DEPTHWISE, IN, OUT, ChannelGroup
from graphopt.ir import Graph
from graphopt.latency import interleaved_latency

_AXES = {OUT: "out", IN: "in", DEPTHWISE: "depthwise"}


def _narrower(module: nn.Module, axis: str, removed: int) -> nn.Module | None:
    """A fresh layer like ``module`` with ``removed`` fewer channels on ``axis`` (None when the
    layer cannot be rebuilt that way: its saving is then taken as proportional)."""
    if isinstance(module, nn.Linear) and axis in ("in", "out"):
        cin = module.in_features - removed * (axis == "in")
        cout = module.out_features - removed * (axis == "out")
        return nn.Linear(cin, cout, bias=module.bias is not None) if cin > 0 and cout > 0 else None
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
        depthwise = axis == "depthwise"
        if module.groups != 1 and not depthwise:
            return None
        cin = module.in_channels - removed * (axis in ("in", "depthwise"))
        cout = module.out_channels - removed * (axis in ("out", "depthwise"))
        if cin <= 0 or cout <= 0:
            return None
        return type(module)(cin, cout, module.kernel_size, module.stride, module.padding, module.dilation,
                            groups=cin if depthwise else 1, bias=module.bias is not None)
    return None


def _input_like(shape: tuple, axis: str, module: nn.Module, removed: int) -> torch.Tensor:
    dim = -1 if isinstance(module, nn.Linear) else 1
    shape = list(shape)
    if axis in ("in", "depthwise"):
        shape[dim] -= removed
    return torch.randn(shape)


class GroupLatency:
    """Seconds saved per removed channel of each group, from per-layer timings (cached)."""

    def __init__(self, graph: Graph, share: float = 0.5, rounds: int = 5, inner: int = 3):
        self.graph, self.share, self.rounds, self.inner = graph, share, rounds, inner
        self.modules = graph.modules()
        self.inputs = {}
        for node in graph.nodes:
            if node.op == "call_module" and node.target not in self.inputs and node.args:
                shape = graph.shape(node.args[0])
                if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape):
                    self.inputs[node.target] = shape
        self.cache: dict[tuple[str, str, int], float] = {}

    def per_channel(self, groups: list[ChannelGroup]) -> dict[int, float]:
        return {g.id: self.saving(g) for g in groups}

    def saving(self, group: ChannelGroup) -> float:
        """Seconds saved per channel when ``share`` of ``group``'s channels go."""
        units = max(1, int(group.size * self.share))
        positions: dict[tuple[str, str], int] = defaultdict(int)
        for m in group.members:
            if m.role in _AXES and m.target in self.inputs:
                positions[(m.target, _AXES[m.role])] += units * m.inner
        return sum(self.layer_saving(t, axis, n) for (t, axis), n in positions.items()) / units

    def layer_saving(self, target: str, axis: str, removed: int) -> float:
        key = (target, axis, removed)
        if key not in self.cache:
            module, shape = self.modules[target], self.inputs[target]
            narrow = _narrower(module, axis, removed)
            full_x = torch.randn(shape)
            runs = {"full": _runner(module, full_x)}
            if narrow is not None:
                runs["narrow"] = _runner(narrow.eval(), _input_like(shape, axis, module, removed))
            times = interleaved_latency(runs, self.rounds, warmup=1, inner=self.inner)
            if narrow is not None:
                self.cache[key] = max(0.0, times["full"] - times["narrow"])
            else:   # no rebuild rule: assume the saving is proportional to the channels removed
                size = _width(module, axis)
                self.cache[key] = times["full"] * removed / size if size else 0.0
        return self.cache[key]


def _width(module: nn.Module, axis: str) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features if axis == "in" else module.out_features
    return getattr(module, "in_channels" if axis == "in" else "out_channels", 0)


def _runner(module: nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            return module(x)
    return run
