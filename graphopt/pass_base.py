"""The pass interface: one small base class, a registry, and the result type.

A pass declares its registered ``name``, its numerical ``contract``, what it
``requires`` (an analysis, a named input such as ``calibration_data``, or a property an
earlier pass ``ensures``), what it ``ensures``, and which cached analyses it ``preserves``
when it changes the graph (none by default: an analysis added later, by anyone, is never
kept stale by a pass that did not know it).
"""
from __future__ import annotations

import enum
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, TypeVar

from graphopt.analysis import analysis_names
from graphopt.errors import ConfigError, GraphoptError
from graphopt.ir import Graph
from graphopt.options import check_options
from graphopt.plugins import load_plugins


class Contract(str, enum.Enum):
    EXACT = "exact"      # outputs equal within float tolerance
    BOUNDED = "bounded"  # lossy; error measured, reported and held to the pass's bound
    NONE = "none"        # no promise (e.g. a pass followed by retraining)


EXACT_TOLERANCE = 1e-5


@dataclass
class PassResult:
    """What a pass did. ``reference``, when given, is the graph whose outputs the result
    must match under the pass's contract (pruning: the original with the pruned channels
    masked); by default the contract is checked against the graph before the pass."""

    graph: Graph
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    reference: Graph | None = None


@dataclass
class PassContext:
    """What a pipeline hands its passes besides the graph: named data (``calibration_data``,
    ``train_data``, ...), keyed by the names passes list in ``requires``."""

    data: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class of every pass. Subclass, set the class attributes, implement ``run``."""

    name: ClassVar[str] = ""
    # contract, bound and requires may be set per instance when options change them
    # (fine-tuning makes a pass's contract NONE and requires train_data)
    contract: Contract = Contract.EXACT
    bound: float | None = None
    requires: frozenset[str] = frozenset()
    ensures: ClassVar[frozenset[str]] = frozenset()
    preserves: ClassVar[frozenset[str]] = frozenset()  # analyses still valid after a change
    invalidates: ClassVar[frozenset[str] | None] = None  # the older spelling: what a change makes stale

    @classmethod
    def preserved_analyses(cls) -> frozenset[str]:
        """What survives this pass's change: ``preserves``; for a pass written against the older
        ``invalidates``, every registered analysis it does not name (None: none)."""
        if cls.preserves or cls.invalidates is None:
            return cls.preserves
        return frozenset(analysis_names()) - cls.invalidates

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    @classmethod
    def from_config(cls, options: dict[str, Any]) -> "Pass":
        """Build from a pipeline file's options, rejecting unknown keys and wrong types (a registered
        pass's constructor checks them; see register_pass)."""
        if not getattr(cls.__init__, "_checks_options", False):
            check_options(f"pass {cls.name!r}", cls.__init__, options)
        return cls(**options)

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


_PASSES: dict[str, type[Pass]] = {}
P = TypeVar("P", bound=type[Pass])


def register_pass(name: str) -> Callable[[P], P]:
    """Class decorator: make a Pass subclass available by ``name`` (Python and pipeline files)."""

    def decorate(cls: P) -> P:
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise GraphoptError(f"@register_pass({name!r}) must decorate a subclass of Pass")
        existing = _PASSES.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise GraphoptError(f"pass name {name!r} is taken by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        if "__init__" in cls.__dict__ and not getattr(cls.__init__, "_checks_options", False):
            cls.__init__ = _checked_init(cls.__init__, name)
        _PASSES[name] = cls
        return cls

    return decorate


def _checked_init(init: Callable, name: str) -> Callable:
    """``init`` with its arguments type-checked as a pipeline file's are, so a Python caller's
    ``FoldQDQ(bound="x")`` is a ConfigError naming the option, not a TypeError deep in a pass."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def checked(self, *args, **kwargs):
        check_options(f"pass {name!r}", init, kwargs)   # unknown keys listed with the valid ones
        if args:   # positional arguments: bound to their names, then checked the same way
            try:
                bound = signature.bind(self, *args, **kwargs)
            except TypeError as exc:
                raise ConfigError(f"pass {name!r}: {exc}") from None
            check_options(f"pass {name!r}", init, {k: v for k, v in bound.arguments.items()
                                                    if k != "self" and k not in kwargs})
        init(self, *args, **kwargs)

    checked._checks_options = True   # type: ignore[attr-defined]
    return checked


def registered_passes() -> dict[str, type[Pass]]:
    load_plugins()
    return dict(sorted(_PASSES.items()))


def get_pass(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        raise ConfigError(f"unknown pass {name!r}; registered passes: {', '.join(passes) or '(none)'}")
    return passes[name]
