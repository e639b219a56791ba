"""ONNX int8 backend: the folded simulated-quant IR lowered straight to ONNX with onnx.helper.

Two forms, both with int8 weight initializers (never float weights) and uint8 activations:
- ``qoperator``: QLinearConv, QGemm, QLinearAdd, QLinearGlobalAveragePool, QLinearConcat, and
  MaxPool/Flatten/Reshape directly on uint8 tensors;
- ``qdq``: float ops between QuantizeLinear/DequantizeLinear pairs (int32 biases), which
  onnxruntime fuses into the same integer kernels at load time.
``form="auto"`` is a rule, not a measurement, so the same graph always gives the same file:
QOperator where the direct lowering covers every op, QDQ through torch.onnx otherwise, and
LayerNormalizations after a residual add kept apart from it (onnx_layernorm).
``form="tune"`` builds both forms (and both LayerNorm variants), times them here and keeps the
faster. The weights' range is the graph's target's (graphopt.quant.targets), recorded in the file's
metadata. The artifact is checked against the IR, layer by layer: at least ``min_within_step``
of the quantized values within one step of the simulated-quant graph's, in onnxruntime where this
CPU computes the target exactly, else in onnx's reference evaluator (onnx_reference).
"""
from __future__ import annotations

import os
import time
from typing import Literal
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import fx

from graphopt.backend import ExportReport, register_backend
from graphopt.backends._onnx_runtime import OTHER_BATCH, at_batch, ort_session, ort_version, run_onnx
from graphopt.backends import onnx_float_ops as float_ops
from graphopt.backends.onnx_layernorm import layernorms_on_2d
from graphopt.errors import ConfigError, ExportError
from graphopt.files import atomic_path
from graphopt.ir import Graph
from graphopt.app.latency import interleaved_latency
from graphopt.ops import OpKind, op_name
from graphopt.registry import Registry
from graphopt.options import Count, Share
from graphopt.backends._int8_checks import (check_exportable, flatten_args, int8_mac_share,
                                            layerwise_within_one_step, output_steps, within_one_step)
from graphopt.quant.qparams import (ADD_FUNCS, CONV_FUNCS, FLOAT_REASON_KEY, QParams, is_activation_fq, is_plain_relu,
                                    is_weight_dq, qparams, quant_target)
from graphopt.quant.targets import Target, host_target
from graphopt.verify import compare_outputs

FORMS = ("auto", "qoperator", "qdq", "tune")
Form = Literal[FORMS]
MS = "com.microsoft"
_NP = {"uint8": np.uint8, "int8": np.int8}
_ONNX_INT = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8}
_INTEGER_OPS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger"}


class LoweringError(ExportError):
    """The direct lowering has no correct rule for a node (``node``, ``op``): ``lowering="auto"``
    exports the graph through torch.onnx instead."""

    def __init__(self, message: str, node: str | None = None, op: str | None = None):
        super().__init__(message)
        self.node, self.op = node, op


# Lowering rules users registered for their own layers and functions (see ``int8_lowering``).
_USER_RULES: Registry[Callable] = Registry("int8 lowering", describe=lambda key: getattr(key, "__qualname__", repr(key)))


def int8_lowering(*, module: type | None = None, function: Callable | None = None) -> Callable[[Callable], Callable]:
    """Decorator: lower a user's layer type (or a registered function) in an int8 ONNX export.
    ``rule(lowering, node, module)`` (``module`` is None for a function) emits float ONNX nodes
    through ``lowering.as_float(arg)``, ``lowering.const(stem, array)`` and
    ``lowering.emit(op, inputs, stem, **attrs)``, and returns the name of the output it computed;
    the artifact is then checked against the graph as every export is. A second rule for the
    same key is refused."""
    if (module is None) == (function is None):
        raise ConfigError("int8_lowering takes one of module= or function=")
    key = module if module is not None else function

    def decorate(rule: Callable) -> Callable:
        return _USER_RULES.add(key, rule)

    return decorate


def _user_rule(m: nn.Module | None, node: fx.Node) -> Callable | None:
    if m is not None:
        return _USER_RULES.find_type(type(m))
    return _USER_RULES.find(node.target) if node.op == "call_function" else None


def _op(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    return op_name(node) if node.op in ("call_function", "call_method") else node.op


@dataclass(frozen=True)
class _Value:
    name: str
    qp: QParams | None = None     # set: a uint8/int8 tensor on this grid (qoperator form)
    from_qp: QParams | None = None  # qdq form: a float tensor that is DequantizeLinear(q, qp)


class _Env(dict):
    """ONNX value of each lowered IR node, by name. A constant the IR reads as an operand (a
    get_attr: a ViT's class or distillation token, a position embedding) becomes a float
    initializer the first time it is read."""

    def __init__(self, lowering: "_Lowering"):
        super().__init__()
        self.lowering = lowering

    def __missing__(self, name: str) -> "_Value":
        node = self.lowering.graph_nodes.get(name)
        if node is None or node.op != "get_attr":
            raise ExportError(f"onnx_int8: node {name!r} is read before it was lowered")
        value = self.lowering.graph.attr(node.target)
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"onnx_int8: constant {name!r} ({node.target}) is a {type(value).__name__}, "
                              f"not a tensor")
        self[name] = _Value(self.lowering.const(name, value.detach().cpu().numpy()))
        return self[name]


