"""TorchScript int8 backend: the folded simulated-quant IR rebuilt on torch's int8 kernels.

Each conv/linear whose input is quantized and whose output feeds a fake-quant becomes a quantized
module (fused clamps ride on the output's zero point), quantized adds and concats call the
quantized ops, max pooling / reshapes / average pooling run on quantized tensors, and anything
else runs in float between dequantize and quantize. All torch int8 calls go through
``torch_int8_kernels`` (the adapter). The result is scripted, saved, reloaded and checked:
at least ``min_within_step`` of the outputs within one quantization step of the IR's.
"""
from __future__ import annotations

import json
import os
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from graphopt.backend import ExportReport, register_backend
from graphopt.backends import torch_int8_kernels as kernels
from graphopt.backends.parity import module_runner
from graphopt.errors import ConfigError, ExportError
from graphopt.files import atomic_path
from graphopt.ir import Graph
from graphopt.ops import OpKind
from graphopt.options import Share
from graphopt.backends._int8_checks import (check_exportable, gather_int8_rows, int8_mac_share,
                                            layerwise_within_one_step, output_steps, within_one_step)
from graphopt.quant.qparams import (ADD_FUNCS, CONV_FUNCS, QParams, is_activation_fq, is_weight_dq, keeps_grid, qparams,
                                    quant_target)
from graphopt.quant.targets import host_target
from graphopt.verify import compare_outputs, node_values

_AVG_POOLS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)
_AVG_POOL_FUNCS = {F.adaptive_avg_pool2d, F.avg_pool2d}


