"""A pruned graph back as a Hugging Face model: its config's sizes rewritten, so ``save_pretrained``
and ``from_pretrained`` work on it.

A Hugging Face model is rebuilt from its config, so a pruned one reloads only if the config says
the pruned sizes. Which config fields those are differs per architecture (``intermediate_size``,
``n_inner``, ``ffn_dim``; ``num_attention_heads`` and ``num_key_value_heads`` where the config has
an explicit ``head_dim``), so they are not listed here but found: each integer field whose value
explains a pruned weight's old size (as itself, or as heads times ``head_dim``) is tried at the
size the weights now have, and a config is kept only if the model it builds (on the meta device,
no memory) has exactly the pruned weights' shapes. The rebuilt model is then checked against the
graph on its held batch. Where no config can say the result (per-layer sizes that differ, or
heads pruned where the config derives the head size from ``hidden_size / heads``), the error
names the weights and the sizes.
"""
from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import nn

from graphopt.errors import ExportError
from graphopt.ir import Graph
from graphopt.verify import compare_outputs, flatten_outputs

__all__ = ["to_pretrained"]

_WIDTH_WORDS = ("inner", "intermediate", "ffn")   # width fields whose None means a default width
_TOLERANCE = 1e-4     # relative to the outputs' scale: the same weights in the same order of ops


def to_pretrained(graph: Graph, model: nn.Module) -> nn.Module:
    """A new ``type(model)`` holding ``graph``'s weights, with a config that builds their shapes.

    ``model`` is the Hugging Face model the graph was traced from (it is not edited). Only
    passes that keep the model's own layers (channel and head pruning, BatchNorm folding into
    existing layers, weight-only changes) can go back: a layer the graph no longer has by the
    model's name (split, fused or quantized into another form) is named in the error.
    """
    if not hasattr(model, "config") or not type(model).__module__.startswith("transformers."):
        raise ExportError(f"to_pretrained() needs the Hugging Face model the graph was traced from, "
                          f"got {type(model).__name__}")
    original = model.state_dict()
    pruned = _in_model_layout(graph, model)
    _check_same_layers(original, pruned)
    changed = {name: (tuple(original[name].shape), tuple(value.shape)) for name, value in pruned.items()
               if name in original and original[name].shape != value.shape}
    _check_norms_kept(model, changed)
    config = _fitting_config(model, pruned, changed)
    rebuilt = type(model)(config).to(graph.device).eval()
    weights = rebuilt.state_dict()
    for name in weights:
        source = pruned.get(name, original.get(name))
        if source is not None:
            weights[name] = source.detach().clone()
    rebuilt.load_state_dict(weights, strict=True)
    _check_outputs(graph, rebuilt)
    return rebuilt


def _in_model_layout(graph: Graph, model: nn.Module) -> dict[str, torch.Tensor]:
    """The graph's weights laid out as the model's modules hold them: tracing turns GPT-2's
    ``Conv1D`` (weight stored in x out) into an ``nn.Linear`` (out x in)."""
    weights = dict(graph.gm.state_dict())
    graph_modules = graph.modules()
    for name, module in model.named_modules():
        if type(module).__name__ == "Conv1D" and isinstance(graph_modules.get(name), nn.Linear):
            weights[f"{name}.weight"] = weights[f"{name}.weight"].t()
    return weights


def _check_norms_kept(model: nn.Module, changed: dict[str, tuple]) -> None:
    """A pruned stream's norms (LayerNorm, RMSNorm) average over the original width in the graph
    (the removed channels count as zeros); the model's own norm classes average over the
    channels they hold, so a config with a smaller hidden size computes something else."""
    norms = [name for name, module in model.named_modules()
             if "norm" in type(module).__name__.lower() and f"{name}.weight" in changed]
    if norms:
        embeddings = [name for name, module in model.named_modules() if isinstance(module, nn.Embedding)]
        old, new = changed[f"{norms[0]}.weight"]
        raise ExportError(f"to_pretrained(): the hidden size was pruned ({norms[0]}: {old[0]} -> {new[0]} "
                          f"channels); {type(model).__name__}'s norms would average over the channels kept, "
                          f"the graph's over all {old[0]}, so no config builds it. Keep the hidden size: "
                          f"prune with protected={embeddings[:1] or ['the embedding']}")