class _Lowering:
    """Walks the IR once, emitting ONNX nodes; records which layers ran in integer kernels."""

    def __init__(self, graph: Graph, form: str, dynamic_batch: bool = True):
        self.graph, self.form = graph, form
        self.batch = "N" if dynamic_batch else None   # None: each tensor's traced batch size
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.graph_nodes = {n.name: n for n in graph.nodes}
        self.env: dict[str, _Value] = _Env(self)
        self.weights: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}   # dq node -> (int8, scales, axis)
        self.int8_layers: list[str] = []
        self.float_layers: dict[str, str] = {}
        self._uid = 0
        self._dq_cache: dict[str, str] = {}
        self.constants: dict[str, Any] = {}   # nodes computed from constants alone, folded at export

    # -- small helpers -----------------------------------------------------------------
    def fresh(self, stem: str) -> str:
        self._uid += 1
        return f"{stem}_{self._uid}"

    def emit(self, op: str, inputs: list[str], stem: str, domain: str = "", **attrs) -> str:
        out = self.fresh(stem)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def const(self, stem: str, array: np.ndarray) -> str:
        name = self.fresh(stem)
        self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    def qp_inputs(self, qp: QParams) -> list[str]:
        key = f"qp_{qp.scale!r}_{qp.zero_point}_{qp.dtype}"
        if key + "_s" not in self.inits:
            self.inits[key + "_s"] = numpy_helper.from_array(np.array(qp.scale, np.float32), key + "_s")
            self.inits[key + "_z"] = numpy_helper.from_array(np.array(qp.zero_point, _NP[qp.dtype]), key + "_z")
        return [key + "_s", key + "_z"]

    def as_float(self, arg) -> str:
        if isinstance(arg, fx.Node) and is_weight_dq(arg):
            return self.weight_float(arg)
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            return self.env[arg.name].name
        if not isinstance(arg, fx.Node):
            return self.const("c", np.array(arg, np.float32))
        value = self.env[arg.name]
        if value.qp is None:
            return value.name
        if value.name not in self._dq_cache:
            self._dq_cache[value.name] = self.emit("DequantizeLinear", [value.name, *self.qp_inputs(value.qp)], "dq")
        return self._dq_cache[value.name]

    def as_quant(self, arg: fx.Node, qp: QParams) -> str:
        value = self.env[arg.name]
        if value.qp == qp:
            return value.name
        return self.emit("QuantizeLinear", [self.as_float(arg), *self.qp_inputs(qp)], "q")

    def weight_float(self, dq: fx.Node) -> str:
        q, scales, axis = self.weight(dq)
        return self.emit("DequantizeLinear", [self.const("w_int8", q.numpy()), self.const("w_scale", scales.numpy()),
                                              self.const("w_zp", np.zeros(len(scales), np.int8))], "w", axis=axis)

    def weight(self, dq: fx.Node):
        q_node, s_node, axis = dq.args
        return self.graph.attr(q_node.target), self.graph.attr(s_node.target).float(), axis

    def int32_bias(self, bias_node, in_scale: float, w_scales: torch.Tensor) -> str | None:
        if bias_node is None:
            return None
        bias = self.graph.attr(bias_node.target).detach().double()
        return self.const("bias_int32", torch.round(bias / (in_scale * w_scales.double())).to(torch.int32).numpy())

    def quant_user(self, node: fx.Node) -> fx.Node | None:
        users = list(node.users)
        return users[0] if len(users) == 1 and is_activation_fq(users[0]) else None

    def layer_name(self, node: fx.Node) -> str:
        return node.meta.get("graphopt.layer") or self.graph.qualname(node)

    # -- lowering --------------------------------------------------------------------------
    def run(self) -> onnx.ModelProto:
        inputs, outputs = [], []
        for node in self.graph.nodes:
            if node.name in self.env:
                continue
            if node.op == "placeholder" and not isinstance(self.graph.shape(node), tuple):
                continue   # a non-tensor argument with its default (timm's ViT: attn_mask=None); never an input
            if node.op == "placeholder":
                shape = [self.batch or self.graph.shape(node)[0], *self.graph.shape(node)[1:]]
                inputs.append(helper.make_tensor_value_info(node.name, TensorProto.FLOAT, shape))
                self.env[node.name] = _Value(node.name)
            elif node.op == "get_attr":
                continue
            elif node.op == "output":
                for i, out in enumerate(flatten_args(node.args[0])):
                    name = self.emit("Identity", [self.lowered(node, self.as_float, out)], f"output_{i}")
                    shape = self.graph.shape(out)
                    outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                                 [self.batch or shape[0], *shape[1:]]
                                                                 if shape else None))
            elif is_weight_dq(node):
                continue
            else:
                self.lowered(node, self.lower, node)
        g = helper.make_graph(self.nodes, "graphopt_int8", inputs, outputs, list(self.inits.values()))
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)],
                                  producer_name="graphopt")
        model.ir_version = 9
        return model

    def lowered(self, node: fx.Node, rule, *args):
        """``rule(*args)`` for ``node``; whatever goes wrong comes out as a LoweringError that names
        the node and its op (a rule's own ExportError keeps its message)."""
        try:
            return rule(*args)
        except LoweringError:
            raise
        except ExportError as exc:
            message = str(exc) if repr(node.name) in str(exc) else f"{exc} (at node {node.name!r}, {_op(node)})"
            raise LoweringError(message, node.name, _op(node)) from exc
        except Exception as exc:
            raise LoweringError(f"onnx_int8 ({self.form}): could not lower node {node.name!r} ({_op(node)}): "
                                f"{type(exc).__name__}: {exc}", node.name, _op(node)) from exc

    def lower(self, node: fx.Node) -> None:
        if is_activation_fq(node):
            self.lower_fq(node)
            return
        if self.fold_constant(node):
            return
        x = node.args[0] if node.args else None
        quant_in = isinstance(x, fx.Node) and self.env.get(x.name, _Value("")).qp is not None
        user = self.quant_user(node)
        if node.op == "call_function" and node.target in CONV_FUNCS and is_weight_dq(node.args[1]):
            return self.lower_conv(node, quant_in, user)
        if node.op == "call_function" and node.target is F.linear and is_weight_dq(node.args[1]):
            return self.lower_linear(node, quant_in, user)
        if node.op == "call_function" and node.target in ADD_FUNCS and len(node.args) == 2 \
                and all(isinstance(a, fx.Node) for a in node.args):
            a, b = node.args
            if self.form == "qoperator" and user is not None and all(self.env[v.name].qp for v in (a, b)):
                # (a constant operand, e.g. a position embedding, has no grid: a float Add below)
                qa, qb = self.env[a.name], self.env[b.name]
                out = self.emit("QLinearAdd", [qa.name, *self.qp_inputs(qa.qp), qb.name, *self.qp_inputs(qb.qp),
                                               *self.qp_inputs(qparams(user))], "qadd", domain=MS)
                self.env[node.name] = self.env[user.name] = _Value(out, qparams(user))
                return
            self.env[node.name] = _Value(self.emit("Add", [self.as_float(a), self.as_float(b)], "add"))
            return
        self.lower_other(node, quant_in, user)

    def constant(self, arg: Any) -> Any:
        if not isinstance(arg, fx.Node):
            return arg
        return self.constants[arg.name] if arg.name in self.constants else self.graph.attr(arg.target)

    def fold_constant(self, node: fx.Node) -> bool:
        """A function or method of constants alone (a layer scale reshaped to broadcast, a bias
        table gathered) becomes an initializer holding its value."""
        parents = node.all_input_nodes
        if node.op not in ("call_function", "call_method") or not parents or is_weight_dq(node) or not all(
                p.op == "get_attr" or p.name in self.constants for p in parents) or op_name(node) in _BROADCASTS:
            return False   # (a broadcast to the traced batch size would fix the batch axis)
        args = fx.node.map_arg(node.args, self.constant)
        kwargs = fx.node.map_arg(node.kwargs, self.constant)
        with torch.no_grad():
            value = node.target(*args, **kwargs) if node.op == "call_function" else \
                getattr(args[0], node.target)(*args[1:], **kwargs)
        if not isinstance(value, torch.Tensor):
            return False
        self.constants[node.name] = value
        self.env[node.name] = _Value(self.const(node.name, value.detach().cpu().numpy()))
        return True

    def lower_fq(self, node: fx.Node) -> None:
        qp, x = qparams(node), node.args[0]
        if self.form == "qoperator":
            self.env[node.name] = _Value(self.as_quant(x, qp), qp)
            return
        q = self.emit("QuantizeLinear", [self.as_float(x), *self.qp_inputs(qp)], "q")
        self.env[node.name] = _Value(self.emit("DequantizeLinear", [q, *self.qp_inputs(qp)], "dq"), from_qp=qp)

    def conv_attrs(self, node: fx.Node) -> dict:
        args = list(node.args) + [None] * (7 - len(node.args))
        dims = CONV_FUNCS[node.target]
        q, _, _ = self.weight(node.args[1])
        stride, padding, dilation, groups = (args[3] or 1), (args[4] or 0), (args[5] or 1), (args[6] or 1)
        expand = (lambda v: list(v) if isinstance(v, (tuple, list)) else [v] * dims)
        if isinstance(padding, str):
            raise ExportError(f"onnx_int8: conv {node.name!r} uses padding={padding!r}; only explicit padding lowers")
        pads = expand(padding)
        return {"kernel_shape": list(q.shape[2:]), "strides": expand(stride), "pads": pads + pads,
                "dilations": expand(dilation), "group": int(groups)}

    def lower_conv(self, node: fx.Node, quant_in: bool, user: fx.Node | None) -> None:
        x, dq, bias = node.args[0], node.args[1], (node.args[2] if len(node.args) > 2 else None)
        q, scales, _ = self.weight(dq)
        attrs = self.conv_attrs(node)
        in_qp = self.env[x.name].qp or self.env[x.name].from_qp
        if self.form == "qoperator" and quant_in and user is not None:
            inputs = [self.env[x.name].name, *self.qp_inputs(in_qp), self.const("w_int8", q.numpy()),
                      self.const("w_scale", scales.numpy()), self.const("w_zp", np.zeros(len(scales), np.int8)),
                      *self.qp_inputs(qparams(user))]
            b = self.int32_bias(bias, in_qp.scale, scales)
            out = self.emit("QLinearConv", inputs + ([b] if b else []), "qconv", **attrs)
            self.env[node.name] = self.env[user.name] = _Value(out, qparams(user))
            self.int8_layers.append(node.name)
            return
        b = self.qdq_bias(bias, in_qp, scales) if self.form == "qdq" and in_qp else \
            (self.as_float(bias) if bias is not None else None)
        out = self.emit("Conv", [self.as_float(x), self.weight_float(dq)] + ([b] if b else []), "conv", **attrs)
        self.env[node.name] = _Value(out)
        self.record(node, in_qp is not None and user is not None)

    def qdq_bias(self, bias, in_qp: QParams, scales: torch.Tensor) -> str | None:
        b = self.int32_bias(bias, in_qp.scale, scales)
        if b is None:
            return None
        scale = self.const("bias_scale", (in_qp.scale * scales.double()).float().numpy())
        return self.emit("DequantizeLinear", [b, scale], "bias", axis=0)   # int32: zero point 0, omitted

    def record(self, node: fx.Node, fusable: bool) -> None:
        """In qdq form a DQ -> layer -> Q pattern runs in onnxruntime's integer kernels."""
        if self.form == "qdq" and fusable:
            self.int8_layers.append(node.name)
        else:
            self.float_layers[self.layer_name(node)] = "input or output not quantized"

    def lower_linear(self, node: fx.Node, quant_in: bool, user: fx.Node | None) -> None:
        x, dq, bias = node.args[0], node.args[1], (node.args[2] if len(node.args) > 2 else None)
        q, scales, _ = self.weight(dq)
        rank = len(self.graph.shape(x) or ())
        in_qp = self.env[x.name].qp or self.env[x.name].from_qp
        if self.form == "qoperator" and quant_in and user is not None and rank == 2:
            inputs = [self.env[x.name].name, *self.qp_inputs(in_qp), self.const("w_int8", q.numpy()),
                      self.const("w_scale", scales.numpy()), self.const("w_zp", np.zeros(len(scales), np.int8)),
                      self.int32_bias(bias, in_qp.scale, scales) or "", *self.qp_inputs(qparams(user))]
            out = self.emit("QGemm", inputs, "qgemm", domain=MS, transB=1)
            self.env[node.name] = self.env[user.name] = _Value(out, qparams(user))
            self.int8_layers.append(node.name)
            return
        xf = self.as_float(x)
        if rank == 2:
            b = self.qdq_bias(bias, in_qp, scales) if self.form == "qdq" and in_qp else \
                (self.as_float(bias) if bias is not None else None)
            out = self.emit("Gemm", [xf, self.weight_float(dq)] + ([b] if b else []), "gemm", transB=1)
            self.record(node, in_qp is not None and user is not None)
        else:
            wt = self.emit("Transpose", [self.weight_float(dq)], "wt", perm=[1, 0])
            out = self.emit("MatMul", [xf, wt], "matmul")
            if bias is not None:
                out = self.emit("Add", [out, self.as_float(bias)], "linear")
            self.float_layers[self.layer_name(node)] = f"rank-{rank} input (QGemm takes 2-D)"
        self.env[node.name] = _Value(out)

    def keep_grid(self, x: fx.Node, out: str, quant_in: bool) -> _Value:
        """The value of a grid-keeping op (reshape, max pool): uint8 in qoperator form; in qdq form
        re-wrapped in Q/DQ (exact: the values are on the grid) so the next layer sees a DequantizeLinear."""
        if self.form == "qoperator":
            return _Value(out, self.env[x.name].qp if quant_in else None)
        qp = self.env[x.name].from_qp
        if qp is None:
            return _Value(out)
        q = self.emit("QuantizeLinear", [out, *self.qp_inputs(qp)], "q")
        return _Value(self.emit("DequantizeLinear", [q, *self.qp_inputs(qp)], "dq"), from_qp=qp)

    def float_layer(self, node: fx.Node, m: nn.Module) -> None:
        """A conv/linear the quantization passes kept float (mixed precision, policy, no int8 kernel)."""
        w = self.const("w_fp32", m.weight.detach().numpy())
        b = [self.const("b_fp32", m.bias.detach().numpy())] if m.bias is not None else []
        if isinstance(m, nn.Linear):
            if len(self.graph.shape(node.args[0]) or ()) != 2:
                raise ExportError(f"onnx_int8: float linear {node.name!r} on a rank-3+ input is not supported")
            out = self.emit("Gemm", [self.as_float(node.args[0]), w] + b, "gemm_fp32", transB=1)
        else:
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise ExportError(f"onnx_int8: conv {node.name!r} ({node.target}) uses padding_mode={m.padding_mode!r} "
                                  f"/ padding={m.padding!r}, which this backend does not lower")
            out = self.emit("Conv", [self.as_float(node.args[0]), w] + b, "conv_fp32", kernel_shape=list(m.kernel_size),
                            strides=list(m.stride), pads=list(m.padding) * 2, dilations=list(m.dilation),
                            group=m.groups)
        self.env[node.name] = _Value(out)
        self.float_layers[str(node.target)] = node.meta.get(FLOAT_REASON_KEY, "kept float")

    def lower_other(self, node: fx.Node, quant_in: bool, user: fx.Node | None) -> None:
        """Pooling, shape ops, activations and concat: on uint8 where a kernel exists, else float."""
        m = self.graph.module(node) if node.op == "call_module" else None
        kind = self.graph.kind(node)
        x = node.args[0] if node.args else None
        qop = self.form == "qoperator"
        if kind == OpKind.IDENTITY:
            self.env[node.name] = self.env[x.name]
            return
        if is_plain_relu(self.graph, node) and quant_in and qop:   # max(q, zero point) on uint8
            xq = self.env[x.name]
            if xq.qp.zero_point == xq.qp.qmin:
                self.env[node.name] = xq
            else:
                low = self.const("relu_min", np.array(xq.qp.zero_point, _NP[xq.qp.dtype]))
                self.env[node.name] = _Value(self.emit("Clip", [xq.name, low], "qrelu"), xq.qp)
            return
        if kind == OpKind.PERMUTE:
            rank = len(self.graph.shape(x))
            swaps = op_name(node) in ("transpose", "swapaxes", "swapdims")
            dims = None if swaps else list(node.args[1:])
            if dims is None:
                a, b = (d % rank for d in node.args[1:3])
                dims = list(range(rank))
                dims[a], dims[b] = dims[b], dims[a]
            elif len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = list(dims[0])
            src = self.env[x.name].name if (qop and quant_in) else self.as_float(x)
            self.env[node.name] = self.keep_grid(x, self.emit("Transpose", [src], "transpose",
                                                              perm=[d % rank for d in dims]), quant_in)
            return
        if kind == OpKind.RESHAPE and op_name(node) in _BROADCASTS:
            raise LoweringError(f"onnx_int8: no ONNX lowering for node {node.name!r} ({op_name(node)}): a "
                                f"broadcast to sizes fixed when the graph was traced is not a Reshape",
                                node.name, op_name(node))
        if kind == OpKind.RESHAPE:
            shape = list(self.graph.shape(node))
            shape_in = self.const("shape", np.array([0, *shape[1:]], np.int64))
            src = self.env[x.name].name if (qop and quant_in) else self.as_float(x)
            self.env[node.name] = self.keep_grid(x, self.emit("Reshape", [src, shape_in], "reshape"), quant_in)
            return
        if isinstance(m, nn.MaxPool2d) or (node.op == "call_function" and node.target is F.max_pool2d):
            attrs = _pool_attrs(m, node)
            src = self.env[x.name].name if (qop and quant_in) else self.as_float(x)
            self.env[node.name] = self.keep_grid(x, self.emit("MaxPool", [src], "maxpool", **attrs), quant_in)
            return
        if _is_global_avg(m, node):
            if qop and quant_in and user is not None:
                xq = self.env[x.name]
                out = self.emit("QLinearGlobalAveragePool", [xq.name, *self.qp_inputs(xq.qp),
                                                              *self.qp_inputs(qparams(user))],
                                "qgap", domain=MS, channels_last=0)
                self.env[node.name] = self.env[user.name] = _Value(out, qparams(user))
                return
            self.env[node.name] = _Value(self.emit("GlobalAveragePool", [self.as_float(x)], "gap"))
            return
        if kind == OpKind.CONCAT:
            tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if qop and user is not None and all(self.env[t.name].qp for t in tensors):
                ins = [*self.qp_inputs(qparams(user))]
                for t in tensors:
                    ins += [self.env[t.name].name, *self.qp_inputs(self.env[t.name].qp)]
                out = self.emit("QLinearConcat", ins, "qconcat", domain=MS, axis=dim)
                self.env[node.name] = self.env[user.name] = _Value(out, qparams(user))
                return
            out = self.emit("Concat", [self.as_float(t) for t in tensors], "concat", axis=dim)
            self.env[node.name] = _Value(out)
            return
        rule = _user_rule(m, node)
        if rule is not None:
            self.env[node.name] = _Value(rule(self, node, m))
            return
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            return self.float_layer(node, m)
        op = _float_op(m, node)
        if op is None:
            out = float_ops.lower(self, node, m)   # SiLU, GELU, x * gate, means, arithmetic with constants
            if out is not None:
                self.env[node.name] = _Value(out)
                return
            raise LoweringError(f"onnx_int8: no ONNX lowering for node {node.name!r} "
                                f"({getattr(node.target, '__name__', node.target)}); keep it out of the graph "
                                f"or export with the float 'onnx' backend", node.name, _op(node))
        name, attrs, extra = op
        ins = [self.as_float(x)] + [self.const("c", np.array(v, np.float32)) for v in extra]
        self.env[node.name] = _Value(self.emit(name, ins, name.lower(), **attrs))