class _Rebuild:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.root = nn.Module()
        self.g = fx.Graph()
        self.env: dict[str, tuple[fx.Node, QParams | None]] = {}
        self.int8_layers: list[str] = []
        self.float_layers: dict[str, str] = {}
        self._count = 0
        self._float_cache: dict[str, fx.Node] = {}

    def add_module(self, module: nn.Module, stem: str) -> str:
        self._count += 1
        name = f"{stem.replace('.', '_')}_{self._count}"
        self.root.add_module(name, module)
        return name

    def as_float(self, arg):
        if not isinstance(arg, fx.Node):
            return arg
        node, qp = self.env[arg.name]
        if qp is None:
            return node
        if arg.name not in self._float_cache:
            self._float_cache[arg.name] = self.g.call_function(kernels.dequantize, (node,))
        return self._float_cache[arg.name]

    def as_quant(self, arg: fx.Node, qp: QParams) -> fx.Node:
        node, have = self.env[arg.name]
        if have == qp:
            return node
        return self.g.call_function(kernels.quantize, (self.as_float(arg), qp.scale, qp.zero_point))

    def user_fq(self, node: fx.Node) -> fx.Node | None:
        users = list(node.users)
        return users[0] if len(users) == 1 and is_activation_fq(users[0]) else None

    def quantized(self, arg) -> bool:
        return isinstance(arg, fx.Node) and arg.name in self.env and self.env[arg.name][1] is not None

    def run(self) -> fx.GraphModule:
        for node in self.graph.nodes:
            if node.name in self.env or node.op == "get_attr" or _weight_constant(node):
                continue
            if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
                continue   # torch.export's input-shape guards: Python-only, nothing reads them
            if node.op == "placeholder":
                self.env[node.name] = (self.g.placeholder(node.name), None)
            elif node.op == "output":
                self.g.output(fx.node.map_arg(_unflattened(self.graph, node.args[0]), self.as_float))
            elif is_activation_fq(node):
                qp = qparams(node)
                if qp.dtype != "uint8":
                    raise ConfigError("backend 'torchscript_int8': torch's x86 kernels take uint8 activations; "
                                      "quantize with activation_dtype='uint8'")
                self.env[node.name] = (self.as_quant(node.args[0], qp), qp)
            else:
                self.lower(node)
        return fx.GraphModule(self.root, self.g)

    def lower(self, node: fx.Node) -> None:
        user = self.user_fq(node)
        x = node.args[0] if node.args else None
        if node.op == "call_function" and (node.target in CONV_FUNCS or node.target is F.linear) \
                and is_weight_dq(node.args[1]):
            if self.quantized(x) and user is not None:
                return self.quantized_layer(node, user)
            if self.quantized(x) and node.target is F.linear:
                return self.quantized_layer(node, None)
            self.float_layers[node.meta.get("graphopt.layer", node.name)] = "input or output not quantized"
        if node.op == "call_function" and node.target in ADD_FUNCS and len(node.args) == 2 and user is not None \
                and all(self.quantized(a) for a in node.args):
            qp = qparams(user)
            out = self.g.call_function(kernels.add, (self.env[node.args[0].name][0], self.env[node.args[1].name][0],
                                                      qp.scale, qp.zero_point))
            self.env[node.name] = self.env[user.name] = (out, qp)
            return
        if self.graph.kind(node) == OpKind.CONCAT and user is not None and all(self.quantized(t) for t in node.args[0]):
            qp = qparams(user)
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            out = self.g.call_function(kernels.cat, ([self.env[t.name][0] for t in node.args[0]], dim,
                                                      qp.scale, qp.zero_point))
            self.env[node.name] = self.env[user.name] = (out, qp)
            return
        m = self.graph.module(node) if node.op == "call_module" else None
        on_quantized = keeps_grid(self.graph, node) or isinstance(m, _AVG_POOLS) or \
            (node.op == "call_function" and node.target in _AVG_POOL_FUNCS)   # torch also averages uint8
        if on_quantized and self.quantized(x) and len(node.all_input_nodes) == 1:
            self.env[node.name] = (self.copy(node, lambda a: self.env[a.name][0]), self.env[x.name][1])
            return
        self.env[node.name] = (self.copy(node, self.as_float), None)

    def copy(self, node: fx.Node, arg_fn) -> fx.Node:
        """The same op in the new graph (submodules and constants carried over)."""
        def lookup(a: fx.Node):
            if a.op == "get_attr":
                return self.constant(a)
            if _weight_constant(a):
                q, s, axis = a.args
                return self.g.call_function(a.target, (self.constant(q), self.constant(s), axis))
            return arg_fn(a)

        new = self.g.node_copy(node, lookup)
        if isinstance(new.target, torch._ops.OpOverload):   # torch.export's aten.op.overload: TorchScript
            if new.target is torch.ops.aten.sym_size.int:    # resolves the packet by schema instead
                new.op, new.target = "call_method", "size"
            else:
                new.target = new.target.overloadpacket
        if node.op == "call_module":
            new.target = self.add_module(self.graph.module(node), str(node.target))
        return new

    def constant(self, node: fx.Node) -> fx.Node:
        name = f"const_{node.name}"
        if not hasattr(self.root, name):
            value = self.graph.attr(node.target)
            if isinstance(value, nn.Parameter):
                self.root.register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=False))
            else:
                self.root.register_buffer(name, value.detach().clone())
        return self.g.get_attr(name)

    def quantized_layer(self, node: fx.Node, user: fx.Node | None) -> None:
        """An int8 conv/linear; without a quantized ``user`` (a Linear the IR leaves with a float
        output), the kernel that quantizes its input with the IR's parameters and returns float."""
        x, dq = node.args[0], node.args[1]
        bias_node = node.args[2] if len(node.args) > 2 else None
        q, s = self.graph.attr(dq.args[0].target), self.graph.attr(dq.args[1].target)
        bias = self.graph.attr(bias_node.target) if bias_node is not None else None
        if user is None:
            qp = self.env[x.name][1]
            module = kernels.linear_float_output(q, s, bias, qp.scale, qp.zero_point)
            name = self.add_module(module, node.meta.get("graphopt.layer", node.name))
            self.env[node.name] = (self.g.call_module(name, (self.as_float(x),)), None)
            self.int8_layers.append(node.name)
            return
        qp = qparams(user)
        if node.target is F.linear:
            module = kernels.linear(q, s, bias, qp.scale, qp.zero_point)
        else:
            args = list(node.args) + [None] * (7 - len(node.args))
            module = kernels.conv(q, s, bias, args[3] or 1, args[4] or 0, args[5] or 1, args[6] or 1,
                                  qp.scale, qp.zero_point)
        name = self.add_module(module, node.meta.get("graphopt.layer", node.name))
        out = self.g.call_module(name, (self.env[x.name][0],))
        self.env[node.name] = self.env[user.name] = (out, qp)
        self.int8_layers.append(node.name)


