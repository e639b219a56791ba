"""The IR: a ``torch.fx.GraphModule`` (the executable truth) plus what passes need.

``Graph`` adds per-node shape/dtype metadata, an op kind for every node, cached
analyses, a networkx view, verification (``lint``) and a few rewriting primitives that
every pass shares, so passes never edit the GraphModule behind the IR's back.
"""
from __future__ import annotations

import copy
import itertools
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
import torch.nn as nn
from torch import fx

from graphopt import devices
from graphopt import cost as _cost  # noqa: F401  (registers the "cost" analysis)
from graphopt import shapes as _shapes  # noqa: F401  (registers the "shapes" analysis)
from graphopt.analysis import get_analysis
from graphopt.errors import GraphLintError
from graphopt.ops import OpKind, classify, op_name
from graphopt.shapes import DTYPE_KEY, SHAPE_KEY

if TYPE_CHECKING:
    import networkx as nx

KIND_KEY = "graphopt.kind"


def owner_and_leaf(gm: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    """(the module holding ``qualname``, the attribute name there): ``a.b.weight`` -> (gm.a.b, "weight")."""
    owner, _, leaf = qualname.rpartition(".")
    return (gm.get_submodule(owner) if owner else gm), leaf


class Graph:
    """A traced model. ``captured_by`` says which tracer produced it; ``dynamic_shapes``
    (torch.export's format) names the input axes that stay symbolic, for the exporters;
    ``meta`` holds graph-wide annotations (plain data, e.g. the int8 target), as ``node.meta``
    holds per-node ones."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Iterable[Any], *,
                 captured_by: str = "torch.fx", properties: Iterable[str] = (), dynamic_shapes: Any = None):
        self.gm = gm
        self.example_inputs = tuple(example_inputs)
        self.captured_by = captured_by
        self.dynamic_shapes = dynamic_shapes
        self.properties: set[str] = set(properties)
        self.meta: dict[str, Any] = {}
        self._cache: dict[str, Any] = {}
        self.classify()
        self.analysis("shapes")

    # -- reading -------------------------------------------------------------------
    @property
    def nodes(self) -> Iterator[fx.Node]:
        return iter(self.gm.graph.nodes)

    def node(self, name: str) -> fx.Node:
        for node in self.gm.graph.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node named {name!r}")

    def modules(self) -> dict[str, nn.Module]:
        return dict(self.gm.named_modules())

    def module(self, node: fx.Node) -> nn.Module:
        """The submodule a ``call_module`` node calls."""
        return self.gm.get_submodule(node.target)

    def attr(self, qualname: str) -> Any:
        """The tensor (or other value) a ``get_attr`` target names."""
        return getattr(*owner_and_leaf(self.gm, qualname))

    def kind(self, node: fx.Node) -> OpKind:
        kind = node.meta.get(KIND_KEY)
        if kind is None:
            kind = node.meta[KIND_KEY] = classify(node, self.modules())
        return kind

    def shape(self, node: fx.Node):
        self.analysis("shapes")
        return node.meta.get(SHAPE_KEY)

    def dtype(self, node: fx.Node):
        self.analysis("shapes")
        return node.meta.get(DTYPE_KEY)

    def qualname(self, node: fx.Node) -> str:
        """The module path a node came from (its target for call_module), for messages."""
        if node.op == "call_module":
            return str(node.target)
        stack = node.meta.get("nn_module_stack")
        if stack:
            return str(list(stack.values())[-1][0])
        return node.name

    # -- where it runs --------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The device the weights are on (the traced model's; ``to`` moves them), else the
        example inputs' device, else the CPU."""
        for tensor in itertools.chain(self.gm.parameters(), self.gm.buffers()):
            return tensor.device
        return devices.inputs_device(self.example_inputs) or torch.device("cpu")

    @property
    def weight_dtype(self) -> torch.dtype:
        """The floating-point dtype of the weights (float32 when there are none)."""
        return devices.float_dtype(self.gm) or torch.float32

    def to(self, device: Any) -> "Graph":
        """Move the weights and the example inputs to ``device`` (in place, as ``nn.Module.to``)."""
        device = devices.resolve(device)
        self.gm.to(device)
        self.example_inputs = devices.to_device(self.example_inputs, device)
        return self

    # -- running -------------------------------------------------------------------
    def run(self, *inputs: Any) -> Any:
        """Execute on ``inputs`` (the example inputs when none are given; moved to the graph's
        device), without grad."""
        with torch.no_grad():
            return self.gm(*devices.to_device(inputs or self.example_inputs, self.device))

    __call__ = run

    def clone(self) -> "Graph":
        """A deep copy: modules, parameters and graph are all new objects. Cached analyses are
        plain data keyed by node name (and node meta is copied), so the twin keeps them until
        an edit invalidates them: a pass that changes nothing costs no re-analysis."""
        twin = Graph.__new__(Graph)
        twin.gm = copy.deepcopy(self.gm)
        twin.example_inputs = self.example_inputs
        twin.captured_by = self.captured_by
        twin.dynamic_shapes = self.dynamic_shapes
        twin.properties = set(self.properties)
        twin.meta = dict(self.meta)
        twin._cache = dict(self._cache)
        return twin

    # -- analyses ------------------------------------------------------------------
    def analysis(self, name: str) -> Any:
        """Result of the named analysis, computed once and cached until invalidated."""
        if name not in self._cache:
            self._cache[name] = get_analysis(name)(self)
        return self._cache[name]

    def invalidate(self, names: Iterable[str] | None = None) -> None:
        """Drop cached analyses (all when ``names`` is None)."""
        if names is None:
            self._cache.clear()
        else:
            for name in names:
                self._cache.pop(name, None)

    def retain_analyses(self, names: Iterable[str]) -> None:
        """Drop every cached analysis except ``names`` (what a pass preserves)."""
        keep = set(names)
        for name in [n for n in self._cache if n not in keep]:
            del self._cache[name]

    def classify(self) -> None:
        modules = self.modules()
        for node in self.gm.graph.nodes:
            node.meta[KIND_KEY] = classify(node, modules)

    def to_networkx(self) -> nx.DiGraph:
        """A DiGraph over node names with ``op``, ``target``, ``kind``, ``shape``, ``dtype`` attributes
        (networkx is imported here: most runs never build the view, and it costs 0.1 s at import)."""
        import networkx as nx

        view = nx.DiGraph()
        for node in self.gm.graph.nodes:
            view.add_node(node.name, op=node.op, target=str(node.target), kind=self.kind(node),
                          shape=self.shape(node), dtype=self.dtype(node))
            for index, parent in enumerate(node.all_input_nodes):
                view.add_edge(parent.name, node.name, index=index)
        return view

    # -- verification --------------------------------------------------------------
    def lint(self) -> None:
        """Check the graph is well formed; raise GraphLintError naming the node if not."""
        seen: set[fx.Node] = set()
        outputs = 0
        modules = self.modules()
        for node in self.gm.graph.nodes:
            for parent in node.all_input_nodes:
                if parent not in seen:
                    raise GraphLintError(f"node {node.name!r} uses {parent.name!r} before it is defined", node.name)
            if node.op == "call_module" and node.target not in modules:
                raise GraphLintError(f"node {node.name!r} calls missing submodule {node.target!r}", node.name)
            if node.op == "get_attr":
                try:
                    self.attr(node.target)
                except AttributeError:
                    raise GraphLintError(f"node {node.name!r} reads missing attribute {node.target!r}",
                                         node.name) from None
            outputs += node.op == "output"
            seen.add(node)
        if outputs != 1:
            raise GraphLintError(f"graph has {outputs} output nodes, expected exactly 1")
        try:
            self.gm.graph.lint()
        except Exception as exc:  # fx's own checks; its message names the node
            raise GraphLintError(f"fx lint: {exc}") from exc

    # -- rewriting primitives shared by all passes ---------------------------------
    def replace_module(self, qualname: str, new: nn.Module) -> None:
        """Put ``new`` where the submodule ``qualname`` was."""
        setattr(*owner_and_leaf(self.gm, qualname), new)

    def users_of_module(self, qualname: str) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "call_module" and n.target == qualname]

    def bypass(self, node: fx.Node, replacement: fx.Node) -> None:
        """Route every use of ``node`` to ``replacement`` and erase ``node``."""
        node.replace_all_uses_with(replacement)
        self.gm.graph.erase_node(node)

    def commit(self) -> None:
        """Finish a structural edit: drop unused submodules, regenerate code, reclassify nodes,
        and drop every cached analysis (shapes, cost, channel groups all follow the structure).
        Edits that only change values leave the analyses their pass does not ``invalidate``."""
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()
        self.classify()
        self.invalidate()

    # -- summaries -----------------------------------------------------------------
    def summary(self) -> list[dict[str, Any]]:
        """One row per node: name, kind, target, shape, dtype, params, MACs."""
        cost = self.analysis("cost")
        rows = []
        for node in self.gm.graph.nodes:
            c = cost.nodes[node.name]
            rows.append({"node": node.name, "kind": self.kind(node).value, "target": op_name(node),
                         "shape": self.shape(node), "dtype": _dtype_name(self.dtype(node)),
                         "params": c.params, "macs": c.macs})
        return rows

    def __repr__(self) -> str:
        n = sum(1 for _ in self.gm.graph.nodes)
        return f"Graph({type(self.gm).__name__}, {n} nodes, captured_by={self.captured_by!r})"


def _dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).replace("torch.", "")
    return "" if dtype is None else str(dtype)
