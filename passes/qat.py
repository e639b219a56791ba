"""Quantization-aware training: fine-tune the simulated-int8 graph ``insert_qdq`` made.

Fake-quant ops pass gradients straight through inside their range (torch's own STE), so the
float weights learn to sit where int8 rounding hurts least; by default against the float model
the pipeline started from (distillation), which is what recovers PTQ's loss without labels.
BatchNorm is folded before ``insert_qdq``, so there is nothing to freeze. ``learn_scales`` also
trains the per-channel weight scales (LSQ: the gradient of each scale scaled by
1/sqrt(weights per channel x qmax)); activation ranges stay as calibrated. The graph keeps its
structure, so ``fold_qdq`` and the int8 backends (with their parity checks) follow unchanged.

Weight-only QAT (``bits``): on a float graph, before ``quantize_weights(bits=...)``, each selected
conv/linear weight trains through a fake-quant at the grid that pass uses (per-channel symmetric,
fp16-exact scales from each channel's largest weight, recomputed every step as torch.ao's and
Brevitas' default weight quantizers do), then is left on that grid, so ``quantize_weights`` after
it changes nothing (each channel's largest weight stays on its extreme code, so its scale holds).
Fold BatchNorm first, as the field does, so the grid is the one the folded weights will get.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from typing import Literal

from graphopt.training.distill import DistillConfig, distill
from graphopt.errors import ConfigError
from graphopt.ir import Graph
from graphopt.options import Count, Fraction, Positive
from graphopt.pass_base import Contract, Pass, PassContext, PassResult, register_pass
from graphopt.quant.qparams import is_weight_fq
from graphopt.quant.weights import ANNOTATIONS_KEY, ChannelFakeQuant, on_channel_grid, weight_layers


def lsq_per_channel(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, qmin: int,
                    qmax: int) -> torch.Tensor:
    """torch.fake_quantize_per_channel_affine's values (symmetric: zero points are 0), with
    gradients for ``scale`` as LSQ defines them and straight-through ones for ``w``."""
    shape = [1] * w.dim()
    shape[axis] = -1
    per_channel = w.numel() // max(w.shape[axis], 1)
    g = 1.0 / math.sqrt(per_channel * qmax)
    s = scale.reshape(shape)
    s = s * g + (s - s * g).detach()              # the value of s, its gradient scaled by g
    x = w / s
    q = torch.clamp(x + (x.round() - x).detach(), qmin, qmax)
    return q * s


class _LearnableScales:
    """While active, weight scales are Parameters and their fake-quant nodes call lsq_per_channel."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes = [n for n in graph.nodes if is_weight_fq(n) and n.args[1].op == "get_attr"]

    def __enter__(self):
        for node in self.nodes:
            owner, leaf = self._owner(node.args[1].target)
            scale = owner._buffers.pop(leaf)
            owner.register_parameter(leaf, nn.Parameter(scale.detach().clone()))
            node.target = lsq_per_channel
        self.graph.gm.recompile()
        return self

    def __exit__(self, *exc):
        for node in self.nodes:
            owner, leaf = self._owner(node.args[1].target)
            learned = owner._parameters.pop(leaf).detach().clamp_min(1e-12)
            owner.register_buffer(leaf, learned)
            node.target = torch.fake_quantize_per_channel_affine
        self.graph.gm.recompile()
        return False

    def _owner(self, target: str) -> tuple[nn.Module, str]:
        path, _, leaf = target.rpartition(".")
        return (self.graph.gm.get_submodule(path) if path else self.graph.gm), leaf


class _WeightGrid:
    """While active, each module's weight is seen on its per-channel grid (ChannelFakeQuant);
    afterwards the trained float weight is moved onto that grid."""

    def __init__(self, modules: list[nn.Module], qmax: int):
        self.modules, self.qmax = modules, qmax

    def __enter__(self):
        for module in self.modules:
            parametrize.register_parametrization(module, "weight", ChannelFakeQuant(self.qmax))
        return self

    def __exit__(self, *exc):
        for module in self.modules:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            if exc[0] is None:
                with torch.no_grad():
                    module.weight.copy_(on_channel_grid(module.weight, self.qmax))
        return False


