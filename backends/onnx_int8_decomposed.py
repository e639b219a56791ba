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
import torch.utils._pytree as pytree
from torch import fx

from graphopt.errors import ExportError
from graphopt.backends._onnx_runtime import to_proto
from graphopt.ir import Graph, owner_and_leaf
from graphopt.quant.qparams import CONV_FUNCS, is_activation_fq, is_weight_dq, qparams
from graphopt.backends._int8_checks import gather_int8_rows

INTEGER_KERNELS = {"MatMulIntegerToFloat", "QLinearMatMul", "QLinearConv", "QGemm", "MatMulInteger",
                   "ConvInteger", "DynamicQuantizeMatMul", "QAttention"}
_TORCH_DTYPES = {"uint8": torch.uint8, "int8": torch.int8}


def _decomposed_ops():
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
    return torch.ops.quantized_decomposed


def live_nodes(graph: Graph) -> set[str]:
    """Names of the nodes the graph's outputs depend on. Captures keep dead code (torch.export
    leaves e.g. a Hugging Face pooler whose output the wrapper drops), which torch.onnx's
    optimizer removes: a quantized activation there has no QuantizeLinear in the export."""
    output = next(n for n in graph.nodes if n.op == "output")
    live, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node.name not in live:
            live.add(node.name)
            stack.extend(node.all_input_nodes)
    return live


def decompose(graph: Graph) -> tuple[Graph, list[str]]:
    """A copy of ``graph`` on decomposed quantization ops, bit-identical to it; and the names of
    the activation fake-quant nodes the outputs depend on, in graph order. The copy returns, after
    its own outputs, the quantized (uint8/int8) tensor of each of those activations, in the same
    order. Graph outputs survive torch.onnx's optimizer (dead-code removal, common subexpression
    elimination), so the k-th extra output leads to the k-th activation's QuantizeLinear whatever
    the optimizer merged, moved or removed around it; counting QuantizeLinear nodes in graph order
    did not (a dead pooler's quantizers vanish, equal quantizers of one tensor merge)."""
    ops = _decomposed_ops()
    twin = graph.clone()
    gather_int8_rows(twin)
    fx_graph = twin.gm.graph
    live = live_nodes(twin)
    activations, quantized = [], []
    for node in list(fx_graph.nodes):
        try:
            if is_activation_fq(node):
                qp = qparams(node)
                spec = (qp.scale, qp.zero_point, qp.qmin, qp.qmax, _TORCH_DTYPES[qp.dtype])
                with fx_graph.inserting_before(node):
                    q = fx_graph.call_function(ops.quantize_per_tensor.default, (node.args[0], *spec))
                    dq = fx_graph.call_function(ops.dequantize_per_tensor.default, (q, *spec))
                if node.name in live:
                    activations.append(node.name)
                    quantized.append(q)
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
        except (TypeError, KeyError, AttributeError, ValueError) as exc:
            raise ExportError(f"onnx_int8 (torch.onnx): could not rewrite node {node.name!r} "
                              f"({_op(node)}) onto torch's quantization ops: {type(exc).__name__}: {exc}") from exc
        dq.meta.update(node.meta)
        node.replace_all_uses_with(dq)
        fx_graph.erase_node(node)
    _append_outputs(fx_graph, quantized)
    twin.gm.recompile()
    return twin, activations


def _op(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _append_outputs(fx_graph: fx.Graph, extra: list[fx.Node]) -> None:
    """Make ``extra`` the last outputs of ``fx_graph``, after its own (flattened) outputs; a graph
    that torch.export captured keeps its output structure (pytree spec), extended by a tuple."""
    if not extra:
        return
    output = next(n for n in fx_graph.nodes if n.op == "output")
    codegen = fx_graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None and info.out_spec is not None:
        leaves = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
        original = pytree.tree_unflatten(list(range(len(leaves))), info.out_spec)
        codegen.pytree_info = info._replace(out_spec=pytree.tree_structure((original, tuple(range(len(extra))))))
        output.args = (tuple(leaves) + tuple(extra),)
    else:
        output.args = ((output.args[0], tuple(extra)),)


def build(graph: Graph, opset: int = 18, dynamic_batch: bool = False) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The QDQ model, and for each activation fake-quant node of ``graph`` that its outputs depend
    on, the name of the uint8/int8 tensor its QuantizeLinear produces: found through the extra
    output ``decompose`` gave it (not by counting QuantizeLinear nodes), its scale and zero point
    checked; the extra outputs are then removed."""
    twin, activations = decompose(graph)
    try:
        model, _ = to_proto(twin, opset, dynamic_batch)   # the float backend's quiet torch.onnx call
    except Exception as exc:
        raise ExportError(f"onnx_int8 (torch.onnx): could not export the graph: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    outputs = [o.name for o in model.graph.output]
    if len(outputs) < len(activations):
        raise ExportError(f"onnx_int8 (torch.onnx): the export has {len(outputs)} outputs, fewer than the "
                          f"{len(activations)} quantized activations it was asked to return")
    extra = outputs[len(outputs) - len(activations):]
    producer = {out: n for n in model.graph.node for out in n.output}
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    constants.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t)
                      for n in model.graph.node if n.op_type == "Constant" and n.attribute})
    nodes = {n.name: n for n in graph.nodes}
    found, passthrough = {}, set()
    for name, tensor in zip(activations, extra):
        source = producer.get(tensor)
        while source is not None and source.op_type == "Identity":   # the exporter's output copies
            passthrough.add(source.output[0])
            tensor = source.input[0]
            source = producer.get(tensor)
        qp = qparams(nodes[name])
        if source is None or source.op_type != "QuantizeLinear":
            what = "a constant" if tensor in constants else (f"a {source.op_type} node" if source else "a graph input")
            raise ExportError(f"onnx_int8 (torch.onnx): the quantized activation of node {name!r} is {what} in "
                              f"the export, not a QuantizeLinear (torch.onnx folded or rewrote it)")
        scale = constants.get(source.input[1])
        zero = constants.get(source.input[2]) if len(source.input) > 2 and source.input[2] else None
        if scale is None or scale.size != 1 or abs(float(scale) - qp.scale) > 1e-7 * qp.scale or \
                (zero is not None and int(zero) != qp.zero_point):
            raise ExportError(f"onnx_int8 (torch.onnx): QuantizeLinear {source.name!r} (returned for node "
                              f"{name!r}) does not have its scale {qp.scale!r} and zero point {qp.zero_point}")
        found[name] = tensor
    _drop_outputs(model, len(outputs) - len(activations), passthrough)
    return model, found


def _drop_outputs(model: onnx.ModelProto, keep: int, passthrough: set[str]) -> None:
    """Remove all but the first ``keep`` graph outputs, and the Identity nodes that only copied
    a removed output."""
    del model.graph.output[keep:]
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    while True:
        dead = [n for n in model.graph.node if n.op_type == "Identity" and n.output[0] in passthrough
                and n.output[0] not in used]
        if not dead:
            return
        for n in dead:
            model.graph.node.remove(n)
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}


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
