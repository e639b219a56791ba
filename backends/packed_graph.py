"""The fx graph as data, and back, through allow-lists only.

Saving turns every node (op, name, target, args, kwargs) and every submodule (its
``torch.nn`` class and constructor arguments) into JSON values. Loading looks each
class, function, method and attribute name up in the allow-lists below and refuses the
file if one is missing, so opening a packed file never imports or runs anything the file
names: fx generates the forward code from validated names and allow-listed callables only.
"""
from __future__ import annotations

import builtins
import keyword
import operator
import re
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from graphopt.backends.packed_errors import DisallowedTarget, UnsupportedGraph
from graphopt.modules import PrunedLayerNorm

# -- allow-lists -------------------------------------------------------------------------
_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias",
         "padding_mode")
_BN = ("num_features", "eps", "momentum", "affine", "track_running_stats")
_POOL = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_MAXPOOL = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")

#: torch.nn classes a file may instantiate, with the attributes that are their constructor
#: arguments ("bias" means "has a bias"). Containers get their children afterwards.
MODULES: dict[type, tuple[str, ...]] = {
    nn.Module: (), nn.Sequential: (), nn.ModuleList: (), nn.ModuleDict: (),
    nn.Conv1d: _CONV, nn.Conv2d: _CONV, nn.Conv3d: _CONV,
    nn.ConvTranspose1d: _CONV + ("output_padding",), nn.ConvTranspose2d: _CONV + ("output_padding",),
    nn.Linear: ("in_features", "out_features", "bias"),
    nn.Embedding: ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                   "scale_grad_by_freq", "sparse"),
    nn.BatchNorm1d: _BN, nn.BatchNorm2d: _BN, nn.BatchNorm3d: _BN,
    nn.LayerNorm: ("normalized_shape", "eps", "elementwise_affine", "bias"),
    nn.GroupNorm: ("num_groups", "num_channels", "eps", "affine"),
    nn.ReLU: ("inplace",), nn.ReLU6: ("inplace",), nn.SiLU: ("inplace",), nn.Hardswish: ("inplace",),
    nn.Hardsigmoid: ("inplace",), nn.Mish: ("inplace",), nn.LeakyReLU: ("negative_slope", "inplace"),
    nn.ELU: ("alpha", "inplace"), nn.GELU: ("approximate",), nn.Sigmoid: (), nn.Tanh: (), nn.Identity: (),
    nn.Softmax: ("dim",), nn.LogSoftmax: ("dim",), nn.Flatten: ("start_dim", "end_dim"),
    nn.Unflatten: ("dim", "unflattened_size"),
    nn.Dropout: ("p", "inplace"), nn.Dropout2d: ("p", "inplace"), nn.Dropout1d: ("p", "inplace"),
    nn.MaxPool1d: _MAXPOOL, nn.MaxPool2d: _MAXPOOL, nn.AvgPool1d: _POOL[:-1], nn.AvgPool2d: _POOL,
    nn.AdaptiveAvgPool1d: ("output_size",), nn.AdaptiveAvgPool2d: ("output_size",),
    nn.AdaptiveMaxPool2d: ("output_size", "return_indices"),
    nn.Upsample: ("size", "scale_factor", "mode", "align_corners"),
    PrunedLayerNorm: ("normalized", "count", "eps", "affine", "bias"),
}


def _type_name(cls: type) -> str:
    """``torch.nn.Conv2d``; graphopt's own modules under ``graphopt.modules``."""
    return f"graphopt.modules.{cls.__name__}" if cls.__module__ == "graphopt.modules" else f"torch.nn.{cls.__name__}"


_MODULE_NAMES = {_type_name(cls): cls for cls in MODULES}

_F_NAMES = ("relu", "relu6", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid", "tanh", "leaky_relu", "elu",
            "mish", "softmax", "log_softmax", "dropout", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
            "adaptive_max_pool2d", "avg_pool2d", "max_pool2d", "linear", "conv2d", "layer_norm", "batch_norm",
            "interpolate", "pad", "normalize", "embedding", "scaled_dot_product_attention")
