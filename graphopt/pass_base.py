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
from graphopt.options import Options, options_model, validate_options
from graphopt.registry import Registry


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

    # rules across options (pydantic validators) and deprecated option names; the options
    # themselves are __init__'s keyword parameters (see graphopt.options)
    Rules: ClassVar[type[Options]] = Options

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    @classmethod
    def options_model(cls) -> type[Options]:
        """The pydantic model of this pass's options (built once from ``__init__``'s signature,
        ``Rules`` and the ``Options:`` section of the class docstring)."""
        model = cls.__dict__.get("_options_model")
        if model is None:
            model = options_model(f"pass {cls.name or cls.__name__!r}", inspect.unwrap(cls.__init__), base=cls.Rules,
                                  doc=cls.__doc__)
            cls._options_model = model
        return model

    @classmethod
    def from_config(cls, options: dict[str, Any]) -> "Pass":
        """Build from a pipeline file's options, rejecting unknown keys and wrong types (a registered
        pass's constructor checks them; see register_pass)."""
        if not getattr(cls.__init__, "_checks_options", False):
            options = validate_options(cls.options_model(), options)
        return cls(**options)

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


PASSES: Registry[type[Pass]] = Registry("pass", "passes")
P = TypeVar("P", bound=type[Pass])


def register_pass(name: str) -> Callable[[P], P]:
    """Class decorator: make a Pass subclass available by ``name`` (Python and pipeline files)."""

    def decorate(cls: P) -> P:
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise GraphoptError(f"@register_pass({name!r}) must decorate a subclass of Pass")
        PASSES.add(name, cls)
        cls.name = name
        if "__init__" in cls.__dict__ and not getattr(cls.__init__, "_checks_options", False):
            cls.__init__ = _checked_init(cls, cls.__init__)
        return cls

    return decorate


def _checked_init(cls: type[Pass], init: Callable) -> Callable:
    """``init`` with its arguments checked by the pass's option model, as a pipeline file's are,
    so a Python caller's ``FoldQDQ(bound="x")`` is a ConfigError naming the option, not a
    TypeError deep in a pass; ``init`` receives the checked values (deprecated names replaced)."""
    params = [p for p in inspect.signature(init).parameters.values()][1:]
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    extra = any(p.kind == p.VAR_KEYWORD for p in params)

    @functools.wraps(init)
    def checked(self, *args, **kwargs):
        # a registered subclass that inherits this __init__ is checked by its own model (its Rules)
        owner_cls = type(self) if type(self).__init__ is checked else cls
        owner = f"pass {owner_cls.name!r}"
        if len(args) > len(positional):
            raise ConfigError(f"{owner}: takes {len(positional)} options by position, got {len(args)}")
        for key, value in zip(positional, args):
            if key in kwargs:
                raise ConfigError(f"{owner}: option {key!r} given twice (by position and by name)")
            kwargs[key] = value
        model = owner_cls.options_model()
        passed = {k: kwargs.pop(k) for k in list(kwargs) if extra and k not in model.model_fields
                  and k not in model.renamed}
        init(self, **validate_options(model, kwargs, stacklevel=3), **passed)

    checked._checks_options = True   # type: ignore[attr-defined]
    return checked


def registered_passes() -> dict[str, type[Pass]]:
    return PASSES.entries()


def get_pass(name: str) -> type[Pass]:
    return PASSES.get(name)
