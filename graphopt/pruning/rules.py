"""The channel analysis's rules: how one layer type or op moves channels, registered so a user
can teach graphopt their own layer without editing it.

A *module rule* ``rule(analysis, node, module, x)`` serves every module whose type is, or
derives from, the registered type (the most derived registration wins); ``x`` is the channel
layout of the module's first input, or None when it carries no tracked channels. An *op rule*
``rule(analysis, node)`` serves functions and methods by op name (``"einsum"``, aten's
``"linear"``), or, failing that, by op kind. A rule returns the layout of the node's output
(None: nothing tracked) and records, through ``analysis``, where channel spaces live
(``add_members``) and what it cannot follow (``block``). A node no rule serves blocks every
space that reaches it, with the reason recorded: nothing is guessed.

A rule that raises blocks the spaces reaching its node, with the exception as the reason; in
*strict* mode (``strict_rules()``, on in graphopt's tests) the exception propagates instead,
as a ``ChannelRuleError`` naming the node and the rule.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator

from graphopt.errors import GraphoptError
from graphopt.ops import OpKind
from graphopt.registry import Registry

if TYPE_CHECKING:
    import torch.nn as nn
    from torch import fx

ModuleRule = Callable[..., Any]   # (analysis, node, module, x) -> layout
OpRule = Callable[..., Any]       # (analysis, node) -> layout

_MODULE_RULES: Registry[ModuleRule] = Registry("channel rule", describe=lambda t: f"module type {t.__qualname__}")
_OP_RULES: Registry[OpRule] = Registry("channel rule", describe=lambda name: f"op {name!r}")
_KIND_RULES: Registry[OpRule] = Registry("channel rule", describe=lambda k: f"op kind {k.value!r}")
_strict = False


class ChannelRuleError(GraphoptError):
    """A channel rule raised on a node while strict mode was on."""


def _as_tuple(value: Any) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def channel_rule(*, module: type | tuple[type, ...] = (), op: str | tuple[str, ...] = (),
                 kind: OpKind | tuple[OpKind, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator: make ``fn`` the channel rule of module types, op names or op kinds (give one).
    Registering a second rule for the same key is refused (re-registering the same function,
    as a module reload does, is not)."""
    modules, ops, kinds = _as_tuple(module), _as_tuple(op), _as_tuple(kind)
    if sum(map(bool, (modules, ops, kinds))) != 1:
        raise GraphoptError("channel_rule takes one of module=, op= or kind=")

    def decorate(fn: Callable) -> Callable:
        for t in modules:
            if not isinstance(t, type):
                raise GraphoptError(f"channel_rule(module=...) takes module classes, got {t!r}")
            _MODULE_RULES.add(t, fn)
        for name in ops:
            _OP_RULES.add(str(name), fn)
        for k in kinds:
            _KIND_RULES.add(OpKind(k), fn)
        return fn

    return decorate


def module_rule(module: "nn.Module") -> ModuleRule | None:
    """The rule for ``module``'s type, or its nearest registered base class."""
    return _MODULE_RULES.find_type(type(module))


def op_rule(name: str, kind: OpKind) -> OpRule | None:
    """The rule for a function or method call: by op name first, then by op kind."""
    return _OP_RULES.find(name) or _KIND_RULES.find(kind)


def is_strict() -> bool:
    return _strict


@contextlib.contextmanager
def strict_rules(on: bool = True) -> Iterator[None]:
    """Within this block a rule that raises fails the analysis instead of blocking channels."""
    global _strict
    before, _strict = _strict, on
    try:
        yield
    finally:
        _strict = before


def set_strict(on: bool) -> None:
    """Strict mode for the rest of the process (graphopt's test suite turns it on)."""
    global _strict
    _strict = on


def rule_failed(node: "fx.Node", rule: Callable | None, exc: Exception) -> ChannelRuleError:
    name = f"{rule.__module__}.{rule.__qualname__}" if rule is not None else "the channel analysis"
    return ChannelRuleError(f"channel rule {name} failed on node {node.name!r}: {type(exc).__name__}: {exc}")