_TORCH_NAMES = ("flatten", "cat", "concat", "stack", "add", "sub", "mul", "div", "matmul", "bmm", "relu", "sigmoid",
                "tanh", "softmax", "reshape", "transpose", "permute", "squeeze", "unsqueeze", "mean", "sum",
                "chunk", "split", "narrow", "clamp", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "max", "min",
                "maximum", "minimum", "where", "zeros_like", "ones_like", "einsum", "roll", "addmm", "baddbmm",
                "erf", "pow", "tensor_split", "unbind", "channel_shuffle", "pixel_shuffle")
_OPERATOR_NAMES = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "matmul", "getitem",
                   "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "iadd", "imul")


def _functions() -> dict[str, Callable]:
    table: dict[str, Callable] = {"builtins.getattr": builtins.getattr}
    table.update({f"operator.{n}": getattr(operator, n) for n in _OPERATOR_NAMES})
    table.update({f"torch.{n}": getattr(torch, n) for n in _TORCH_NAMES if hasattr(torch, n)})
    table.update({f"torch.nn.functional.{n}": getattr(F, n) for n in _F_NAMES if hasattr(F, n)})
    return table


#: functions a ``call_function`` node may call, by the name stored in the file
FUNCTIONS: dict[str, Callable] = _functions()
_FUNCTION_IDS = {id(fn): name for name, fn in FUNCTIONS.items()}

#: tensor methods a ``call_method`` node may call
METHODS = frozenset((
    "size", "dim", "numel", "view", "view_as", "reshape", "reshape_as", "flatten", "permute", "transpose", "t",
    "contiguous", "mean", "sum", "add", "sub", "mul", "div", "matmul", "relu", "sigmoid", "tanh", "softmax",
    "log_softmax", "unsqueeze", "squeeze", "expand", "expand_as", "repeat", "chunk", "split", "narrow", "clamp",
    "exp", "pow", "sqrt", "abs", "neg", "max", "min", "argmax", "float", "half", "type_as", "masked_fill",
    "unbind", "norm", "softmax", "gelu", "add_", "mul_", "relu_", "clone", "detach", "to"))

#: attributes ``getattr`` nodes may read from a value
ATTRIBUTES = frozenset(("shape", "dtype", "device", "ndim", "T", "mT", "is_cuda", "real"))

