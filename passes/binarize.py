"""Binarize conv/linear layers (XNOR-Net): weights to sign(W) * alpha, optionally inputs too.

The model's input and output layers stay full precision by default (they hold most of
the accuracy and little of the size); ``layers``/``exclude`` choose layers by module name
(fnmatch patterns, see graphopt.layer_selection). With ``distill_epochs`` > 0 the latent
weights are fine-tuned through a straight-through estimator by distillation from the
pipeline's input graph; with ``freeze`` the latent weights are then replaced by their final
±alpha values. Training can also be left to a later ``distill`` pass followed by
``freeze_binary``.
"""
from __future__ import annotations

from typing import Literal

import networkx as nx
import torch
import torch.nn as nn

from graphopt.quant.binary import BINARIZABLE, BINARY_LAYERS, BinaryConv2d, freeze, to_binary
from graphopt.distributed import broadcast_object
from graphopt.data import read_batch
from graphopt.training.distill import DistillConfig, distill
from graphopt.errors import ConfigError, DataError
from graphopt.ir import Graph
from graphopt.layer_selection import LayerPatterns, LayerSelection
from graphopt.ops import OpKind
from graphopt.options import Count, Fraction, NonNegative, Options, Positive
from graphopt.pass_base import Contract, Pass, PassContext, PassResult, register_pass

_LAYER_KINDS = (OpKind.CONV, OpKind.LINEAR)


def _is_pattern(text: str) -> bool:
    return any(c in text for c in "*?[")


def boundary_layers(graph: Graph) -> tuple[set[str], set[str]]:
    """(input layers, output layers): conv/linear nodes with no conv/linear node before them,
    and those with none after them, as module names."""
    view = graph.to_networkx()
    layers = {n.name: graph.qualname(n) for n in graph.nodes if graph.kind(n) in _LAYER_KINDS}
    first = {q for n, q in layers.items() if not (nx.ancestors(view, n) & layers.keys())}
    last = {q for n, q in layers.items() if not (nx.descendants(view, n) & layers.keys())}
    return first, last