_BROADCASTS = {"expand", "expand_as", "broadcast_to"}


def _pool_attrs(m, node) -> dict:
    if m is not None:
        k, s, p, d, ceil = m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode
    else:
        args = list(node.args) + [None] * 6
        k, s, p, d, ceil = args[1], args[2] or args[1], args[3] or 0, args[4] or 1, bool(args[5])
    pair = (lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v])
    if pair(d) != [1, 1]:
        raise ExportError(f"onnx_int8: dilated max pooling at {node.name!r} is not supported")
    return {"kernel_shape": pair(k), "strides": pair(s), "pads": pair(p) * 2, "ceil_mode": int(ceil)}


def _is_global_avg(m, node) -> bool:
    if isinstance(m, nn.AdaptiveAvgPool2d):
        size = m.output_size
    elif node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = node.args[1]
    else:
        return False
    return size in (1, (1, 1), [1, 1])


def _float_op(m, node) -> tuple[str, dict, list] | None:
    """(ONNX op, attributes, extra constant inputs) of a single-input float activation."""
    if isinstance(m, nn.ReLU) or (node.op == "call_function" and node.target in (F.relu, torch.relu)) \
            or (node.op == "call_method" and node.target in ("relu", "relu_")):
        return "Relu", {}, []
    if isinstance(m, nn.Hardtanh):  # ReLU6 too
        return "Clip", {}, [m.min_val, m.max_val]
    if node.op == "call_function" and node.target is F.relu6:
        return "Clip", {}, [0.0, 6.0]
    if isinstance(m, nn.Sigmoid) or (node.op == "call_function" and node.target in (torch.sigmoid, F.sigmoid)):
        return "Sigmoid", {}, []
    if isinstance(m, nn.Hardswish) or (node.op == "call_function" and node.target is F.hardswish):
        return "HardSwish", {}, []
    if isinstance(m, nn.Tanh) or (node.op == "call_function" and node.target is torch.tanh):
        return "Tanh", {}, []
    return None


