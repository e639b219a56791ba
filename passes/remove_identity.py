"""Remove nodes that are the identity in eval mode: dropout of every kind and nn.Identity."""
from __future__ import annotations

from graphopt.ir import Graph
from graphopt.ops import OpKind
from graphopt.pass_base import Contract, Pass, PassContext, PassResult, register_pass


@register_pass("remove_identity")
class RemoveIdentity(Pass):
    """Drop dropout and identity nodes, which do nothing at inference."""

    contract = Contract.EXACT

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        removed = 0
        for node in list(graph.nodes):
            if graph.kind(node) != OpKind.IDENTITY or not node.args:
                continue
            if node.op == "call_function" and node.kwargs.get("training", False):
                continue  # F.dropout(training=True) is not an identity
            source = node.args[0]
            if getattr(source, "op", None) is None:
                continue
            graph.bypass(node, source)
            removed += 1
        if removed:
            graph.commit()
        return PassResult(graph, changed=bool(removed), stats={"removed": removed})
