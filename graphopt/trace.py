"""Capture an ``nn.Module`` as a Graph: torch.fx first, torch.export as the fallback.

A torch.export capture has its functional layer calls lifted back to modules
(``lift_layers``), so passes see one IR whichever tracer captured the model.

When neither captures the model, the TraceError names the innermost module being traced,
why it failed (data-dependent control flow, an unsupported call, ...) and the user-code
line where it happened.
"""
from __future__ import annotations

import copy
import inspect
import keyword
import os
import traceback
from typing import Any

import torch
import torch.nn as nn
from torch import fx

from graphopt import devices
from graphopt.errors import ConfigError, TraceError
from graphopt.ir import Graph
from graphopt.lift_layers import lift_functional_layers
from graphopt.ops import is_registered_layer, registered_functions
from graphopt.torch_logs import quiet

_TORCH_DIR = os.path.dirname(torch.__file__)


class _PathTracer(fx.Tracer):
    """fx tracer that remembers which module it was inside when tracing failed."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=registered_functions())
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_registered_layer(m) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                try:
                    path = self.path_of_module(m)
                except NameError:
                    path = "?"
                self.failed_in = (path, type(m).__name__)
            raise


def _user_location(exc: BaseException) -> str:
    """file:line of the last traceback frame outside torch (where the user's code failed)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    if not frames:
        return ""
    last = frames[-1]
    return f"{os.path.basename(last.filename)}:{last.lineno}"


def _reason(exc: BaseException) -> str:
    while exc.__cause__ is not None and "ShapeProp error" in str(exc):   # fx's wrapper: the cause says why
        exc = exc.__cause__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "cannot be used as inputs to control flow" in text or "data-dependent" in text.lower() \
            or "GuardOnDataDependent" in type(exc).__name__:
        return f"data-dependent control flow ({text})"
    return f"{type(exc).__name__}: {text}"


def _check_example_inputs(inputs: tuple) -> None:
    """The example inputs are the batch every pass is verified on: an empty or non-finite one
    would make every check vacuous (error 0.0 whatever a pass did)."""
    for index, x in enumerate(inputs):
        if isinstance(x, torch.Tensor):
            if x.is_quantized:
                raise ConfigError(f"trace(): example input {index} is a quantized tensor ({x.dtype}); trace the float "
                                  f"model on float inputs (graphopt quantizes it: insert_qdq)")
            if x.numel() == 0:
                raise ConfigError(f"trace(): example input {index} is empty (shape {tuple(x.shape)}); passes are "
                                  f"verified on it, so give at least one sample")
            if (x.is_floating_point() or x.is_complex()) and not torch.isfinite(x).all():
                raise ConfigError(f"trace(): example input {index} holds NaN or Inf values")


def _dtype_hint(model: nn.Module, inputs: tuple) -> str:
    """A bool or complex example input next to floating-point weights, named: the likely reason a
    model does not trace (torch's own message names a kernel or a type pair, not the input)."""
    weights = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()})
    odd = [f"example input {i} is {str(x.dtype).removeprefix('torch.')}" for i, x in enumerate(inputs)
           if isinstance(x, torch.Tensor) and (x.dtype == torch.bool or x.is_complex())]
    return f" ({', '.join(odd)}; the model's weights are {', '.join(weights)})" if odd and weights else ""


class _KeywordCall(nn.Module):
    """Calls the model with keyword inputs given positionally (in the order the user's dict
    named them), so a graph's inputs stay a tuple. It shares the model's own children,
    parameters and buffers rather than holding the model as a child, so every layer keeps
    its qualified name (``transformer.h.0.attn.c_attn``, not ``model.transformer...``).
    Built by ``_keyword_call``: both tracers read the arity of ``forward``'s code."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.__dict__["wrapped"] = model          # not a child: no name prefix
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers


def _keyword_call(model: nn.Module, names: tuple[str, ...]) -> _KeywordCall:
    """A ``_KeywordCall`` whose forward takes exactly ``names`` (checked identifiers)."""
    source = (f"def forward(self, {', '.join(names)}):\n"
              f"    return self.wrapped({', '.join(f'{n}={n}' for n in names)})\n")
    scope: dict[str, Any] = {}
    exec(compile(source, "<graphopt keyword inputs>", "exec"), scope)   # names are checked identifiers
    return type("KeywordCall", (_KeywordCall,), {"forward": scope["forward"]})(model)


def _keyword_inputs(model: nn.Module, inputs: dict, dynamic_shapes: Any) -> tuple[tuple, Any]:
    """Keyword example inputs checked against ``model.forward``'s parameters; dynamic shapes
    given by name put in the same order."""
    parameters = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = [name for name in inputs if not isinstance(name, str) or not name.isidentifier()
               or keyword.iskeyword(name) or (name not in parameters and not takes_any)]
    if unknown:
        raise ConfigError(f"trace(): {type(model).__name__}.forward takes no input named {unknown[0]!r} "
                          f"(it takes {', '.join(parameters)})")
    if isinstance(dynamic_shapes, dict):
        extra = [name for name in dynamic_shapes if name not in inputs]
        if extra:
            raise ConfigError(f"trace(): dynamic_shapes names {extra[0]!r}, which is not an example input "
                              f"(inputs: {', '.join(inputs)})")
        dynamic_shapes = tuple(dynamic_shapes.get(name) for name in inputs)
    return tuple(inputs.values()), dynamic_shapes


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def _fx_capture(model: nn.Module, inputs: tuple) -> fx.GraphModule:
    tracer = _PathTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        exc.graphopt_module = tracer.failed_in  # type: ignore[attr-defined]
        raise
    name = type(model.wrapped if isinstance(model, _KeywordCall) else model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    # functional layers on a module's own weights (timm's norm + activation layers call F.batch_norm,
    # its LayerNorm2d F.layer_norm) become modules, as in torch.export graphs
    lift_functional_layers(gm, inputs)
    return gm


def _export_capture(model: nn.Module, inputs: tuple, dynamic_shapes: Any = None) -> fx.GraphModule:
    with quiet():   # a failure is reported in the TraceError; torch would also log its traceback to stderr
        program = torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes, strict=False)
    gm = program.module()
    lift_functional_layers(gm)  # one IR whichever tracer captured it: layers as modules
    return gm


def _has_hf_fx() -> bool:
    """transformers' own fx tracer (gone from transformers 5)."""
    import importlib.util

    return importlib.util.find_spec("transformers.utils.fx") is not None


