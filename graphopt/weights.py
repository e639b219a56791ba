"""Shared mechanics of the weight-compression passes (pruning, sharing, low-bit quantization).

- ``weight_layers``: the conv/linear weights a pass works on, filtered by glob patterns.
- Annotations: what a pass did to a weight (sparsity, shared values, quantization scales),
  kept in ``graph.gm.meta[ANNOTATIONS_KEY][param_name]`` so they travel with clones and
  the packed backend can store the weight compactly.
- ``finetune_constrained``: distillation fine-tuning that keeps a compressed weight's
  structure (pruned zeros stay zero, shared values stay shared) by rewriting its gradient.
"""
from __future__ import annotations

import contextlib
import fnmatch
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from graphopt.distill import DistillConfig, distill
from graphopt.errors import ConfigError
from graphopt.ir import Graph
from graphopt.ops import OpKind

ANNOTATIONS_KEY = "graphopt.compression"


def weight_layers(graph: Graph, layers: list[str] | None = None, exclude: list[str] | None = None
                  ) -> list[tuple[str, nn.Module]]:
    """(module path, module) of every conv/linear call with a weight, in graph order; ``layers``
    and ``exclude`` are fnmatch patterns over module paths."""
    found, seen = [], set()
    for node in graph.nodes:
        if node.op != "call_module" or graph.kind(node) not in (OpKind.CONV, OpKind.LINEAR):
            continue
        path = str(node.target)
        module = graph.module(node)
        if path in seen or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        if layers and not any(fnmatch.fnmatchcase(path, p) for p in layers):
            continue
        if exclude and any(fnmatch.fnmatchcase(path, p) for p in exclude):
            continue
        seen.add(path)
        found.append((path, module))
    return found


def check_patterns(owner: str, name: str, patterns: Any) -> list[str] | None:
    if patterns is None:
        return None
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"{owner}: {name} must be a list of module path patterns, got {patterns!r}")
    return list(patterns)


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


def finetune_constrained(graph: Graph, ctx_data: dict, config: DistillConfig,
                         rewrites: dict[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]],
                         progress: bool = False) -> dict[str, float]:
    """Distil ``graph`` from the pipeline's teacher (``ctx_data['teacher']`` or its input
    graph) on ``ctx_data['train_data']``, each listed parameter's gradient passed through its
    rewrite first."""
    teacher = ctx_data.get("teacher") or ctx_data["input_graph"]
    with gradient_rewrites(rewrites):
        return distill(graph, teacher, ctx_data["train_data"], config, progress=progress)
