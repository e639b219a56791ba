"""Fold each eval-mode BatchNorm into the conv or linear layer that feeds it."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from graphopt.ir import Graph
from graphopt.pass_base import Contract, Pass, PassContext, PassResult, register_pass

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of ``layer`` whose output equals ``bn(layer(x))`` in eval mode."""
    folded = copy.deepcopy(layer)
    with torch.no_grad():
        scale = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        factor = scale / torch.sqrt(bn.running_var + bn.eps)
        weight = layer.weight * factor.reshape(-1, *([1] * (layer.weight.dim() - 1)))
        bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        folded.weight = nn.Parameter(weight.to(layer.weight.dtype))
        folded.bias = nn.Parameter(((bias - bn.running_mean) * factor + shift).to(layer.weight.dtype))
    return folded


@register_pass("fold_batchnorm")
class FoldBatchNorm(Pass):
    """Merge each BatchNorm that follows a conv/linear into that layer's weights (eval semantics)."""

    contract = Contract.EXACT
    ensures = frozenset({"folded_norms"})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        folded, skipped = 0, {}
        for node in list(graph.nodes):
            if node.op != "call_module" or not isinstance(graph.module(node), _NORMS):
                continue
            bn = graph.module(node)
            producer = node.args[0] if node.args else None
            reason = self._unfoldable(graph, node, producer, bn)
            if reason:
                skipped[node.name] = reason
                continue
            graph.replace_module(producer.target, fold_into(graph.module(producer), bn))
            graph.bypass(node, producer)
            folded += 1
        if folded:
            graph.commit()
        stats = {"folded": folded}
        if skipped:
            stats["skipped"] = len(skipped)
        return PassResult(graph, changed=bool(folded), stats=stats)

    @staticmethod
    def _unfoldable(graph: Graph, node, producer, bn) -> str | None:
        """Why this BatchNorm cannot be folded into its producer (None if it can)."""
        if producer is None or getattr(producer, "op", None) != "call_module":
            return "input is not a module call"
        layer = graph.module(producer)
        if not isinstance(layer, _FOLDABLE):
            return f"input is {type(layer).__name__}"
        if not bn.track_running_stats or bn.running_mean is None:
            return "no running statistics"
        if len(producer.users) != 1:
            return "layer output has other users"
        if len(graph.users_of_module(producer.target)) != 1:
            return "layer module is shared"
        out_features = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if out_features != bn.num_features:
            return "channel count mismatch"
        if isinstance(layer, nn.Linear) and len(graph.shape(producer) or ()) != 2:
            return "BatchNorm1d over a sequence normalises another axis"
        return None