_ATOM = re.compile(r"^[A-Za-z0-9_]+$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_identifier(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _IDENT.match(name) or keyword.iskeyword(name):
        raise DisallowedTarget(f"{what} {name!r} is not a plain identifier")
    return name


def _check_path(path: Any, what: str) -> str:
    if not isinstance(path, str) or not path or not all(_ATOM.match(a) for a in path.split(".")):
        raise DisallowedTarget(f"{what} {path!r} is not a dotted path of plain names")
    if any(a.startswith("__") for a in path.split(".")):
        raise DisallowedTarget(f"{what} {path!r} names a dunder attribute")
    return path


# -- values in node arguments --------------------------------------------------------------
def encode_value(value: Any, where: str) -> Any:
    """A JSON value standing for an fx argument; containers and special types are tagged."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else {"float": repr(value)}
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, tuple):
        return {"tuple": [encode_value(v, where) for v in value]}
    if isinstance(value, list):
        return {"list": [encode_value(v, where) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise UnsupportedGraph(f"{where}: dict arguments need string keys")
        return {"dict": {k: encode_value(v, where) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [encode_value(v, where) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).replace("torch.", "")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).replace("torch.", "")}
    raise UnsupportedGraph(f"{where}: cannot store an argument of type {type(value).__name__} ({value!r:.60})")


_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "channels_last": torch.channels_last,
                   "preserve_format": torch.preserve_format}


MAX_NESTING = 32   # containers inside containers in one argument (fx's own graphs use a handful)


def decode_value(data: Any, nodes: dict[str, fx.Node], depth: int = 0) -> Any:
    if data is None or isinstance(data, (bool, str, int, float)):
        return data
    if depth > MAX_NESTING:
        raise ValueError(f"an argument is nested more than {MAX_NESTING} containers deep")
    if isinstance(data, dict) and len(data) == 1:
        (tag, body), = data.items()
        if tag == "node":
            if not isinstance(body, str) or body not in nodes:
                raise ValueError(f"argument refers to node {body!r} before it is defined")
            return nodes[body]
        if tag == "tuple" and isinstance(body, list):
            return tuple(decode_value(v, nodes, depth + 1) for v in body)
        if tag == "list" and isinstance(body, list):
            return [decode_value(v, nodes, depth + 1) for v in body]
        if tag == "dict" and isinstance(body, dict):   # keys become keyword names in fx's forward(): identifiers
            return {_check_identifier(k, "keyword argument"): decode_value(v, nodes, depth + 1)
                    for k, v in body.items()}
        if tag == "slice" and isinstance(body, list) and len(body) == 3:
            return slice(*(decode_value(v, nodes, depth + 1) for v in body))
        if tag == "ellipsis":
            return Ellipsis
        if tag == "float" and body in ("inf", "-inf", "nan"):
            return float(body)
        if tag == "dtype" and isinstance(getattr(torch, str(body), None), torch.dtype):
            return getattr(torch, body)
        if tag == "device":
            return torch.device(str(body))
        if tag == "memory_format" and body in _MEMORY_FORMATS:
            return _MEMORY_FORMATS[body]
    raise ValueError(f"malformed argument {data!r:.80}")


# -- modules -----------------------------------------------------------------------------
def _constructor_args(module: nn.Module, names: Iterable[str]) -> dict[str, Any]:
    args = {}
    for name in names:
        if name == "bias":  # a flag in the constructor, a Parameter or None on the module
            args[name] = getattr(module, "bias", None) is not None
        else:
            args[name] = getattr(module, name)
    return args


def encode_modules(gm: fx.GraphModule) -> tuple[list[dict], list[tuple[str, torch.Tensor, bool]]]:
    """(module entries, tensors): every submodule with its class and constructor arguments,
    and every parameter and buffer as (qualified name, tensor, is_parameter)."""
    entries, tensors = [], []
    for path, module in gm.named_modules(remove_duplicate=False):
        cls = type(module)
        if path == "":
            cls = nn.Module  # the GraphModule itself is rebuilt by fx
        elif cls not in MODULES:
            raise UnsupportedGraph(f"module {path!r} is a {cls.__module__}.{cls.__qualname__}, which is not in the "
                                   f"packed format's allow-list of modules")
        args = _constructor_args(module, MODULES[cls]) if path else {}
        entries.append({"path": path, "type": _type_name(cls), "training": module.training,
                        "args": {k: encode_value(v, f"module {path!r} argument {k!r}") for k, v in args.items()}})
        prefix = f"{path}." if path else ""
        for name, param in module.named_parameters(recurse=False):
            tensors.append((prefix + name, param, True))
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None:
                tensors.append((prefix + name, buf, False))
    return entries, tensors


def decode_modules(entries: list[dict], tensors: dict[str, tuple[torch.Tensor, bool]]) -> nn.Module:
    """The module tree: each class from the allow-list, built on the meta device (no
    initialisation work), then given the file's parameters and buffers."""
    root: nn.Module | None = None
    used: set[str] = set()
    for entry in entries:
        path, type_name = entry["path"], entry["type"]
        cls = _MODULE_NAMES.get(type_name)
        if cls is None:
            raise DisallowedTarget(f"module {path!r} has type {type_name!r}, which is not in the allow-list")
        args = {str(k): decode_value(v, {}) for k, v in entry.get("args", {}).items()}
        unknown = set(args) - set(MODULES[cls])
        if unknown:
            raise DisallowedTarget(f"module {path!r}: {type_name} takes no argument {sorted(unknown)[0]!r} here")
        with torch.device("meta"):
            try:
                module = cls(**args)
            except Exception as exc:
                raise ValueError(f"module {path!r}: {type_name}({args}) failed: {exc}") from exc
        module.train(bool(entry.get("training", False)))
        prefix = f"{path}." if path else ""
        for name, slot in list(module.named_parameters(recurse=False)):
            tensor, is_param = _fitting(_take(tensors, prefix + name, used, path), slot, path, name)
            module._parameters[name] = nn.Parameter(tensor, requires_grad=is_param and tensor.is_floating_point())
        for name, slot in list(module._buffers.items()):
            if slot is not None:
                module._buffers[name] = _fitting(_take(tensors, prefix + name, used, path), slot, path, name)[0]
        if path == "":
            root = module
            for name in [n for n in tensors if "." not in n]:  # constants fx keeps on the root
                tensor, is_param = _take(tensors, name, used, path)
                if is_param:
                    root.register_parameter(_check_identifier(name, "attribute"), nn.Parameter(tensor))
                else:
                    root.register_buffer(_check_identifier(name, "attribute"), tensor)
        else:
            if root is None:
                raise ValueError("the module list does not start with the root")
            owner_path, _, name = _check_path(path, "module path").rpartition(".")
            owner = root.get_submodule(owner_path) if owner_path else root
            owner.add_module(name, module)
    if root is None:
        raise ValueError("the file holds no modules")
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"tensor {extra[0]!r} belongs to no module")
    return root


