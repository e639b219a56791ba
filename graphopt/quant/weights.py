"""Shared mechanics of the weight-compression passes (pruning, sharing, low-bit quantization).

- ``weight_layers``: the conv/linear weights a pass works on, chosen by ``layers``/``exclude``.
- Annotations: what a pass did to a weight (sparsity, shared values, quantization scales),
  kept in ``graph.gm.meta[ANNOTATIONS_KEY][param_name]`` so they travel with clones and
  the packed backend can store the weight compactly.
- ``finetune_constrained``: distillation fine-tuning that keeps a compressed weight's
  structure (pruned zeros stay zero, shared values stay shared) by rewriting its gradient.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from graphopt.training.distill import DistillConfig, distill
from graphopt.errors import DataError
from graphopt.ir import Graph
from graphopt.layer_selection import LayerSelection
from graphopt.ops import OpKind
from graphopt.pass_base import Contract

ANNOTATIONS_KEY = "graphopt.compression"


def weight_layers(graph: Graph, layers: list[str] | None = None, exclude: list[str] | None = None,
                  owner: str = "weight pass") -> list[tuple[str, nn.Module]]:
    """(module path, module) of every conv/linear call with a weight, in graph order, chosen by
    ``layers`` and ``exclude`` (graphopt.layer_selection: each pattern must match a layer)."""
    candidates = [str(n.target) for n in graph.nodes
                  if n.op == "call_module" and graph.kind(n) in (OpKind.CONV, OpKind.LINEAR)]
    selection = LayerSelection.of(layers, exclude)
    selection.check(candidates, owner)
    found, seen = [], set()
    for node in graph.nodes:
        if node.op != "call_module" or graph.kind(node) not in (OpKind.CONV, OpKind.LINEAR):
            continue
        path = str(node.target)
        module = graph.module(node)
        if path in seen or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        if not selection.selects(path):
            continue
        if not torch.isfinite(module.weight).all():
            raise DataError(f"{owner}: the weight of {path!r} holds NaN or Inf values; compressing it would hide that")
        seen.add(path)
        found.append((path, module))
    return found


def configure_finetune(pass_: Any, owner: str, finetune_epochs: Any, lr: float, max_batches: int | None,
                       probe_lr: bool = False) -> None:
    """Set a weight-compression pass's ``finetune`` settings (None: no fine-tuning); a pass
    that fine-tunes changes the function on purpose (contract NONE) and needs train_data
    (the pass's option model has checked the values)."""
    pass_.finetune = None
    if finetune_epochs:
        pass_.finetune = DistillConfig(epochs=float(finetune_epochs), lr=lr, max_batches=max_batches,
                                       probe_lr=probe_lr)
        pass_.finetune.check()
        pass_.contract = Contract.NONE
        pass_.requires = frozenset({"train_data"})


def configure_weight_pass(pass_: Any, owner: str, layers: Any, exclude: Any, bound: float | None,
                          finetune_epochs: Any = 0, lr: float = 1e-3, max_batches: int | None = None,
                          progress: bool = False, probe_lr: bool = False) -> None:
    """The settings every weight-compression pass shares: which layers (``layers`` / ``exclude``
    patterns), its error bound, and its optional fine-tuning."""
    pass_.layers = None if layers is None else list(layers)
    pass_.exclude = None if exclude is None else list(exclude)
    pass_.bound, pass_.progress = bound, progress
    configure_finetune(pass_, owner, finetune_epochs, lr, max_batches, probe_lr)


def annotations(graph: Graph) -> dict[str, dict[str, Any]]:
    """The graph's weight annotations, created empty on first use."""
    return graph.gm.meta.setdefault(ANNOTATIONS_KEY, {})


def annotate(graph: Graph, param: str, key: str, value: Any) -> None:
    annotations(graph).setdefault(param, {})[key] = value


def forget(graph: Graph, param: str, key: str) -> None:
    annotations(graph).get(param, {}).pop(key, None)


def zero_mask(weight: torch.Tensor) -> torch.Tensor:
    """True where the weight is exactly zero (its pruned positions)."""
    return weight.detach() == 0


@contextlib.contextmanager
def gradient_rewrites(rewrites: dict[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    handles = [param.register_hook(fn) for param, fn in rewrites.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def tied_gradient(index: torch.Tensor, clusters: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient rewrite giving each weight the mean gradient of its cluster (``index``, flat);
    cluster number ``clusters`` holds pruned zeros, which get none. Weights of one cluster
    then receive identical updates from any elementwise optimizer, so they stay equal."""
    counts = torch.bincount(index, minlength=clusters + 1).clamp(min=1).float()

    def rewrite(grad: torch.Tensor) -> torch.Tensor:
        sums = torch.zeros(clusters + 1, dtype=grad.dtype, device=grad.device).index_add_(0, index, grad.reshape(-1))
        mean = sums / counts
        mean[clusters] = 0
        return mean[index].reshape(grad.shape)

    return rewrite


def _keep_structure(graph: Graph) -> tuple[dict, dict]:
    """(rewrites, masks) that keep every annotated weight as earlier passes left it: shared
    weights tied, pruned zeros at zero, quantized weights frozen."""
    rewrites, masks = {}, {}
    for name, note in annotations(graph).items():
        try:
            param = graph.gm.get_parameter(name)
        except AttributeError:
            continue
        flat = param.detach().reshape(-1)
        if "quant" in note:
            rewrites[param] = torch.zeros_like
        elif "shared" in note:
            values, index = torch.unique(flat, return_inverse=True)
            zero = values == 0
            index = torch.where(zero[index], torch.tensor(values.numel()), index)
            rewrites[param] = tied_gradient(index, values.numel())
        if "sparsity" in note:
            masks[param] = zero_mask(param)
            if param not in rewrites:
                rewrites[param] = lambda g, m=masks[param]: g.masked_fill(m, 0.0)
    return rewrites, masks


def finetune_constrained(graph: Graph, ctx_data: dict, config: DistillConfig,
                         rewrites: dict[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]],
                         progress: bool = False) -> dict[str, float]:
    """Distil ``graph`` from the pipeline's teacher (``ctx_data['teacher']`` or its input
    graph) on ``ctx_data['train_data']``. Each parameter in ``rewrites`` has its gradient
    passed through its rewrite; weights annotated by earlier passes keep their structure."""
    teacher = ctx_data.get("teacher") or ctx_data["input_graph"]
    kept, masks = _keep_structure(graph)
    kept.update(rewrites)
    with gradient_rewrites(kept):
        result = distill(graph, teacher, ctx_data["train_data"], config, progress=progress)
    with torch.no_grad():
        for param, mask in masks.items():
            param.masked_fill_(mask, 0.0)
    return result


def group_scales(rows: torch.Tensor, qmax: int) -> torch.Tensor:
    """One scale per row of ``rows``: max|w| / qmax, as an fp16 number when fp16 can hold it."""
    scale = rows.abs().amax(dim=1) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    half = scale.half().float()
    return torch.where((half > 0) & torch.isfinite(half), half, scale)


def channel_scales(weight: torch.Tensor, qmax: int) -> torch.Tensor:
    """The per-channel grid ``quantize_weights`` puts ``weight`` on (granularity "channel"): one
    scale per output channel (``group_scales`` of its rows), shaped to broadcast against it."""
    w = weight.detach()
    return group_scales(w.reshape(w.shape[0], -1), qmax).reshape([-1] + [1] * (w.dim() - 1))


def on_channel_grid(weight: torch.Tensor, qmax: int) -> torch.Tensor:
    """``weight`` rounded to its per-channel grid: what ``quantize_weights`` leaves (no gradient)."""
    scales = channel_scales(weight, qmax)
    return torch.clamp(torch.round(weight.detach() / scales), -qmax, qmax) * scales + 0.0   # no -0.0


class ChannelFakeQuant(nn.Module):
    """A weight parametrization (``torch.nn.utils.parametrize``) for weight-only QAT: the forward
    sees the weight on its per-channel grid, the gradient passes straight through to the float
    weight. The scales follow the weight (its channel's largest magnitude, recomputed each step,
    as torch.ao's and Brevitas' default weight quantizers do), so no weight is ever clipped."""

    def __init__(self, qmax: int):
        super().__init__()
        self.qmax = qmax

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (on_channel_grid(weight, self.qmax) - weight).detach()
