"""Checks the int8 backends share: can a graph be exported at all, is an artifact within one
quantization step of the simulated-quant graph (end to end, and layer by layer), and which share
of the MACs runs in integer kernels. Private to the backends; no registered backend imports another."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from graphopt.errors import ConfigError
from graphopt.quant.qparams import dequantize_per_channel, is_weight_dq, qparams


def check_exportable(graph, backend: str, min_within_step: float) -> None:
    """What an int8 export needs before it starts: a share in (0, 1] of outputs that must lie
    within one step, and int8 weights in the graph (insert_qdq, then fold_qdq)."""
    if not 0 < min_within_step <= 1:
        raise ConfigError(f"backend '{backend}': min_within_step must be in (0, 1], got {min_within_step!r}")
    if not any(is_weight_dq(n) for n in graph.nodes):
        raise ConfigError(f"backend '{backend}': the graph has no int8 weights; run insert_qdq and fold_qdq first")


def output_steps(graph) -> list[float | None]:
    """Quantization step of each graph output (None where an output is float)."""
    out = next(n for n in graph.nodes if n.op == "output")
    return [qparams(a).scale if qparams(a) else None for a in flatten_args(out.args[0])]


def flatten_args(value) -> list:
    if isinstance(value, (tuple, list)):
        return [v for item in value for v in flatten_args(item)]
    return [value]


def within_one_step(reference, outputs, steps: list[float | None]) -> float:
    """Share of output elements within one quantization step of the reference
    (within 1e-4 of the largest magnitude for a float output)."""
    from graphopt.verify import flatten_outputs

    within = total = 0
    for ref, out, step in zip(flatten_outputs(reference), flatten_outputs(outputs), steps):
        ref, out = ref.detach().double(), out.detach().double()
        tol = step * 1.001 if step else 1e-4 * max(ref.abs().max().item(), 1e-12)
        within += int(((ref - out).abs() <= tol).sum())
        total += ref.numel()
    return within / max(total, 1)


def int8_mac_share(graph, int8_layers: list[str]) -> float:
    """Share of the conv/linear/matmul MACs done by the named (integer-kernel) nodes."""
    from graphopt.ops import OpKind

    cost = graph.analysis("cost")
    macs = {n.name: cost.nodes[n.name].macs for n in graph.nodes
            if graph.kind(n) in (OpKind.CONV, OpKind.LINEAR, OpKind.MATMUL)}
    return sum(macs.get(n, 0) for n in int8_layers) / max(sum(macs.values()), 1)


class _TeacherForced(fx.Interpreter):
    """Runs the simulated-quant graph, but every quantized tensor the artifact also produced is
    replaced by the artifact's value before later nodes read it; records what the graph computed."""

    def __init__(self, gm: fx.GraphModule, forced: dict):
        super().__init__(gm)
        self.forced, self.computed = forced, {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n.name in self.forced:
            self.computed[n.name] = value
            # a copy: an in-place op downstream (timm's ReLU(inplace=True) after an Identity, ``x += y``)
            # would otherwise overwrite the artifact's values before they are compared
            return self.forced[n.name].to(value.dtype, copy=True)
        return value


def layerwise_within_one_step(graph, inputs: tuple, artifact: dict[str, torch.Tensor]) -> tuple[float, str | None]:
    """Share of quantized elements the artifact computes within one step of the simulated-quant
    graph, each layer fed the artifact's own inputs (so rounding differences do not compound
    through depth); also the node with the most elements off by more than a step."""
    interpreter = _TeacherForced(graph.gm, artifact)
    with torch.no_grad():
        interpreter.run(*inputs)
    within = total = 0
    worst, worst_count = None, 0
    nodes = {n.name: n for n in graph.nodes}
    for name, ref in interpreter.computed.items():
        step = qparams(nodes[name]).scale * 1.001
        off = int(((ref.double() - artifact[name].double()).abs() > step).sum())
        within += ref.numel() - off
        total += ref.numel()
        if off > worst_count:
            worst, worst_count = name, off
    return within / max(total, 1), worst


def gather_int8_rows(graph) -> int:
    """Rewrite ``F.embedding(ids, dequantize_per_channel(q, s, 1))`` as ``embedding(ids, q) * s``:
    the backends then gather int8 rows and dequantize only those, instead of the whole table on
    every run. Bit-identical (per-column scales survive the row gather). Returns how many."""
    g = graph.gm.graph
    count = 0
    for node in list(g.nodes):
        if not (node.op == "call_function" and node.target is F.embedding and len(node.args) >= 2
                and is_weight_dq(node.args[1]) and node.args[1].args[2] == 1 and len(node.args[1].users) == 1):
            continue
        dq = node.args[1]
        codes, scales, _ = dq.args
        last = len(graph.shape(node)) - 1
        with g.inserting_before(node):
            rows = g.call_function(F.embedding, (node.args[0], codes, *node.args[2:]), dict(node.kwargs))
            value = g.call_function(dequantize_per_channel, (rows, scales, last))
        value.meta.update(node.meta)
        node.replace_all_uses_with(value)
        g.erase_node(node)
        g.erase_node(dq)
        count += 1
    if count:
        graph.commit()
    return count