def _check_same_layers(original: dict, pruned: dict) -> None:
    missing = [name for name in pruned if name not in original]
    if missing:
        raise ExportError(f"to_pretrained(): the graph has weights the model does not ({', '.join(missing[:3])}"
                          f"{', ...' if len(missing) > 3 else ''}): a pass replaced layers (low-rank split, "
                          f"int8 or weight-sharing forms), which a Hugging Face config cannot describe")


def _head_dim(config: Any) -> int | None:
    explicit = getattr(config, "head_dim", None)
    if isinstance(explicit, int):
        return explicit
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None


def _candidates(config: Any, changed: dict[str, tuple]) -> dict[str, set[int]]:
    """Config field -> sizes it may now have: the new size of every weight axis whose old size
    the field's value explains."""
    head_dim = _head_dim(config)
    moves = {(old, new) for old_shape, new_shape in changed.values()
             for old, new in zip(old_shape, new_shape) if old != new}
    fields: dict[str, set[int]] = {}
    for field, value in config.to_dict().items():
        if value is None and any(word in field for word in _WIDTH_WORDS):   # a default (GPT-2: n_inner)
            fields[field] = {new for _, new in moves}
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or field == "head_dim":
            continue
        for old, new in moves:
            if old == value:
                fields.setdefault(field, set()).add(new)
            elif head_dim and old == value * head_dim and new % head_dim == 0:
                fields.setdefault(field, set()).add(new // head_dim)
    return fields


def _shapes(model_type: type, config: Any) -> dict[str, tuple] | None:
    try:
        with torch.device("meta"):
            built = model_type(config)
    except Exception:   # a combination the architecture refuses (e.g. hidden not divisible by heads)
        return None
    return {name: tuple(value.shape) for name, value in built.state_dict().items()}


def _fitting_config(model: nn.Module, pruned: dict, changed: dict[str, tuple]) -> Any:
    config = copy.deepcopy(model.config)
    if not changed:
        return config
    want = {name: tuple(value.shape) for name, value in pruned.items()}
    fields = _candidates(config, changed)
    choices = [[(field, None)] + [(field, size) for size in sorted(sizes)] for field, sizes in fields.items()]
    for combination in itertools.product(*choices):
        trial = copy.deepcopy(config)
        for field, size in combination:
            if size is not None:
                setattr(trial, field, size)
        shapes = _shapes(type(model), trial)
        if shapes is not None and all(shapes.get(name, shape) == shape for name, shape in want.items()):
            return trial
    sample = "; ".join(f"{name} {old} -> {new}" for name, (old, new) in list(changed.items())[:4])
    raise ExportError(
        f"to_pretrained(): no {type(config).__name__} builds the pruned shapes ({sample}; tried fields "
        f"{', '.join(sorted(fields)) or 'none'}). A Hugging Face config holds one size per model, so "
        f"every layer must keep the same number of channels (prune_channels scope='uniform'), and a "
        f"config that derives the head size from hidden_size / num_attention_heads cannot say fewer "
        f"heads (keep the attention layers: exclude=['*attention*'] or the architecture's names)")


def _check_outputs(graph: Graph, rebuilt: nn.Module) -> None:
    kwargs = {"use_cache": False} if getattr(rebuilt.config, "use_cache", False) else {}
    with torch.no_grad():
        expected = flatten_outputs(graph.run())
        names = graph.meta.get("input_names")      # traced on keyword inputs
        inputs = dict(zip(names, graph.example_inputs)) if names else {}
        got = flatten_outputs(rebuilt(*() if names else graph.example_inputs, **inputs, **kwargs))
    _, error = compare_outputs(expected, got[:len(expected)])
    if not error <= _TOLERANCE:
        raise ExportError(f"to_pretrained(): the rebuilt {type(rebuilt).__name__} differs from the graph "
                          f"(relative error {error:.2e} > {_TOLERANCE:g})")