# -- checking and timing -------------------------------------------------------------------
def time_forms(models: dict[str, bytes], inputs, threads: int, rounds: int = 15) -> dict[str, float]:
    """Median ms per run of each model, runs interleaved."""
    sessions = {k: ort_session(v, threads) for k, v in models.items()}
    times = interleaved_latency({k: (lambda s=s: run_onnx(s, inputs)) for k, s in sessions.items()},
                                rounds=rounds, warmup=1)
    return {k: 1e3 * v for k, v in times.items()}


def quant_structure(model: onnx.ModelProto) -> dict[str, int]:
    """Counts that onnx-simplifier must not change: int8 initializers and quantization ops."""
    int8 = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer
               if t.data_type in (TensorProto.INT8, TensorProto.UINT8))
    qops = sum(1 for n in model.graph.node if n.op_type.startswith("QLinear") or n.op_type in
               ("QuantizeLinear", "DequantizeLinear", "QGemm"))
    float_bytes = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer
                      if t.data_type == TensorProto.FLOAT)
    return {"int8_initializer_bytes": int(int8), "quant_ops": qops, "float_initializer_bytes": int(float_bytes)}


def build(graph: Graph, form: str, dynamic_batch: bool = True) -> tuple[onnx.ModelProto, _Lowering]:
    lowering = _Lowering(graph, form, dynamic_batch)
    model = lowering.run()
    onnx.checker.check_model(model)
    return model, lowering