@register_pass("binarize")
class Binarize(Pass):
    """Binary weights sign(W)*alpha (alpha = mean|W| per channel), optional binary activations, STE + distillation.

    Options:
        activations: binarize each chosen layer's input too (XNOR-Net), not only its weights
        layers: layers to binarize (module name patterns; default: every conv/linear layer but the boundary ones)
        exclude: layers to leave full precision (module name patterns)
        keep_first: keep the model's input layers full precision
        keep_last: keep the model's output layers full precision
        distill_epochs: fine-tune the latent weights by distillation for this many epochs (0: none)
        lr: fine-tuning learning rate
        temperature: distillation temperature
        distill_alpha: weight of the distillation term; 1 - alpha goes to the hard labels
        weight_decay: fine-tuning weight decay
        max_batches: fine-tuning batches per epoch (default: the whole loader)
        freeze: replace the latent weights by their final +-alpha values afterwards
        progress: show a progress bar
        amp: mixed precision for the training steps: bf16, or fp16 on CUDA (default: float32)
    """

    contract = Contract.NONE  # accuracy comes back through training, not by construction

    class Rules(Options):
        renamed = {"include": "layers"}

    def __init__(self, activations: bool = False, layers: LayerPatterns | None = None,
                 exclude: LayerPatterns | None = None, keep_first: bool = True, keep_last: bool = True,
                 distill_epochs: NonNegative = 0.0, lr: Positive = 1e-3, temperature: Positive = 4.0,
                 distill_alpha: Fraction = 0.7, weight_decay: NonNegative = 0.0, max_batches: Count | None = None,
                 freeze: bool = True, progress: bool = True, amp: Literal["bf16", "fp16"] | None = None):
        self.activations = bool(activations)
        self.selection = LayerSelection.of(layers, exclude)
        self.keep_first, self.keep_last = keep_first, keep_last
        self.distill_epochs = float(distill_epochs)
        self.config = DistillConfig(epochs=self.distill_epochs or 1.0, lr=lr, temperature=temperature,  # 1.0: unused
                                    alpha=distill_alpha, weight_decay=weight_decay, max_batches=max_batches,
                                    amp=amp)
        self.config.check()
        self.freeze = freeze
        self.progress = progress
        if self.distill_epochs:
            self.requires = frozenset({"train_data"})

    # -- choosing layers -------------------------------------------------------------
    def select(self, graph: Graph) -> dict[str, list[str]]:
        """{"binarize": [...], "full_precision": [...]} module names; ConfigError names a layer
        that was asked for but cannot be binarized."""
        modules = graph.modules()
        layers = list(dict.fromkeys(str(n.target) for n in graph.nodes
                                    if n.op == "call_module" and graph.kind(n) in _LAYER_KINDS))
        first, last = boundary_layers(graph)
        for pattern in self.selection.layers or ():
            if not _is_pattern(pattern) and pattern in modules and pattern not in layers:
                raise ConfigError(f"pass 'binarize': cannot binarize layer {pattern!r} "
                                  f"({type(modules[pattern]).__name__}): only Conv2d and Linear layers can be")
        self.selection.check(layers, "pass 'binarize'")
        explicit = self.selection.layers is not None
        chosen = [name for name in layers if self.selection.selects(name)]
        selected = []
        for name in chosen:
            module = modules[name]
            boundary = ("input", "keep_first") if self.keep_first and name in first else \
                       ("output", "keep_last") if self.keep_last and name in last else None
            if boundary:
                if explicit:
                    raise ConfigError(f"pass 'binarize': layer {name!r} is the model's {boundary[0]} layer, which "
                                      f"stays full precision by default; exclude it or set {boundary[1]} = false")
                continue
            if isinstance(module, BINARY_LAYERS):
                continue  # already binary
            if type(module) not in BINARIZABLE:
                if explicit:
                    raise ConfigError(f"pass 'binarize': cannot binarize layer {name!r} ({type(module).__name__}): "
                                      f"only Conv2d and Linear layers can be")
                continue
            if self.activations and isinstance(module, nn.Conv2d) and (
                    module.padding_mode != "zeros" or isinstance(module.padding, str)):
                raise ConfigError(f"pass 'binarize': layer {name!r}: binary activations need numeric zero padding, "
                                  f"got padding={module.padding!r}, padding_mode={module.padding_mode!r}")
            selected.append(name)
        kept = [n for n in layers if n not in selected and not isinstance(modules[n], BINARY_LAYERS)]
        return {"binarize": selected, "full_precision": kept}

    # -- rewriting -------------------------------------------------------------------
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        choice = self.select(graph)
        teacher = None
        if self.distill_epochs:
            teacher = ctx.data.get("teacher") or ctx.data.get("input_graph") or graph.clone()
        modules = graph.modules()
        for name in choice["binarize"]:
            if not torch.isfinite(modules[name].weight).all():
                raise DataError(f"binarize: the weight of {name!r} holds NaN or Inf values; binarizing it would hide that")
        for name in choice["binarize"]:
            graph.replace_module(name, to_binary(modules[name], self.activations))
        if self.activations and choice["binarize"]:
            first = broadcast_object(_first_batch(graph, ctx.data.get("train_data")))   # rank 0's on every rank
            init_shifts(graph, choice["binarize"], first or graph.example_inputs)
        graph.commit()
        stats: dict = {"binarized": len(choice["binarize"]), "layers": choice["binarize"],
                       "full_precision": choice["full_precision"], "activations": self.activations}
        if self.distill_epochs and choice["binarize"]:
            result = distill(graph, teacher, ctx.data["train_data"], self.config, progress=self.progress)
            stats.update({f"distill_{k}": round(v, 4) for k, v in result.items()})
        if self.freeze:
            freeze_all(graph)
        return PassResult(graph, changed=bool(choice["binarize"]), stats=stats)


@register_pass("freeze_binary")
class FreezeBinary(Pass):
    """Replace latent weights of binary layers by their final ±alpha values (fp16 alpha), for export."""

    contract = Contract.BOUNDED
    bound = 0.05  # alpha rounded to fp16; a binary input right at a threshold may flip
    preserves = frozenset({"shapes", "cost", "channel_groups"})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        frozen = freeze_all(graph)
        return PassResult(graph, changed=bool(frozen), stats={"frozen": len(frozen)})


def freeze_all(graph: Graph) -> list[str]:
    """Freeze every binary layer of ``graph``; returns their names."""
    names = [name for name, m in graph.modules().items() if isinstance(m, BINARY_LAYERS)]
    for name in names:
        freeze(graph.gm.get_submodule(name))
    return names


def _first_batch(graph: Graph, data) -> tuple | None:
    if data is None:
        return None
    for batch in (data() if callable(data) else data):
        return read_batch(graph, batch, "binarize: training batch 0 (input shifts)")[0]
    return None


@torch.no_grad()
def init_shifts(graph: Graph, names: list[str], inputs: tuple) -> None:
    """Set each binary-activation layer's ``shift`` to the mean of its input per channel on
    ``inputs``, so ``sign(x - shift)`` splits the values it sees instead of giving all +1."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        module = graph.gm.get_submodule(name)

        def grab(mod, args, name=name):
            x = args[0]
            axes = (0, 2, 3) if isinstance(mod, BinaryConv2d) else tuple(range(x.dim() - 1))
            seen.setdefault(name, x.mean(dim=axes))
        hooks.append(module.register_forward_pre_hook(grab))
    try:
        graph.gm.eval()
        graph.gm(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    for name, mean in seen.items():
        graph.gm.get_submodule(name).shift.copy_(mean)
