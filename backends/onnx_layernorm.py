"""Keep onnxruntime from fusing a residual add into the LayerNormalization after it.

onnxruntime's SkipLayerNormFusion turns ``Add -> LayerNormalization`` on rank-3 tensors into
one SkipLayerNormalization node. On this machine (onnxruntime 1.31, 2 threads, a [16, 128, 384]
encoder activation) that fused CPU kernel runs about 6x slower than the Add and the
LayerNormalization it replaces, a fifth of all-MiniLM-L6-v2's int8 time. Normalizing a 2-D view
of the sum (``Reshape`` to [-1, H], which onnxruntime does without a copy, and back) computes
the same values and leaves the pattern unmatched. The int8 backend times the model with and
without this rewrite and keeps the faster, so a runtime whose fused kernel is fast keeps it.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), -1)


def _widths(model: onnx.ModelProto) -> dict[str, int]:
    """Length of every 1-D initializer (a LayerNormalization's scale gives its width)."""
    return {t.name: int(t.dims[0]) for t in model.graph.initializer if len(t.dims) == 1}


def skip_layernorm_sites(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """LayerNormalization nodes over the last axis whose input is an Add and whose width is known
    (the scale is an initializer): the places onnxruntime would fuse."""
    producer = {out: n for n in model.graph.node for out in n.output}
    widths = _widths(model)
    return [n for n in model.graph.node
            if n.op_type == "LayerNormalization" and _axis(n) == -1 and len(n.output) == 1
            and n.input[0] in producer and producer[n.input[0]].op_type == "Add" and n.input[1] in widths]


def layernorms_on_2d(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` whose fusable LayerNormalizations normalize a [-1, H] view of their
    input, and how many were rewritten (0: ``model`` itself comes back, not copied)."""
    sites = {n.name or n.output[0] for n in skip_layernorm_sites(model)}
    if not sites:
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    widths = _widths(out)
    nodes = []
    for i, node in enumerate(out.graph.node):
        if (node.name or node.output[0]) not in sites:
            nodes.append(node)
            continue
        stem = f"ln2d_{i}"
        x, y = node.input[0], node.output[0]
        out.graph.initializer.append(numpy_helper.from_array(np.array([-1, widths[node.input[1]]], np.int64),
                                                             f"{stem}_rows"))
        nodes.append(helper.make_node("Shape", [x], [f"{stem}_shape"], name=f"{stem}_shape"))
        nodes.append(helper.make_node("Reshape", [x, f"{stem}_rows"], [f"{stem}_in"], name=f"{stem}_flatten"))
        flat = onnx.NodeProto()
        flat.CopyFrom(node)
        flat.input[0], flat.output[0] = f"{stem}_in", f"{stem}_out"
        nodes.append(flat)
        nodes.append(helper.make_node("Reshape", [f"{stem}_out", f"{stem}_shape"], [y], name=f"{stem}_restore"))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    onnx.checker.check_model(out)
    return out, len(sites)
