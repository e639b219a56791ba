"""Task metrics over a data loader, for before/after comparisons in reports."""
from __future__ import annotations

from itertools import islice
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from graphopt.data import check_finite, split_batch
from graphopt.errors import ConfigError, DataError
from graphopt.ir import Graph


def top1_accuracy(model: Graph | Callable, batches: Iterable, limit: int | None = None,
                  progress: bool = False) -> float:
    """Share of samples whose argmax over the last axis equals the label, in [0, 1]. ``model``: a
    Graph, any module, or an exported artifact's runner (numpy outputs, first one read)."""
    run = model.run if isinstance(model, Graph) else model   # a Graph moves each batch to its device
    correct = total = 0
    for index, item in enumerate(tqdm(islice(batches, limit), desc="evaluate", disable=not progress, leave=False,
                                      delay=2)):
        inputs, labels = split_batch(item)
        if labels is None:
            raise ConfigError("evaluation data must yield (inputs, labels) pairs")
        check_finite(inputs, f"evaluation batch {index}")
        with torch.no_grad():
            logits = run(*inputs)
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        predicted = torch.as_tensor(logits).argmax(-1).cpu()
        if labels.shape != predicted.shape:
            raise DataError(f"evaluation batch {index}: labels of shape {tuple(labels.shape)} for predictions of "
                            f"shape {tuple(predicted.shape)}; one label per sample is needed")
        correct += (predicted == labels).sum().item()
        total += labels.numel()
    if total == 0:
        raise ConfigError("evaluation data yielded no samples")
    return correct / total