def _weight_constant(node: fx.Node) -> bool:
    """A dequantized int8 weight constant (read where used), not dequantized gathered rows."""
    return is_weight_dq(node) and node.args[0].op == "get_attr"


def _unflattened(graph: Graph, outputs):
    """A torch.export graph returns its flat outputs through a pytree spec; a single tensor
    stays a single tensor in the rebuilt module (tuples and other trees stay flat tuples)."""
    spec = getattr(graph.gm, "_out_spec", None)
    if spec is not None and isinstance(outputs, (tuple, list)) and len(outputs) == 1:
        import torch.utils._pytree as pytree
        if pytree.tree_unflatten([0], spec) == 0:
            return outputs[0]
    return outputs


def build_int8_module(graph: Graph) -> tuple[torch.jit.ScriptModule, _Rebuild, fx.GraphModule]:
    kernels.use_engine()
    graph = graph.clone()
    gather_int8_rows(graph)
    rebuild = _Rebuild(graph)
    gm = rebuild.run()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(gm), rebuild, gm


def _layerwise_parity(graph: Graph, gm: fx.GraphModule, rebuild: _Rebuild):
    """(share within one step, worst node, the built module's outputs) from one run of ``gm``."""
    values = node_values(gm, graph.example_inputs)
    artifact = {}
    for node in graph.nodes:
        if is_activation_fq(node) and node.name in rebuild.env:
            value = values[rebuild.env[node.name][0].name]
            artifact[node.name] = value.dequantize() if value.is_quantized else value
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return (*layerwise_within_one_step(graph, graph.example_inputs, artifact), values[output.name])


@register_backend("torchscript_int8")
def export(graph: Graph, path: str, *, min_within_step: Share = 0.99) -> ExportReport:
    """Rebuild ``graph`` on torch's int8 kernels, script, save, reload and check it.

    Options:
        min_within_step: share of outputs that must lie within one quantization step of the graph's
    """
    check_exportable(graph, "torchscript_int8", min_within_step)
    started = time.perf_counter()
    path = os.fspath(path)
    target, host = quant_target(graph), host_target()
    if not host.runs_exactly(target):
        raise ExportError(f"torchscript_int8 export of {path}: the graph is quantized for {target.name}, whose "
                          f"weights torch's int8 kernels on this CPU ({host.name}) would saturate, so the module "
                          f"cannot be checked here; export it on a {target.name} machine, or quantize with "
                          f"target='{host.name}' (the ONNX backend checks other targets exactly)")
    try:
        module, rebuild, gm = build_int8_module(graph)
    except (ConfigError, ExportError):
        raise
    except Exception as exc:
        raise ExportError(f"torchscript_int8: could not build the int8 module: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0]}") from exc
    with atomic_path(path, ".pt") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(module, tmp, _extra_files={"graphopt.json": json.dumps(
            {"quant_target": target.name, "weight_range": [target.weight_qmin, target.weight_qmax]})})
        reloaded = torch.jit.load(tmp)
        with torch.no_grad():
            outputs = reloaded(*graph.example_inputs)
        reference = graph.run()
        share, worst, built = _layerwise_parity(graph, gm, rebuild)
        if compare_outputs(built, outputs)[1] > 1e-6:
            raise ExportError(f"torchscript_int8 export of {path}: the reloaded module's outputs differ "
                              f"from the built one's")
        if share < min_within_step:
            raise ExportError(f"torchscript_int8 export of {path}: only {share:.2%} of quantized values within one "
                              f"step of the simulated-quant graph (need {min_within_step:.0%}; worst at node "
                              f"{worst!r}); nothing written")
        size = os.path.getsize(tmp)
    abs_err, rel_err = compare_outputs(reference, outputs)
    details = {"target": target.name, "host": host.name,
               "check": f"torch's {torch.backends.quantized.engine} kernels on this CPU ({host.name})",
               "engine": torch.backends.quantized.engine, "within_one_step": share,
               "outputs_within_one_step": within_one_step(reference, outputs, output_steps(graph)),
               "int8_mac_share": int8_mac_share(graph, rebuild.int8_layers), "int8_layers": len(rebuild.int8_layers),
               "float_layers": dict(rebuild.float_layers)}
    report = ExportReport("torchscript_int8", path, size, abs_err, rel_err, time.perf_counter() - started, details)
    report.runner = module_runner(reloaded)
    return report

