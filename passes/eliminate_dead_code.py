"""Dead-code elimination: nodes whose values reach no output, and the modules they used."""
from __future__ import annotations

from graphopt.ir import Graph
from graphopt.pass_base import Contract, Pass, PassContext, PassResult, register_pass


@register_pass("eliminate_dead_code")
class EliminateDeadCode(Pass):
    """Erase side-effect-free nodes whose results are never used, then unused submodules."""

    contract = Contract.EXACT

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        before_nodes = sum(1 for _ in graph.nodes)
        before_modules = sum(1 for _ in graph.gm.modules())
        changed = graph.gm.graph.eliminate_dead_code()
        graph.commit()
        removed_nodes = before_nodes - sum(1 for _ in graph.nodes)
        removed_modules = before_modules - sum(1 for _ in graph.gm.modules())
        return PassResult(graph, changed=bool(changed or removed_modules),
                          stats={"nodes": removed_nodes, "modules": removed_modules})