def _fitting(taken: tuple[torch.Tensor, bool], slot: torch.Tensor, path: str, name: str) -> tuple[torch.Tensor, bool]:
    """The file's tensor, if it has the shape the module's constructor arguments give its ``name``
    (built on the meta device) and the same kind of dtype (floating point or not: a half-precision
    model keeps its fp16 weights)."""
    tensor = taken[0]
    if tensor.shape != slot.shape or tensor.is_floating_point() != slot.is_floating_point():
        raise ValueError(f"module {path or '<root>'!r}: {name} is {tensor.dtype} {list(tensor.shape)} in the file, "
                         f"its constructor arguments give {slot.dtype} {list(slot.shape)}")
    return taken


def _take(tensors: dict, name: str, used: set[str], path: str) -> tuple[torch.Tensor, bool]:
    if name not in tensors:
        raise ValueError(f"module {path or '<root>'!r} needs tensor {name!r}, which the file lacks")
    used.add(name)
    return tensors[name]


# -- nodes -------------------------------------------------------------------------------
def encode_nodes(gm: fx.GraphModule) -> list[dict]:
    out = []
    for node in gm.graph.nodes:
        where = f"node {node.name!r}"
        target = node.target
        if node.op == "call_function":
            name = _FUNCTION_IDS.get(id(target))
            if name is None:
                raise UnsupportedGraph(f"{where} calls {getattr(target, '__module__', '')}."
                                       f"{getattr(target, '__name__', target)}, which is not in the packed "
                                       f"format's allow-list of functions")
            target = name
        elif node.op == "call_method" and target not in METHODS:
            raise UnsupportedGraph(f"{where} calls method {target!r}, which is not in the allow-list")
        out.append({"name": node.name, "op": node.op, "target": target,
                    "args": encode_value(tuple(node.args), where), "kwargs": encode_value(dict(node.kwargs), where)})
    return out


def decode_graph(records: list[dict]) -> fx.Graph:
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for record in records:
        op, name, target = record["op"], _check_identifier(record["name"], "node name"), record["target"]
        where = f"node {name!r}"
        if op == "call_function":
            if target not in FUNCTIONS:
                raise DisallowedTarget(f"{where} calls function {target!r}, which is not in the allow-list")
            target = FUNCTIONS[target]
        elif op == "call_method":
            if target not in METHODS:
                raise DisallowedTarget(f"{where} calls method {target!r}, which is not in the allow-list")
        elif op in ("call_module", "get_attr"):
            target = _check_path(target, f"{where} target")
        elif op == "placeholder":
            target = _check_identifier(target, f"{where} input name")
        elif op != "output":
            raise ValueError(f"{where} has unknown op {op!r}")
        args = decode_value(record["args"], nodes)
        kwargs = decode_value(record["kwargs"], nodes)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise ValueError(f"{where}: malformed arguments")
        for key in kwargs:
            _check_identifier(key, f"{where} keyword argument")
        if target is builtins.getattr and (len(args) != 2 or args[1] not in ATTRIBUTES):
            raise DisallowedTarget(f"{where} reads attribute {args[1:]!r}, which is not in the allow-list")
        node = graph.create_node(op, target, args, kwargs, name=name)
        if node.name != name:
            raise ValueError(f"node name {name!r} is used twice")
        nodes[name] = node
    return graph