LOWERINGS = ("auto", "direct", "torch_onnx")
Lowering = Literal[LOWERINGS]


@dataclass
class _Candidate:
    """One built artifact: the model to write, the model as built (before onnxsim), which layers
    run in integer kernels, and the layer-by-layer parity check."""

    model: onnx.ModelProto
    built: onnx.ModelProto
    form: str
    lowering: str
    int8_layers: list
    float_layers: dict
    probes: dict   # IR fake-quant node -> (ONNX tensor, its QParams, or None for a float tensor)
    layernorms_2d: int = 0   # LayerNormalizations kept apart from their residual add (onnx_layernorm)
    simplify_note: str = ""  # why onnx-simplifier's result was not kept ("" when it was, or was not asked)
    direct_failed: str = ""  # why the direct lowering was not used (lowering="auto" fell back to torch.onnx)


def _direct(graph: Graph, form: str, simplify: bool, dynamic_batch: bool) -> _Candidate:
    try:
        built, lowering = build(graph, form, dynamic_batch)
    except LoweringError:
        raise
    except Exception as exc:   # the model as a whole (onnx.checker): still the lowering's failure
        raise LoweringError(f"onnx_int8 ({form}): could not build the model: {type(exc).__name__}: {exc}") from exc
    probes = _probes(graph, lowering)
    model, note = _simplify(built) if simplify else (built, "")
    return _Candidate(model, built, form, "direct", lowering.int8_layers, dict(lowering.float_layers), probes,
                      simplify_note=note)


