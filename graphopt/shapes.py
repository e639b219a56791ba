"""Shape analysis: run the graph once on its example inputs and record every node's
output shape and dtype in ``node.meta`` (keys ``graphopt.shape``, ``graphopt.dtype``)."""
from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING

import torch
from torch.fx.passes.shape_prop import ShapeProp

from graphopt.analysis import register_analysis

if TYPE_CHECKING:
    from graphopt.ir import Graph

SHAPE_KEY = "graphopt.shape"
DTYPE_KEY = "graphopt.dtype"


def _shape_and_dtype(meta):
    """Shape/dtype of a ShapeProp TensorMetadata, or nested tuples of them for multi-output nodes."""
    if meta is None:
        return None, None
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return tuple(meta.shape), meta.dtype
    if isinstance(meta, (list, tuple)):
        pairs = [_shape_and_dtype(m) for m in meta]
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    if isinstance(meta, dict):
        pairs = {k: _shape_and_dtype(m) for k, m in meta.items()}
        return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
    return None, None


@register_analysis("shapes")
def propagate_shapes(graph: "Graph") -> dict[str, tuple]:
    """Node name -> output shape; also writes shape and dtype into each node's meta."""
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):   # ShapeProp prints a traceback
        ShapeProp(graph.gm).propagate(*graph.example_inputs)                # before raising: the error says it
    shapes = {}
    for node in graph.gm.graph.nodes:
        shape, dtype = _shape_and_dtype(node.meta.get("tensor_meta"))
        node.meta[SHAPE_KEY] = shape
        node.meta[DTYPE_KEY] = dtype
        shapes[node.name] = shape
    return shapes
