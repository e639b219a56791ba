"""Batches a pass reads (calibration, fine-tuning, importance, evaluation): split into model
inputs and labels, checked against the traced graph before any weight sees them, and made
re-iterable."""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Iterable

import torch

from graphopt.errors import ConfigError, DataError

if TYPE_CHECKING:
    from graphopt.ir import Graph


def _is_labels(value: Any) -> bool:
    return value is None or (isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dim() <= 1)


def split_batch(batch: Any) -> tuple[tuple, torch.Tensor | None]:
    """(model inputs, labels or None) of one batch: a tensor, an (inputs, labels) pair, or a tuple
    of inputs. A pair counts as (inputs, labels) only when its second item looks like class labels
    (integer, at most 1-D) or is None, so a two-input model's (x1, x2) stays two inputs. Shared by
    calibration, distillation, importance estimation and evaluation."""
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and _is_labels(batch[1]):
        inputs = batch[0]
        return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), batch[1]
    if isinstance(batch, (tuple, list)):
        return tuple(batch), None
    raise ConfigError(f"data must yield tensors or (inputs, labels) pairs, got {type(batch).__name__}")


def check_finite(inputs: tuple, where: str) -> None:
    """Refuse NaN/Inf in a batch's floating-point tensors before they reach any weight."""
    for index, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not torch.isfinite(x).all():
            raise DataError(f"{where}: input {index} holds NaN or Inf values")


def check_labels(labels: torch.Tensor | None, logits: Any, where: str) -> None:
    """Refuse labels a classification loss cannot read: one per sample, each a class index of the
    model's output (cross-entropy would fail deep in torch, or an out-of-range index on a GPU)."""
    if labels is None or not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        return
    samples = logits.shape[0] if logits.dim() > 1 else 1
    if labels.dim() != 1 or labels.shape[0] != samples:
        raise DataError(f"{where}: labels of shape {tuple(labels.shape)} for outputs of shape {tuple(logits.shape)}; "
                        f"one class index per sample is needed")
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[-1]):
        raise DataError(f"{where}: labels range over [{labels.min().item()}, {labels.max().item()}], but the model "
                        f"has {logits.shape[-1]} classes")


def batch_inputs(batch: Any) -> tuple:
    """The model inputs of one batch (see ``split_batch``)."""
    return split_batch(batch)[0]


def check_batch(graph: Graph, inputs: tuple, where: str) -> None:
    """Refuse a batch the graph cannot run as traced: another number of inputs, another rank,
    another size on an axis other than the batch axis (or one traced as dynamic), or another
    dtype. ``where`` names the batch ("distillation: batch 3 of epoch 1")."""
    expected = [t for t in graph.example_inputs if isinstance(t, torch.Tensor)]
    free = _dynamic_axes(graph, len(expected))
    got = [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in inputs]
    shapes = [tuple(t.shape) for t in expected]
    if len(got) != len(shapes) or any(
            g is None or len(g) != len(e) or any(a != b for d, (a, b) in enumerate(zip(g, e)) if d not in f)
            for g, e, f in zip(got, shapes, free)):
        raise DataError(f"{where} has input shapes {got}, but the model was traced with {shapes} (only the batch "
                        f"dimension and axes traced as dynamic may differ)")
    for index, (x, e) in enumerate(zip(inputs, expected)):
        if x.dtype != e.dtype:
            raise DataError(f"{where}: input {index} is {str(x.dtype).removeprefix('torch.')}, but the model was "
                            f"traced with {str(e.dtype).removeprefix('torch.')} inputs")


def read_batch(graph: Graph, batch: Any, where: str, finite: bool = True) -> tuple[tuple, torch.Tensor | None]:
    """One batch as every pass that reads data takes it: (inputs, labels) split, checked against
    the graph (``where`` names the batch; the rank is added under torchrun), NaN/Inf refused
    (``finite``), and moved to the graph's device."""
    from graphopt import distributed
    from graphopt.devices import to_device

    inputs, labels = split_batch(batch)
    if distributed.active():
        where = f"{where} on rank {distributed.rank()}"
    check_batch(graph, inputs, where)
    if finite:
        check_finite(inputs, where)
    return to_device((inputs, labels), graph.device)


def _dynamic_axes(graph: Graph, count: int) -> list[set[int]]:
    """Per input, the axes a batch may size freely: the batch axis and those traced as dynamic."""
    spec = graph.dynamic_shapes
    specs = list(spec) if isinstance(spec, (tuple, list)) else [None] * count
    return [{0} | set(s or {}) if isinstance(s, dict) or s is None else {0} for s in (specs + [None] * count)[:count]]


def reiterable(data: Any, max_batches: int | None = None) -> Any:
    """``data`` as something that can be read more than once: a callable or a container is kept;
    a one-shot iterator (a generator) is read once, up to ``max_batches`` batches, into a list
    (inside ``graphopt.distributed.sharded``, which stays)."""
    from graphopt.distributed import Sharded

    if isinstance(data, Sharded):
        return Sharded(reiterable(data.data, max_batches))
    if data is None or callable(data) or not isinstance(data, Iterable) or iter(data) is not data:
        return data
    return list(itertools.islice(data, max_batches))