def _through_torch_onnx(graph: Graph, simplify: bool, threads: int, dynamic_batch: bool) -> _Candidate:
    from graphopt.backends import onnx_int8_decomposed as decomposed

    built, quantized = decomposed.build(graph, dynamic_batch=dynamic_batch)
    try:
        int8_layers, float_layers = decomposed.fused_layers(built, graph, threads)
    except (TypeError, KeyError, AttributeError, IndexError, ValueError) as exc:
        raise ExportError(f"onnx_int8 (torch.onnx): could not read the integer kernels back from onnxruntime: "
                          f"{type(exc).__name__}: {exc}") from exc
    model, note = _simplify(built, fold_constants=True) if simplify else (built, "")
    nodes = {n.name: n for n in graph.nodes}
    probes = {name: (tensor, qparams(nodes[name])) for name, tensor in quantized.items()}
    return _Candidate(model, built, "qdq", "torch_onnx", int8_layers, float_layers, probes, simplify_note=note)


def _candidates(graph: Graph, form: str, lowering: str, simplify: bool, threads: int,
                dynamic_batch: bool) -> dict[str, _Candidate]:
    """The direct lowering in the requested form (both forms for ``tune``; QOperator for
    ``auto``); torch.onnx's QDQ export when asked for, or when the direct lowering has no rule
    for an op of the graph (``lowering="auto"``)."""
    if lowering == "torch_onnx":
        return {"qdq": _through_torch_onnx(graph, simplify, threads, dynamic_batch)}
    forms = {"tune": ("qoperator", "qdq"), "auto": ("qoperator",)}.get(form, (form,))
    try:
        return {f: _direct(graph, f, simplify, dynamic_batch) for f in forms}
    except LoweringError as exc:
        if lowering == "direct":
            raise
        reason = str(exc)
    return {"qdq": replace(_through_torch_onnx(graph, simplify, threads, dynamic_batch), direct_failed=reason)}


def _with_layernorms_on_2d(candidates: dict[str, _Candidate], keep_both: bool) -> dict[str, _Candidate]:
    """Each candidate whose residual adds onnxruntime would fuse into its LayerNormalizations
    gets a twin that keeps them apart (see onnx_layernorm): in place of it, or beside it when
    the forms are timed (``keep_both``)."""
    out = dict(candidates)
    for key, c in candidates.items():
        model, count = layernorms_on_2d(c.model)
        if count:
            twin = replace(c, model=model, layernorms_2d=count)
            if keep_both:
                out[f"{key}+ln2d"] = twin
            else:
                out[key] = twin
    return out


def _target_metadata(model: onnx.ModelProto, target: Target) -> None:
    """Record the target in the file, where a deployment script can read it back."""
    for key, value in (("graphopt.quant_target", target.name),
                       ("graphopt.weight_range", f"[{target.weight_qmin}, {target.weight_qmax}]")):
        entry = next((p for p in model.metadata_props if p.key == key), None) or model.metadata_props.add()
        entry.key, entry.value = key, value


