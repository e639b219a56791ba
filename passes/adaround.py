"""AdaRound as a pass: learn each conv/linear weight's rounding on calibration data, layer by
layer (each layer sees the inputs the already-rounded layers before it produce), then freeze it.

Two grids: after ``insert_qdq`` the weights' int8 fake-quant nodes fix the grid (scales, zero
points, the target's code range), and the float weights are moved onto the learned codes so the
fake-quant, and every int8 backend, reproduce them exactly. On a float graph, ``bits`` names the
grid ``quantize_weights`` will use (per-channel symmetric, fp16-exact scales): the weights are
moved onto learned codes of that grid, so ``quantize_weights(bits=...)`` after it changes
nothing (each channel's largest weight keeps its nearest code, so its scale is unchanged).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx
from tqdm.auto import tqdm

from graphopt.errors import ConfigError
from graphopt.ir import Graph
from graphopt.layer_selection import LayerSelection
from graphopt.options import Count, NonNegative, Positive, Tolerance
from graphopt.pass_base import Contract, Pass, PassContext, PassResult, register_pass
from graphopt.quant.adaround import learn_rounding
from graphopt.quant.calibration import iter_calibration
from graphopt.quant.qparams import is_weight_fq
from graphopt.quant.weights import channel_scales, weight_layers

BITS = (2, 4, 8)


class _Stop(Exception):
    pass


class _Capture(fx.Interpreter):
    """Runs the graph up to node ``name`` and keeps its arguments."""

    def __init__(self, gm: fx.GraphModule, name: str):
        super().__init__(gm)
        self.name, self.call = name, None

    def run_node(self, n: fx.Node):
        if n.name == self.name:
            self.call = self.fetch_args_kwargs_from_env(n)
            raise _Stop
        return super().run_node(n)


def _layer_inputs(graph: Graph, node: fx.Node, batches: list[tuple]) -> tuple[list[torch.Tensor], tuple]:
    xs, call = [], None
    for inputs in batches:
        capture = _Capture(graph.gm, node.name)
        try:
            with torch.no_grad():
                capture.run(*inputs)
        except _Stop:
            pass
        call = capture.call
        xs.append(call[0][0].detach())
    return xs, call


def _module_apply(module: nn.Module):
    if isinstance(module, nn.Linear):
        return lambda x, w: F.linear(x, w, module.bias)
    return lambda x, w: module._conv_forward(x, w, module.bias)


def _along(values: torch.Tensor, axis: int, dim: int) -> torch.Tensor:
    shape = [1] * dim
    shape[axis] = -1
    return values.reshape(shape)


@register_pass("adaround")
class AdaRound(Pass):
    """Learn each conv/linear weight's rounding on calibration data (AdaRound), then freeze it.

    Options:
        bits: weight-only grid (2, 4 or 8) for a float graph that quantize_weights will quantize; leave unset
            after insert_qdq, whose int8 grid is used
        iterations: optimisation steps per layer
        lr: learning rate (Adam) of the rounding variables
        reg_weight: weight of the term that pushes every rounding variable to 0 or 1
        max_batches: calibration batches whose layer inputs are learned on
        layers: only these layers (module name patterns)
        exclude: layers left at nearest rounding (module name patterns)
        bound: largest relative output error the verification accepts (default: the pass manager's)
        progress: show a progress bar
    """

    contract = Contract.BOUNDED
    requires = frozenset({"calibration_data"})
    preserves = frozenset({"shapes", "cost", "channel_groups"})   # weight values move, nothing else

    def __init__(self, bits: int | None = None, iterations: Count = 300, lr: Positive = 1e-2,
                 reg_weight: NonNegative = 0.01, max_batches: Count = 4, layers: list[str] | None = None,
                 exclude: list[str] | None = None, bound: Tolerance | None = None, progress: bool = True):
        if bits is not None and (isinstance(bits, bool) or bits not in BITS):
            raise ConfigError(f"pass 'adaround': bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")
        self.bits, self.iterations, self.lr, self.reg_weight = bits, iterations, lr, reg_weight
        self.max_batches, self.layers, self.exclude = max_batches, layers, exclude
        self.bound, self.progress = bound, progress

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        batches = list(iter_calibration(graph, ctx.data.get("calibration_data"), self.max_batches,
                                        progress=False, desc="adaround"))
        quantized = [n for n in graph.nodes if n.op == "call_function" and len(n.args) > 1
                     and isinstance(n.args[1], fx.Node) and is_weight_fq(n.args[1])
                     and n.args[1].args[0].op == "get_attr"]
        if quantized and self.bits is not None:
            raise ConfigError("adaround: this graph's weights already have an int8 grid (from insert_qdq); bits= is "
                              "for float graphs that quantize_weights will quantize")
        if not quantized and self.bits is None:
            raise ConfigError("adaround: the graph has no fake-quantized weights (run insert_qdq first for int8) and "
                              "no bits= for weight-only rounding (then quantize_weights with the same bits)")
        if quantized:
            selection = LayerSelection.of(self.layers, self.exclude)
            owner = lambda n: n.args[1].args[0].target.rsplit(".", 1)[0]  # noqa: E731
            selection.check([owner(n) for n in quantized], "pass 'adaround'")
            quantized = [n for n in quantized if selection.selects(owner(n))]
        results = []
        steps = quantized if quantized else weight_layers(graph, self.layers, self.exclude, "pass 'adaround'")
        for item in tqdm(steps, desc="adaround", disable=not self.progress, leave=False, delay=2):
            results.append(self._int8(graph, item, batches) if quantized else self._weight_only(graph, *item, batches))
        n = max(1, len(results))
        stats = {"layers": len(results), "grid": "int8 (insert_qdq)" if quantized else f"int{self.bits} (weights)",
                 "output_error_nearest": round(sum(r.error_nearest for r in results) / n, 6),
                 "output_error_learned": round(sum(r.error_learned for r in results) / n, 6),
                 "flipped": round(sum(r.flipped for r in results) / n, 4)}
        return PassResult(graph, changed=bool(results), stats=stats)

    def _learn(self, weight, scales, zero_points, qmin, qmax, apply, xs, keep_extremes=False):
        return learn_rounding(weight, scales, zero_points, qmin, qmax, apply, xs, iterations=self.iterations,
                              lr=self.lr, reg_weight=self.reg_weight, keep_extremes=keep_extremes)

    def _int8(self, graph: Graph, node: fx.Node, batches: list[tuple]):
        fq = node.args[1]
        _, scale_node, zp_node, axis, qmin, qmax = fq.args[:6]
        param = graph.attr(fq.args[0].target)
        dim = param.dim()
        scales = _along(graph.attr(scale_node.target).float(), axis, dim)
        zps = _along(graph.attr(zp_node.target).float(), axis, dim)
        xs, (args, kwargs) = _layer_inputs(graph, node, batches)
        apply = lambda x, w: node.target(x, w, *args[2:], **kwargs)  # noqa: E731
        result = self._learn(param, scales, zps, qmin, qmax, apply, xs)
        with torch.no_grad():
            param.copy_((result.codes - zps) * scales)
        return result

    def _weight_only(self, graph: Graph, path: str, module: nn.Module, batches: list[tuple]):
        qmax = (1 << (self.bits - 1)) - 1
        node = next(n for n in graph.nodes if n.op == "call_module" and str(n.target) == path)
        w = module.weight
        scales = channel_scales(w, qmax)
        xs, _ = _layer_inputs(graph, node, batches)
        result = self._learn(w, scales, 0.0, -qmax, qmax, _module_apply(module), xs, keep_extremes=True)
        with torch.no_grad():
            w.copy_(result.codes * scales)
        return result
