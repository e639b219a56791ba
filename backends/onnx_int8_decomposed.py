"""ONNX int8 through torch.onnx, for graphs the direct lowering has no rule for (transformers).

The folded simulated-quant IR is rewritten onto torch's decomposed quantization ops
(``quantized_decomposed.quantize_per_tensor`` / ``dequantize_per_tensor`` for activations,
``dequantize_per_channel`` over the int8 weight constants), which torch.onnx turns into
QuantizeLinear / DequantizeLinear: the result is a QDQ model with int8 weight initializers
and every other op (embeddings, attention, GELU, LayerNorm, symbolic shapes) exported by
torch.onnx as it would be in float. onnxruntime fuses ``DQ -> MatMul/Gemm/Conv (-> Q)`` into
its integer kernels at load time (MatMulIntegerToFloat, QLinearMatMul, QLinearConv); which
layers it fused is read back from the session's optimized model, not assumed.
"""
from __future__ import annotations

import os
import tempfile

import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import fx

from graphopt.errors import ExportError
from graphopt.backends.onnx import to_proto
from graphopt.ir import Graph, owner_and_leaf
from graphopt.quant import CONV_FUNCS, gather_int8_rows, is_activation_fq, is_weight_dq, qparams

INTEGER_KERNELS = {"MatMulIntegerToFloat", "QLinearMatMul", "QLinearConv", "QGemm", "MatMulInteger",
                   "ConvInteger", "DynamicQuantizeMatMul", "QAttention"}
_TORCH_DTYPES = {"uint8": torch.uint8, "int8": torch.int8}


def _decomposed_ops():
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
    return torch.ops.quantized_decomposed


def decompose(graph: Graph) -> tuple[Graph, list[str]]:
    """A copy of ``graph`` on decomposed quantization ops, bit-identical to it; and the names of
    its activation fake-quant nodes in graph order (the k-th becomes the k-th QuantizeLinear)."""
    ops = _decomposed_ops()
    twin = graph.clone()
    gather_int8_rows(twin)
    fx_graph = twin.gm.graph
    activations = []
    for node in list(fx_graph.nodes):
        if is_activation_fq(node):
            qp = qparams(node)
            spec = (qp.scale, qp.zero_point, qp.qmin, qp.qmax, _TORCH_DTYPES[qp.dtype])
            with fx_graph.inserting_before(node):
                q = fx_graph.call_function(ops.quantize_per_tensor.default, (node.args[0], *spec))
                dq = fx_graph.call_function(ops.dequantize_per_tensor.default, (q, *spec))
            activations.append(node.name)
        elif is_weight_dq(node):
            codes, scales, axis = node.args
            owner = scales.target.rpartition(".")[0]
            holder, _ = owner_and_leaf(twin.gm, scales.target)
            holder.register_buffer("weight_zero_point_i64", torch.zeros(len(twin.attr(scales.target)),
                                                                         dtype=torch.int64))
            with fx_graph.inserting_before(node):
                zero = fx_graph.get_attr(f"{owner}.weight_zero_point_i64" if owner else "weight_zero_point_i64")
                dq = fx_graph.call_function(ops.dequantize_per_channel.default,
                                            (codes, scales, zero, axis, -127, 127, torch.int8))
        else:
            continue
        dq.meta.update(node.meta)
        node.replace_all_uses_with(dq)
        fx_graph.erase_node(node)
    twin.gm.recompile()
    return twin, activations


def build(graph: Graph, opset: int = 18, dynamic_batch: bool = False) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The QDQ model, and for each activation fake-quant node of ``graph`` the name of the
    uint8/int8 tensor its QuantizeLinear produces (checked by count and scale)."""
    twin, activations = decompose(graph)
    try:
        model, _ = to_proto(twin, opset, dynamic_batch)   # the float backend's quiet torch.onnx call
    except Exception as exc:
        raise ExportError(f"onnx_int8 (torch.onnx): could not export the graph: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    if len(quantizers) != len(activations):
        raise ExportError(f"onnx_int8 (torch.onnx): {len(activations)} quantized activations in the graph but "
                          f"{len(quantizers)} QuantizeLinear nodes in the export")
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    constants.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t)
                      for n in model.graph.node if n.op_type == "Constant" and n.attribute})
    nodes = {n.name: n for n in graph.nodes}
    for name, q in zip(activations, quantizers):
        scale = constants.get(q.input[1])
        if scale is None or abs(float(scale) - qparams(nodes[name]).scale) > 1e-7 * qparams(nodes[name]).scale:
            raise ExportError(f"onnx_int8 (torch.onnx): QuantizeLinear {q.name!r} does not match node {name!r}")
    return model, {name: q.output[0] for name, q in zip(activations, quantizers)}


def _weight_layers(model: onnx.ModelProto) -> dict[str, str]:
    """ONNX MatMul/Gemm/Conv node name -> the int8 weight initializer it reads through DequantizeLinear
    (and Transpose/Reshape, which torch.onnx may put between them)."""
    producer = {out: n for n in model.graph.node for out in n.output}
    initializers = {t.name for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        for name in node.input[1:2]:
            source = producer.get(name)
            while source is not None and source.op_type in ("Transpose", "Reshape", "Identity"):
                source = producer.get(source.input[0])
            if source is not None and source.op_type == "DequantizeLinear" and source.input[0] in initializers:
                found[node.name] = source.input[0]
    return found


def fused_layers(model: onnx.ModelProto, graph: Graph, threads: int) -> tuple[list[str], dict[str, str]]:
    """IR nodes of the int8 layers that onnxruntime runs in integer kernels, and the layers left
    in float with the reason; read from the optimized model onnxruntime writes."""
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    kernels = {n.name: n.op_type for n in optimized.graph.node}
    fused = {codes for name, codes in _weight_layers(model).items() if kernels.get(name) in INTEGER_KERNELS}
    int8, floating = [], {}
    for node in graph.nodes:
        weight = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], fx.Node) else None
        if weight is None or not is_weight_dq(weight) or not (node.target is F.linear or node.target in CONV_FUNCS):
            continue   # embedding tables are weight-only: gathered, not multiplied
        if weight.args[0].target in fused:
            int8.append(node.name)
        else:
            floating[node.meta.get("graphopt.layer") or node.name] = \
                "onnxruntime did not fuse it into an integer kernel"
    return int8, floating