@register_backend("onnx_int8")
def export(graph: Graph, path: str, *, form: Form = "auto", lowering: Lowering = "auto", simplify: bool = True,
           threads: Count = 2, min_within_step: Share = 0.99, dynamic_batch: bool = True) -> ExportReport:
    """Write the folded int8 graph at ``path`` and check it against the simulated-quant IR.

    ``form``: ``auto`` (QOperator where the direct lowering covers the graph: explicit integer
    ops, the smallest file, the kernels onnxruntime would fuse QDQ into; QDQ through torch.onnx
    otherwise), ``qoperator``, ``qdq``, or ``tune`` (build both, time them here, keep the faster).
    ``lowering``: ``direct`` (this module's op-by-op lowering), ``torch_onnx``
    (onnx_int8_decomposed: any graph torch.onnx exports, QDQ form) or ``auto``.
    The check runs in onnxruntime where this CPU computes the graph's target exactly, else in
    onnx's reference evaluator (exact integer arithmetic); the report says which.

    Options:
        form: auto, qoperator (integer ops), qdq (QuantizeLinear/DequantizeLinear pairs) or tune (the faster
            of both, timed here)
        lowering: direct (graphopt's op-by-op lowering), torch_onnx (any graph torch.onnx exports, QDQ form) or auto
        simplify: simplify the model with onnx-simplifier, keeping the Q/DQ structure
        threads: onnxruntime threads for form = "tune" timings
        min_within_step: share of outputs that must lie within one quantization step of the graph's
        dynamic_batch: make the batch axis symbolic (checked by a second run at another batch size)
    """
    check_exportable(graph, "onnx_int8", min_within_step)
    started = time.perf_counter()
    path = os.fspath(path)
    target, host = quant_target(graph), host_target()
    exact_here = host.runs_exactly(target)
    tune = form == "tune"
    candidates = _with_layernorms_on_2d(_candidates(graph, form, lowering, simplify, threads, dynamic_batch), tune)
    timings = time_forms({f: c.model.SerializeToString() for f, c in candidates.items()}, graph.example_inputs,
                         threads) if tune and len(candidates) > 1 else {}
    chosen = candidates[_pick(candidates, timings)]
    built = chosen.built
    if exact_here:
        check = f"onnxruntime on this CPU ({host.name}), whose kernels compute {target.name} exactly"
        share, worst, expected = _probe(graph, built, chosen.probes, lambda m: _ort_runner(m, threads))
    else:
        check = (f"ONNX reference evaluator (exact integer arithmetic): this CPU ({host.name}) would saturate "
                 f"{target.name}'s weights in onnxruntime")
        share, worst, expected = _probe(graph, built, chosen.probes, _reference_runner)
    if share < min_within_step:
        raise ExportError(f"onnx_int8 export of {path}: only {share:.2%} of quantized values within one step of the "
                          f"simulated-quant graph (need {min_within_step:.0%}; worst at node {worst!r}; "
                          f"target {target.name}, checked by {check}); nothing written")
    model, simplify_note = _keep_simplified(chosen, threads, graph.example_inputs, expected if exact_here else None)
    if chosen.lowering == "torch_onnx" and model is not chosen.built:
        # the integer kernels of the file written: onnxruntime fuses the simplified model's
        # DequantizeLinear -> MatMul pairs where the built one's constant subgraphs kept them apart
        from graphopt.backends import onnx_int8_decomposed as decomposed

        int8_layers, float_layers = decomposed.fused_layers(model, graph, threads)
        chosen = replace(chosen, int8_layers=int8_layers, float_layers=float_layers)
    _target_metadata(model, target)
    with atomic_path(path, ".onnx") as tmp:
        onnx.save(model, tmp)
        try:
            session = ort_session(tmp, threads)
        except Exception as exc:
            raise ExportError(f"onnx_int8 export of {path}: this onnxruntime ({ort_version()}) cannot run the "
                              f"model built for target {target.name}: {str(exc).strip().splitlines()[0]}") from exc
        outputs = [torch.from_numpy(o) for o in run_onnx(session, graph.example_inputs)]
        batch = _check_batch(session, graph, path)
        size = os.path.getsize(tmp)
    if not exact_here:   # this CPU's outputs are not the target's: report the exact ones
        outputs = [torch.from_numpy(np.asarray(e)) for e in expected]
    reference = graph.run()
    abs_err, rel_err = compare_outputs(reference, outputs)
    details = {"target": target.name, "host": host.name, "check": check, "form": chosen.form,
               "form_rule": "timed (form='tune')" if tune else ("requested" if form != "auto" else
                                                                "QOperator where the direct lowering covers the graph, else QDQ"),
               "lowering": chosen.lowering, "layernorms_2d": chosen.layernorms_2d, "batch": batch,
               "ms_by_form": {k: round(v, 3) for k, v in timings.items()},
               "within_one_step": share, "outputs_within_one_step": within_one_step(reference, outputs,
                                                                                    output_steps(graph)),
               "int8_mac_share": int8_mac_share(graph, chosen.int8_layers),
               "int8_layers": len(chosen.int8_layers), "float_layers": dict(chosen.float_layers),
               **quant_structure(model), "simplified": simplify and not simplify_note}
    if simplify_note:
        details["simplify_skipped"] = simplify_note
    if chosen.direct_failed:
        details["direct_lowering_failed"] = chosen.direct_failed
    report = ExportReport("onnx_int8", path, size, abs_err, rel_err, time.perf_counter() - started, details)
    report.runner = lambda *inputs: run_onnx(session, inputs)
    return report


def _keep_simplified(chosen: _Candidate, threads: int, inputs, built=None) -> tuple[onnx.ModelProto, str]:
    """onnx-simplifier's model where it computes what the built one does (same kernels, same
    outputs); the built model, and why, where it does not. ``built``: the built model's
    onnxruntime outputs when the parity check already ran it here (not run again)."""
    if chosen.model is chosen.built or chosen.simplify_note:
        return chosen.model, chosen.simplify_note
    if built is None:
        built = run_onnx(ort_session(chosen.built.SerializeToString(), threads), inputs)
    simplified = run_onnx(ort_session(chosen.model.SerializeToString(), threads), inputs)
    error = compare_outputs([torch.from_numpy(np.asarray(a)) for a in built],
                            [torch.from_numpy(a) for a in simplified])[1]
    if error > 1e-5:
        return chosen.built, f"onnx-simplifier changed the outputs (relative error {error:.3g}); kept the model as built"
    return chosen.model, ""


def _check_batch(session, graph: Graph, path: str) -> str:
    """``dynamic`` once a model whose batch axis is symbolic has run at another batch size too;
    ``static`` for a model with a fixed batch size (``dynamic_batch=False``, or a graph that fixes it)."""
    if not session.get_inputs() or not isinstance(session.get_inputs()[0].shape[0], str):
        return "static"
    inputs = at_batch(graph.example_inputs, OTHER_BATCH)
    try:
        outputs = run_onnx(session, inputs)
    except Exception as exc:
        raise ExportError(f"onnx_int8 export of {path}: the model does not run at batch {OTHER_BATCH} "
                          f"({str(exc).strip().splitlines()[0]}); export with dynamic_batch=False") from exc
    if any(o.ndim and o.shape[0] != OTHER_BATCH for o in outputs):
        raise ExportError(f"onnx_int8 export of {path}: at batch {OTHER_BATCH} the outputs have shapes "
                          f"{[o.shape for o in outputs]}; export with dynamic_batch=False")
    return "dynamic"