def _hf_capture(model: nn.Module, inputs: tuple) -> fx.GraphModule:
    from transformers.utils import fx as hf_fx  # only for Hugging Face models

    names = list(model.dummy_inputs.keys())[: len(inputs)] if hasattr(model, "dummy_inputs") else ["input_ids"]
    return hf_fx.symbolic_trace(model, input_names=names)


def trace(model: nn.Module, example_inputs: Any, *, dynamic_shapes: Any = None) -> Graph:
    """Trace ``model`` (put in eval mode, deep-copied so the caller's model is never edited).

    ``example_inputs``: a tensor, a tuple of positional inputs, or a dict of keyword inputs
    (``{"input_ids": ids, "attention_mask": mask}``, as Hugging Face models are called; the
    graph then takes them positionally in that order); they drive shape propagation and serve
    as the held batch that passes are verified on.
    ``dynamic_shapes`` (torch.export's format, e.g. ``({0: Dim("batch"), 1: Dim("seq")}, ...)``)
    keeps those axes symbolic when torch.export captures, so one graph serves every batch
    size and sequence length; torch.fx graphs carry no sizes and need none.

    The graph runs where the model's weights are (``Graph.device``); example inputs on another
    device are moved there. A model spread over several devices is refused.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace() needs a torch.nn.Module, got {type(model).__name__}")
    names: tuple[str, ...] = ()
    if isinstance(example_inputs, dict):
        names = tuple(example_inputs)
        example_inputs, dynamic_shapes = _keyword_inputs(model, example_inputs, dynamic_shapes)
    inputs = _as_tuple(example_inputs)
    _check_example_inputs(inputs)
    inputs = devices.to_device(inputs, devices.module_device(model, f"trace(): {type(model).__name__}"))
    model = copy.deepcopy(model).eval()
    is_hf = type(model).__module__.startswith("transformers.")
    if is_hf and getattr(getattr(model, "config", None), "use_cache", False):
        # a key/value cache is for generation, not part of the function compressed (and no tracer
        # captures its cache object): our copy's outputs are the model's tensors alone
        model.config.use_cache = False
    model_name = type(model).__name__
    if names:
        model = _keyword_call(model, names)
    attempts: dict[str, str] = {}
    first_module, first_reason = "", ""
    capturers = [("transformers.fx", _hf_capture)] if is_hf and _has_hf_fx() and not names else []
    capturers += [("torch.fx", _fx_capture),
                  ("torch.export", lambda m, i: _export_capture(m, i, dynamic_shapes))]
    for name, capture in capturers:
        try:
            gm = capture(model, inputs)
            graph = Graph(gm, inputs, captured_by=name, dynamic_shapes=dynamic_shapes)
            if names:
                graph.meta["input_names"] = list(names)
            if attempts:
                graph.properties.add(f"fallback:{name}")
            return graph
        except Exception as exc:  # each tracer fails in its own way; keep what each said
            module, typename = getattr(exc, "graphopt_module", None) or ("", model_name)
            where = _user_location(exc)
            reason = _reason(exc) + (f" at {where}" if where else "")
            attempts[name] = f"{module or '<root>'} ({typename}): {reason}"
            if not first_reason:
                first_module, first_reason = module, reason
    detail = "; ".join(f"{k}: {v}" for k, v in attempts.items())
    raise TraceError(f"cannot trace {model_name}: {first_module or '<root>'}: {first_reason}"
                     f"{_dtype_hint(model, inputs)} [tried {detail}]", module=first_module, reason=first_reason,
                     attempts=attempts)