@register_pass("qat")
class QAT(Pass):
    """Fine-tune the simulated-int8 graph (after insert_qdq) by distillation from the float model.

    Options:
        epochs: passes over the training data (may be fractional)
        lr: learning rate (AdamW)
        temperature: softening of both models' logits in the distillation loss
        alpha: weight of the distillation term; 1 - alpha goes to the hard labels
        max_batches: batches per epoch (default: the whole loader)
        learn_scales: also train the per-channel weight scales (LSQ)
        progress: show a progress bar
        amp: mixed precision for the training steps: bf16, or fp16 on CUDA (default: float32)
        schedule: cosine anneals the learning rate to 0 over the run; constant keeps it
        loss: kd (classifiers), or cosine / mse for models whose output is an embedding (a backbone)
        bits: weight-only QAT on a float graph at the per-channel grid quantize_weights(bits=...) uses (2, 4
            or 8); the weights are left on that grid; leave unset after insert_qdq, whose int8 grid is trained
        layers: with bits, the layers trained on the grid (module name patterns; default: every conv/linear)
        exclude: with bits, layers left float (module name patterns)
    """

    contract = Contract.NONE
    requires = frozenset({"train_data"})
    preserves = frozenset({"shapes", "cost", "channel_groups"})  # weights (and scales) change, structure does not

    def __init__(self, epochs: Positive = 1.0, lr: Positive = 1e-4, temperature: Positive = 4.0, alpha: Fraction = 0.7,
                 max_batches: Count | None = None, learn_scales: bool = False, progress: bool = True,
                 schedule: Literal["constant", "cosine"] = "cosine", loss: Literal["kd", "cosine", "mse"] = "kd",
                 bits: Literal[2, 4, 8] | None = None, layers: list[str] | None = None,
                 exclude: list[str] | None = None, amp: Literal["bf16", "fp16"] | None = None):
        self.config = DistillConfig(epochs=float(epochs), lr=lr, temperature=temperature, alpha=alpha,
                                    max_batches=max_batches, schedule=schedule, loss=loss, amp=amp)
        self.config.check()
        self.learn_scales, self.progress = learn_scales, progress
        self.bits, self.layers, self.exclude = bits, layers, exclude
        if bits is None and (layers is not None or exclude is not None):
            raise ConfigError("pass 'qat': layers and exclude choose the layers of weight-only QAT (bits=...); after "
                              "insert_qdq, choose the int8 layers there")
        if bits is not None and learn_scales:
            raise ConfigError("pass 'qat': learn_scales trains the scales of insert_qdq's int8 grid; with bits=, "
                              "quantize_weights recomputes each channel's scale from its largest weight, so learned "
                              "scales would be lost")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        fake_quant = any(is_weight_fq(n) for n in graph.nodes)
        if self.bits is not None:
            if fake_quant:
                raise ConfigError("pass 'qat': bits= is weight-only QAT for a float graph that quantize_weights will "
                                  "quantize; this graph's weights already have an int8 grid (from insert_qdq): "
                                  "leave bits unset")
            return self._weight_only(graph, ctx)
        if not fake_quant:
            raise ConfigError("pass 'qat': the graph has no fake-quantized weights; run insert_qdq before qat "
                              "(or give bits= for weight-only QAT before quantize_weights)")
        teacher = ctx.data.get("teacher") or ctx.data["input_graph"]
        before = {n.args[1].target: graph.attr(n.args[1].target).clone() for n in graph.nodes
                  if is_weight_fq(n) and n.args[1].op == "get_attr"}
        if self.learn_scales:
            with _LearnableScales(graph):
                stats = distill(graph, teacher, ctx.data["train_data"], self.config, progress=self.progress)
        else:
            stats = distill(graph, teacher, ctx.data["train_data"], self.config, progress=self.progress)
        moved = max((float((graph.attr(k) / v - 1).abs().max()) for k, v in before.items()), default=0.0)
        stats = {k: round(v, 4) for k, v in stats.items()}
        stats["learn_scales"] = self.learn_scales
        stats["max_scale_change"] = round(moved, 4)
        return PassResult(graph, changed=True, stats=stats)

    def _weight_only(self, graph: Graph, ctx: PassContext) -> PassResult:
        layers = weight_layers(graph, self.layers, self.exclude, "pass 'qat'")
        if not layers:
            raise ConfigError("pass 'qat': the graph has no conv/linear weights to train on a grid")
        done = sorted(name for name, note in graph.gm.meta.get(ANNOTATIONS_KEY, {}).items() if "quant" in note)
        if done:
            raise ConfigError(f"pass 'qat': {done[0]!r} is already quantized (quantize_weights ran); run "
                              f"qat(bits=...) before quantize_weights")
        teacher = ctx.data.get("teacher") or ctx.data["input_graph"]
        qmax = (1 << (self.bits - 1)) - 1
        with _WeightGrid([module for _, module in layers], qmax):
            stats = distill(graph, teacher, ctx.data["train_data"], self.config, progress=self.progress)
        stats = {k: round(v, 4) for k, v in stats.items()}
        stats.update({"bits": self.bits, "layers": len(layers)})
        return PassResult(graph, changed=True, stats=stats)
