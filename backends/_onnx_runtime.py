"""torch.onnx export and onnxruntime sessions, shared by the ONNX backends (private: no
registered backend imports another, they all import this)."""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx as onnx_lib
import onnxruntime as ort
import torch

from graphopt.ir import Graph


def to_proto(graph: Graph, opset: int, dynamic_batch: bool = False) -> tuple[onnx_lib.ModelProto, str]:
    """torch.onnx (dynamo exporter) on the GraphModule, quietly; and the batch axis it has.

    A graph captured by torch.export keeps the shapes it was captured with (symbolic where its
    ``dynamic_shapes`` said so; its guards fix the rest). A torch.fx graph, with ``dynamic_batch``,
    has every tensor input's first axis symbolic (exported from a batch of two where the example has
    one, since torch.export specialises sizes 0 and 1); a graph whose code fixes the batch size
    is exported static, and the returned note says why."""
    shapes, inputs, batch = graph.dynamic_shapes, graph.example_inputs, "as captured"
    if shapes is None:
        batch = "static"
        if dynamic_batch and graph.captured_by == "torch.fx":
            shapes, inputs = _batch_axes(graph.example_inputs)
            batch = "dynamic"
    try:
        return _export(graph.gm, inputs, opset, shapes), batch
    except Exception as exc:
        if batch != "dynamic":
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _export(graph.gm, graph.example_inputs, opset, None), f"static (torch.export: {reason[:200]})"


def _export(gm, inputs, opset: int, shapes) -> onnx_lib.ModelProto:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _for_torch_onnx(gm):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(gm, tuple(inputs), dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                                    external_data=False, verbose=False)
    return program.model_proto


_PERMUTES = {"transpose", "permute", "swapaxes", "swapdims", "t"}
_VIEWS = {"reshape", "view", "flatten"}


def _name(node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return target if isinstance(target, str) else getattr(target, "__name__", "")


@contextlib.contextmanager
def _for_torch_onnx(gm):
    """torch.onnx decomposes the re-exported graph on fake tensors, whose strides after
    ``scaled_dot_product_attention`` are not the CPU kernel's: a ``reshape`` of the transposed
    result becomes a ``view`` that then fails ('Cannot view a tensor', timm's and Hugging Face's
    attention), and an ``aten.contiguous`` there is dropped (Swin). For the export, the tensor
    such a reshape reads is cloned to a contiguous one (torch.onnx writes an Identity), and
    ``contiguous`` is the clone it stands for; attention on 5-D tensors is made 4-D. The graph is
    restored afterwards."""
    graph = gm.graph
    renamed = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.contiguous.default
               and not n.kwargs and len(n.args) == 1]
    for node in renamed:
        node.target, node.kwargs = torch.ops.aten.clone.default, {"memory_format": torch.contiguous_format}
    clones = []
    for node in list(graph.nodes):
        source = node.args[0] if node.op in ("call_function", "call_method") and node.args else None
        if _name(node) in _VIEWS and getattr(source, "op", None) in ("call_function", "call_method") \
                and _name(source) in _PERMUTES:
            with graph.inserting_before(node):
                clone = graph.call_function(torch.clone, (source,), {"memory_format": torch.contiguous_format})
            node.replace_input_with(source, clone)
            clones.append(clone)
    attention = _attention_on_4d(graph)
    if renamed or clones or attention:
        gm.recompile()
    try:
        yield
    finally:
        for node in renamed:
            node.target, node.kwargs = torch.ops.aten.contiguous.default, {}
        for clone in clones:
            clone.replace_all_uses_with(clone.args[0])
            graph.erase_node(clone)
        for node, args, kwargs, flat, out in attention:
            out.replace_all_uses_with(node)
            graph.erase_node(out)
            node.args, node.kwargs = args, kwargs
            for f in flat:
                graph.erase_node(f)
        if renamed or clones or attention:
            gm.recompile()


def _attention_on_4d(graph) -> list:
    """torch.onnx writes scaled_dot_product_attention for 4-D query, key and value only; timm's
    Hiera attends over (batch, heads, windows, tokens, dim), SAM's ViT over (batch x heads, tokens,
    dim). The first two axes are merged for the call and split again after it, or a leading axis
    is added and removed; a mask of the same rank likewise."""
    from graphopt.shapes import SHAPE_KEY

    done = []
    for node in list(graph.nodes):
        if node.op != "call_function" or _name(node) != "scaled_dot_product_attention" or len(node.args) < 3:
            continue
        shape = node.args[0].meta.get(SHAPE_KEY) if isinstance(node.args[0], torch.fx.Node) else None
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        mask_shape = mask.meta.get(SHAPE_KEY) if isinstance(mask, torch.fx.Node) else None
        if not (isinstance(shape, tuple) and len(shape) in (3, 5)) or \
                (mask is not None and not (isinstance(mask_shape, tuple) and len(mask_shape) == len(shape))):
            continue
        args, kwargs = node.args, node.kwargs
        with graph.inserting_before(node):
            flat = [graph.call_function(torch.flatten, (t, 0, 1)) if len(shape) == 5
                    else graph.call_function(torch.unsqueeze, (t, 0)) for t in (*args[:3], mask) if t is not None]
        if mask is not None and len(args) > 3:
            node.args = (*flat, *args[4:])
        else:
            node.args = (*flat[:3], *args[3:])
            if mask is not None:
                node.kwargs = {**kwargs, "attn_mask": flat[3]}
        with graph.inserting_after(node):
            out = graph.call_function(torch.unflatten, (node, 0, (-1, shape[1]))) if len(shape) == 5 \
                else graph.call_function(torch.squeeze, (node, 0))
        node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
        done.append((node, args, kwargs, flat, out))
    return done


def _batch_axes(inputs: tuple) -> tuple[tuple, tuple]:
    """torch.export dynamic_shapes with axis 0 of every tensor input named ``batch``, and
    inputs of at least two rows to trace with."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    shapes, wide = [], []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim():
            shapes.append({0: batch})
            wide.append(x if x.shape[0] > 1 else torch.cat([x, x]))
        else:
            shapes.append(None)
            wide.append(x)
    return tuple(shapes), tuple(wide)


def ort_version() -> str:
    return ort.__version__


def ort_session(model: str | bytes, threads: int = 0) -> ort.InferenceSession:
    """A CPU session on a file path or serialized model; with ``threads``, that many intra-op
    threads and no spinning (so it can be timed interleaved with torch without slowing it)."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_onnx(session: ort.InferenceSession, inputs: tuple) -> list[np.ndarray]:
    feed = {meta.name: np.ascontiguousarray(t.detach().cpu().numpy())
            for meta, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feed)


OTHER_BATCH = 3   # the batch size a model with a symbolic batch axis is checked at, besides the example's


def at_batch(inputs: tuple, n: int) -> tuple:
    """``inputs`` with ``n`` rows (their rows repeated), to run a model at another batch size."""
    return tuple(torch.cat([x] * n)[:n] if isinstance(x, torch.Tensor) and x.dim() else x for x in inputs)
