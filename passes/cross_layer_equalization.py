"""Cross-layer equalization (Nagel et al., "Data-Free Quantization", 2019).

For two layers joined by a positively homogeneous activation (ReLU, or none) — conv/linear A
feeding conv/linear B and nothing else — output channel i of A is divided by s_i and the
matching input channel of B multiplied by it, with s_i = sqrt(r_A,i / r_B,i) (r: the largest
weight magnitude of that channel). relu(x / s) * s == relu(x), so the function is unchanged
while per-channel weight ranges become alike: what per-tensor and depthwise layers need.
ReLU6 is not homogeneous: with ``through_relu6=True`` those pairs are equalized too and the
ReLU6 becomes a ReLU (the paper's recipe; the contract is then bounded, not exact).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import fx

from graphopt.ir import Graph
from graphopt.layer_selection import LayerPatterns, LayerSelection
from graphopt.options import Count, Tolerance
from graphopt.pass_base import Contract, Pass, PassContext, PassResult, register_pass
from graphopt.quant.qparams import is_plain_relu

_LAYERS = (nn.Conv2d, nn.Conv1d, nn.Linear)


def _layer(graph: Graph, node) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        m = graph.module(node)
        return m if isinstance(m, _LAYERS) else None
    return None


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _in_weights(m: nn.Module) -> torch.Tensor:
    """B's weights viewed as (input channel, everything else)."""
    if _depthwise(m):
        return m.weight.detach().flatten(1)
    return m.weight.detach().transpose(0, 1).flatten(1)


def _scale_in(m: nn.Module, s: torch.Tensor) -> None:
    shape = [-1] + [1] * (m.weight.dim() - 1)
    if _depthwise(m):
        m.weight.data *= s.view(shape)
    else:
        m.weight.data *= s.view([1, -1] + [1] * (m.weight.dim() - 2))


def _scale_out(m: nn.Module, s: torch.Tensor) -> None:
    m.weight.data /= s.view([-1] + [1] * (m.weight.dim() - 1))
    if m.bias is not None:
        m.bias.data /= s


@register_pass("cross_layer_equalization")
class CrossLayerEqualization(Pass):
    """Rescale channels between consecutive conv/linear layers so their weight ranges match (exact for ReLU).

    Options:
        iterations: rounds of equalization over every pair
        through_relu6: equalize across ReLU6 too, which becomes a ReLU (no longer exact: held to bound)
        bound: with through_relu6: largest relative output error accepted
        layers: layers that may be rescaled (module name patterns; a pair needs both its layers chosen)
        exclude: layers never rescaled (module name patterns)
    """

    contract = Contract.EXACT

    def __init__(self, iterations: Count = 4, through_relu6: bool = False, bound: Tolerance = 0.05,
                 layers: LayerPatterns | None = None, exclude: LayerPatterns | None = None):
        self.iterations, self.through_relu6 = iterations, through_relu6
        self.selection = LayerSelection.of(layers, exclude)
        if through_relu6:  # no longer function-preserving: measured and held to ``bound``
            self.contract, self.bound = Contract.BOUNDED, bound

    def pairs(self, graph: Graph) -> list[tuple[fx.Node, fx.Node | None, fx.Node]]:
        """(A, activation or None, B) chains with no other users in between, both layers chosen."""
        self.selection.check([str(n.target) for n in graph.nodes if _layer(graph, n) is not None],
                             "pass 'cross_layer_equalization'")
        found = []
        for node in graph.nodes:
            a = _layer(graph, node)
            if a is None or len(node.users) != 1 or len(graph.users_of_module(node.target)) != 1:
                continue
            (nxt,) = node.users
            act = None
            relu6 = nxt.op == "call_module" and type(graph.module(nxt)) is nn.ReLU6
            if relu6 and not self.through_relu6:
                continue
            if relu6 or is_plain_relu(graph, nxt):
                act = nxt
                if len(nxt.users) != 1:
                    continue
                (nxt,) = nxt.users
            b = _layer(graph, nxt)
            if b is None or len(graph.users_of_module(nxt.target)) != 1 or nxt.args[0] is not (act or node):
                continue
            out_channels = a.out_features if isinstance(a, nn.Linear) else a.out_channels
            in_channels = _in_weights(b).shape[0]
            grouped = isinstance(b, (nn.Conv1d, nn.Conv2d)) and b.groups > 1 and not _depthwise(b)
            if out_channels != in_channels or grouped or not (self.selection.selects(str(node.target))
                                                              and self.selection.selects(str(nxt.target))):
                continue
            found.append((node, act, nxt))
        return found

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        pairs = self.pairs(graph)
        relu6 = 0
        with torch.no_grad():
            for _ in range(self.iterations):
                for node_a, _act, node_b in pairs:
                    a, b = graph.module(node_a), graph.module(node_b)
                    r_a = a.weight.detach().flatten(1).abs().amax(1)
                    r_b = _in_weights(b).abs().amax(1)
                    s = torch.sqrt(r_a / r_b)
                    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
                    _scale_out(a, s)
                    _scale_in(b, s)
        for _a, act, _b in pairs:
            if act is not None and act.op == "call_module" and isinstance(graph.module(act), nn.ReLU6):
                graph.replace_module(act.target, nn.ReLU())
                relu6 += 1
        if relu6:
            graph.commit()
        stats = {"pairs": len(pairs)}
        if relu6:
            stats["relu6_replaced"] = relu6
        return PassResult(graph, changed=bool(pairs), stats=stats)