SPEED_MARGIN = 0.05   # closer than this, two forms are a tie on a shared machine


def _pick(candidates: dict[str, _Candidate], timings: dict[str, float]) -> str:
    """Without timings (the default), the one candidate. With them (``form="tune"``): the faster
    form; where both time within SPEED_MARGIN (onnxruntime usually compiles QDQ and QOperator to
    the very same kernels), the smaller file (QOperator: no bias scales stored). Between a form
    and its ``+ln2d`` twin, the twin unless it is slower by more than the margin: the fused
    kernel it avoids was never faster here (1.5-7x slower from 8 to 2048 tokens)."""
    if not timings:
        return next(iter(candidates))
    base = {k: v for k, v in timings.items() if not k.endswith("+ln2d")}
    fastest = min(base, key=base.get)
    smallest = min(base, key=lambda f: candidates[f].model.ByteSize())
    chosen = smallest if base[smallest] <= base[fastest] * (1 + SPEED_MARGIN) else fastest
    twin = f"{chosen}+ln2d"
    return twin if twin in timings and timings[twin] <= timings[chosen] * (1 + SPEED_MARGIN) else chosen


def reference_check(graph: Graph, form: str = "qoperator", pairwise_int16: bool = False) -> tuple[float, str | None]:
    """Share of quantized values within one step of the simulated-quant graph (layer by layer)
    and the worst node, for ``graph``'s direct lowering evaluated in exact integer arithmetic,
    or, with ``pairwise_int16`` (QOperator form), as x86 CPUs without VNNI compute it: what an
    AVX2 machine's check would say, on any machine."""
    built, lowering = build(graph, form)
    share, worst, _ = _probe(graph, built, _probes(graph, lowering),
                             lambda m: _reference_runner(m, pairwise_int16))
    return share, worst


def _probes(graph: Graph, lowering: _Lowering) -> dict[str, tuple[str, QParams | None]]:
    """IR fake-quant node -> the ONNX tensor that holds it and its parameters."""
    return {n.name: (lowering.env[n.name].name, lowering.env[n.name].qp) for n in graph.nodes
            if is_activation_fq(n) and n.name in lowering.env}


def _ort_runner(model: onnx.ModelProto, threads: int):
    session = ort_session(model.SerializeToString(), threads)
    return lambda inputs: (run_onnx(session, inputs), [o.name for o in session.get_outputs()])


def _reference_runner(model: onnx.ModelProto, pairwise_int16: bool = False):
    from graphopt.backends.onnx_reference import evaluate

    names = [i.name for i in model.graph.input]
    return lambda inputs: (evaluate(model, {n: np.ascontiguousarray(t.detach().cpu().numpy())
                                            for n, t in zip(names, inputs)}, pairwise_int16),
                           [o.name for o in model.graph.output])


def _probe(graph: Graph, model: onnx.ModelProto, probes: dict[str, tuple[str, QParams | None]], runner):
    """Run the built model once (by ``runner``: onnxruntime or the reference evaluator) with every
    probed tensor as an extra output: the share of quantized values within one step of the
    simulated-quant graph layer by layer (each layer fed the artifact's own inputs), the worst
    node, and the model's own outputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    listed = {o.name for o in probe.graph.output}
    for node_name, (tensor, qp) in probes.items():
        if tensor not in known:
            raise ExportError(f"onnx_int8: the model has no tensor {tensor!r} for quantized node {node_name!r}")
        if tensor not in listed:   # one tensor may carry several IR nodes (merged by the exporter)
            listed.add(tensor)
            elem = TensorProto.FLOAT if qp is None else _ONNX_INT[qp.dtype]
            probe.graph.output.append(helper.make_tensor_value_info(tensor, elem, None))
    values, names = runner(probe)(graph.example_inputs)
    by_name = dict(zip(names, values))
    artifact = {}
    for node_name, (tensor, qp) in probes.items():
        array = np.asarray(by_name[tensor]).astype(np.float32)
        if qp is not None:
            array = (array - qp.zero_point) * np.float32(qp.scale)
        artifact[node_name] = torch.from_numpy(array)
    share, worst = layerwise_within_one_step(graph, graph.example_inputs, artifact)
    return share, worst, values[:len(model.graph.output)]


def _simplify(model: onnx.ModelProto, fold_constants: bool = False) -> tuple[onnx.ModelProto, str]:
    """onnx-simplifier, by default without constant folding (which could re-expand int8 weights
    to float; torch.onnx exports need it for their shape arithmetic). Where it fails or changes
    the quantization structure, the model as built, and why."""
    import onnxsim

    before = quant_structure(model)
    try:
        simplified, ok = onnxsim.simplify(model, skip_constant_folding=not fold_constants, skip_fuse_bn=True)
    except Exception as exc:
        return model, f"onnx-simplifier failed ({type(exc).__name__}: {str(exc).strip()[:200]}); kept the model as built"
    after = quant_structure(simplified) if ok else None
    if not ok or after["int8_initializer_bytes"] < 0.99 * before["int8_initializer_bytes"] or \
            after["quant_ops"] != before["quant_ops"] or \
            after["float_initializer_bytes"] > before["float_initializer_bytes"]:
        return model, f"onnx-simplifier changed the quantization structure ({before} -> {after}); kept the model as built"
    return simplified, ""
