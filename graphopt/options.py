"""Typed options: one pydantic model per pass and backend, generated from its signature.

A pass takes its options as keyword arguments of ``__init__`` (a backend: of its export
function); the signature is the single declaration of each option's name, type, default and
range. ``options_model`` turns it into a pydantic model (strict: no string read as a number,
no bool as an int; NaN refused; unknown keys refused), which checks a Python caller's keywords
and a pipeline file's table the same way. What is wrong is a ConfigError naming the owner, the
option and what would have been valid::

    pass 'fold_qdq': option 'bound' must be float, got str 'x'
    pass 'prune_channels': option 'ratio' must be a finite float >= 0 and < 1 or None, got float 1.5
    pass 'insert_qdq': unknown option 'observr'; valid options: observer, activation_dtype, ...

Ranges are declared in the signature with the aliases below (``annotated_types`` constraints)::

    def __init__(self, lr: Positive = 1e-3, max_batches: Count | None = None, bound: Tolerance = 0.05): ...

Rules across options (exactly one of ``ratio``/``target_macs``, say) live in a pass's ``Rules``
class, a subclass of :class:`Options` holding pydantic validators; its ``renamed`` table keeps
old option names working, with a DeprecationWarning naming the new one. Each option's
description comes from ``Field(description=...)`` in its annotation, or from an ``Options:``
section of the pass's (the backend's) docstring, one ``name: text`` line per option.
"""
from __future__ import annotations

import contextvars
import difflib
import inspect
import math
import re
import types
import typing
import warnings
from dataclasses import dataclass
from typing import Annotated, Any, Callable, ClassVar, Literal

import annotated_types as at
from pydantic import AfterValidator, AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, \
    ValidationError, create_model, model_validator
from pydantic.fields import FieldInfo

from graphopt.errors import ConfigError

FINITE = AllowInfNan(False)

Positive = Annotated[float, at.Gt(0), FINITE]                   # a learning rate, a temperature, epochs
NonNegative = Annotated[float, at.Ge(0), FINITE]                # a weight decay, a loss weight
Tolerance = Annotated[float, at.Ge(0)]                          # an error bound (inf: accept any error)
Fraction = Annotated[float, at.Ge(0), at.Le(1), FINITE]         # a mixing weight
Share = Annotated[float, at.Gt(0), at.Le(1), FINITE]            # a share kept or reached: energy, target_macs
Sparsity = Annotated[float, at.Ge(0), at.Lt(1), FINITE]         # a share removed: some must stay
Count = Annotated[int, at.Ge(1)]                                # batches, iterations
Index = Annotated[int, at.Ge(0)]                                # a count that may be zero


@dataclass(frozen=True)
class Expect:
    """Annotation metadata: what an option must be, in words, where the type does not say it
    well (``Annotated[str, Expect("a registered importance criterion")]``); ``text`` may be a
    function, for lists that grow (registered names)."""

    text: str | Callable[[], str]

    def __str__(self) -> str:
        return self.text() if callable(self.text) else self.text


def choice(names: Callable[[], Any], also: str = "") -> Any:
    """The type of an option naming one of a list that may grow (registered observers, targets):
    ``Annotated[str, ...]`` checked against ``names()`` when a value is checked; ``also`` adds to
    the description what else the option takes ("or an Importance object"). Give it a name at
    module level (``ObserverName = choice(observer_names)``) and annotate with that name: a lambda
    written inside a string annotation is evaluated where it cannot see the module's names."""
    def listing() -> str:
        return "one of " + ", ".join(names()) + (f" {also}" if also else "")

    def check(value: str) -> str:
        if value not in names():
            raise ValueError(listing())
        return value

    return Annotated[str, Expect(listing), AfterValidator(check)]


@dataclass(frozen=True)
class Renamed:
    """An old option name (or an old spelling of one: ``when`` says which values, ``spelling``
    names them, "as a table") that still works: the value moves to ``new`` and a
    DeprecationWarning says so."""

    new: str
    when: Callable[[Any], bool] | None = None
    spelling: str = ""

    def describe(self, old: str, quote: bool = True) -> str:
        """The old name (and spelling): "'layers' as a table"."""
        return (repr(old) if quote else old) + (f" {self.spelling}" if self.spelling else "")


_renames: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("graphopt_option_renames", default=None)


class Options(BaseModel):
    """Base of every generated option model. A pass subclasses it as ``Rules`` to add pydantic
    validators across options and ``renamed`` (deprecated) option names; the fields come from
    the signature."""

    model_config = ConfigDict(strict=True, extra="forbid", arbitrary_types_allowed=True)

    owner: ClassVar[str] = "options"
    renamed: ClassVar[dict[str, str | Renamed]] = {}
    declared: ClassVar[dict[str, Any]] = {}   # each option's annotation as written (for messages)

    @model_validator(mode="before")
    @classmethod
    def _apply_renames(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not cls.renamed:
            return data
        data = dict(data)
        for old, rule in cls.renamed.items():
            rule = Renamed(rule) if isinstance(rule, str) else rule
            if old not in data or (rule.when is not None and not rule.when(data[old])):
                continue
            if rule.new in data and rule.new != old:
                raise ValueError(f"give {rule.new}, not both {rule.new} and {old} (its deprecated name)")
            message = f"{cls.owner}: option {rule.describe(old)} is deprecated; write {rule.new!r}"
            pending = _renames.get()
            if pending is None:
                warnings.warn(message, DeprecationWarning, stacklevel=2)
            else:
                pending.append(message)
            data[rule.new] = data.pop(old)
        return data


# -- building a model from a signature ----------------------------------------------------------------
def option_names(fn: Callable) -> list[str]:
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _annotations(fn: Callable) -> dict[str, Any]:
    """Each parameter's annotation, resolved where the module's names allow (one unresolvable
    annotation leaves the others resolved; one that stays a string accepts any value)."""
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:
        pass
    resolved = {}
    for name, param in inspect.signature(fn).parameters.items():
        annotation = param.annotation
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, getattr(fn, "__globals__", {}))   # as get_type_hints would
            except Exception:
                annotation = {"int": int, "float": float, "bool": bool, "str": str}.get(annotation, Any)
        resolved[name] = annotation
    return resolved


def _not_nan(value: float) -> float:
    if math.isnan(value):
        raise ValueError("a number, not NaN")
    return value


def _tuple_as_list(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value   # a Python caller's tuple for a list


def _strict(annotation: Any) -> Any:
    """``annotation`` as the model checks it: NaN refused wherever a float is due (a range
    refuses it too: NaN compares false), a tuple taken for a list."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is float:
        return Annotated[float, AfterValidator(_not_nan)]
    if annotation is inspect.Parameter.empty or isinstance(annotation, str):
        return Any
    if origin is Annotated:
        return Annotated[(_strict(args[0]), *args[1:])]
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_strict(a) for a in args)]
    if origin is list or annotation is list:
        inner = list[_strict(args[0])] if args else list
        return Annotated[inner, BeforeValidator(_tuple_as_list)]
    if origin is dict and args:
        return dict[_strict(args[0]), _strict(args[1])]
    return annotation


def docstring_options(doc: str | None) -> dict[str, str]:
    """The ``name: text`` lines of a docstring's ``Options:`` section (continuation lines,
    indented further, join the text)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    found: dict[str, str] = {}
    for start, line in enumerate(lines):
        if line.strip() == "Options:":
            break
    else:
        return found
    indent, name = None, None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent or depth == 0:
            break
        match = re.match(r"(\w+): (.*)", line.strip()) if depth == indent else None
        if match:
            name = match.group(1)
            found[name] = match.group(2).strip()
        elif name is not None:
            found[name] += " " + line.strip()
    return found


def options_model(owner: str, fn: Callable, *, skip: tuple[str, ...] = (), base: type[Options] = Options,
                  doc: str | None = None) -> type[Options]:
    """The option model of ``fn``'s keyword parameters (but ``skip``), checked as ``base`` says.
    ``owner`` names it in messages ("pass 'prune_channels'"); ``doc`` (default: ``fn``'s
    docstring) may describe each option in an ``Options:`` section."""
    hints = _annotations(fn)
    described = docstring_options(doc if doc is not None else fn.__doc__)
    fields: dict[str, Any] = {}
    declared: dict[str, Any] = {}
    for param in inspect.signature(fn).parameters.values():
        if param.name in ("self",) + tuple(skip) or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = hints.get(param.name, param.annotation)
        annotation = Any if annotation is inspect.Parameter.empty else annotation
        declared[param.name] = annotation
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (_strict(annotation), Field(default, description=_description(annotation)
                                                         or described.get(param.name)))
    name = "".join(part.capitalize() for part in re.findall(r"[A-Za-z0-9]+", owner)) + "Options"
    model = create_model(name, __base__=base, __module__=getattr(fn, "__module__", __name__), **fields)
    model.owner = owner
    model.declared = declared
    return model


def _description(annotation: Any) -> str | None:
    if typing.get_origin(annotation) is Annotated:
        for meta in typing.get_args(annotation)[1:]:
            if isinstance(meta, FieldInfo) and meta.description:
                return meta.description
    return None


# -- checking values ------------------------------------------------------------------------------------
def validate_options(model: type[Options], options: dict[str, Any], stacklevel: int = 2) -> dict[str, Any]:
    """The options a caller gave, checked (ConfigError otherwise) and with deprecated names
    replaced (a DeprecationWarning each, attributed as ``warnings.warn(stacklevel=...)`` would
    from here: 2 is this function's caller)."""
    pending: list[str] = []
    token = _renames.set(pending)
    try:
        checked = model.model_validate(options)
    except ValidationError as exc:
        raise ConfigError(explain(model, exc, options)) from None
    finally:
        _renames.reset(token)
    for message in pending:
        warnings.warn(message, DeprecationWarning, stacklevel=stacklevel)
    return {key: getattr(checked, key) for key in model.model_fields if key in checked.model_fields_set}


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number",
                 "multiple_of", "too_short", "too_long"}


def explain(model: type[Options], exc: ValidationError, options: dict[str, Any]) -> str:
    """One line for the first thing wrong, in the order the caller gave the options."""
    order = {key: index for index, key in enumerate(options)}
    errors = sorted(exc.errors(), key=lambda e: order.get(e["loc"][0], len(order)) if e["loc"] else len(order) + 1)
    first = errors[0]
    if not first["loc"]:   # a rule across options
        return f"{model.owner}: {_reason(first)}"
    key = first["loc"][0]
    if first["type"] == "extra_forbidden":
        valid = list(model.model_fields)
        close = difflib.get_close_matches(str(key), valid, n=1)
        return (f"{model.owner}: unknown option {key!r}; valid options: {', '.join(valid) if valid else '(none)'}"
                + (f" (did you mean {close[0]!r}?)" if close else ""))
    if first["type"] == "missing":
        return f"{model.owner}: option {key!r} is required"
    mine = [e for e in errors if e["loc"] and e["loc"][0] == key]
    old = _old_name(model, key, options)
    value = options[key] if key in options else options[old] if old else first.get("input")
    annotation = model.declared.get(key, Any)
    custom = [e for e in mine if e["type"] == "value_error"]
    if isinstance(value, float) and math.isnan(value) and _accepts(_loose(annotation), 0.0):
        expected = "a number, not NaN"
    elif custom and not _has_expect(annotation):
        expected = _reason(custom[0])
    else:
        expected = describe(annotation, constraints=any(e["type"] in _RANGE_ERRORS for e in mine))
    hint = f" (write [{value!r}])" if isinstance(value, str) and _accepts(annotation, [value]) else ""
    given = f" (given as {old!r})" if old and key not in options else ""
    return f"{model.owner}: option {key!r}{given} must be {expected}, got {type(value).__name__} {value!r}{hint}"


def _old_name(model: type[Options], key: str, options: dict[str, Any]) -> str | None:
    """The deprecated name under which the caller gave ``key``, if any."""
    for old, rule in model.renamed.items():
        if (rule if isinstance(rule, str) else rule.new) == key and old in options and old != key:
            return old
    return None


def _reason(error: dict) -> str:
    cause = (error.get("ctx") or {}).get("error")
    return str(cause) if cause is not None else error["msg"]


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether ``value`` is a valid ``annotation`` (for hints in messages: never raises)."""
    try:
        _adapter(annotation).validate_python(value, strict=True)
        return True
    except Exception:   # ValidationError, or a type pydantic cannot adapt
        return False


_ADAPTERS: dict[int, tuple[Any, TypeAdapter]] = {}


def _adapter(annotation: Any) -> TypeAdapter:
    entry = _ADAPTERS.get(id(annotation))
    if entry is None or entry[0] is not annotation:
        entry = (annotation, TypeAdapter(_strict(annotation), config=ConfigDict(arbitrary_types_allowed=True)))
        _ADAPTERS[id(annotation)] = entry
    return entry[1]


def _loose(annotation: Any) -> Any:
    """``annotation`` without its range constraints."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _loose(args[0])
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_loose(a) for a in args)]
    return annotation


def _has_expect(annotation: Any) -> bool:
    return typing.get_origin(annotation) is Annotated and any(isinstance(m, Expect)
                                                              for m in typing.get_args(annotation)[1:])


def _expect_text(args: tuple) -> str:
    """The words of the first ``Expect`` among an Annotated type's metadata."""
    return str(next(m for m in args[1:] if isinstance(m, Expect)))


# -- describing types, for messages and the option reference -----------------------------------------------
def _bounds(metadata: list) -> tuple[list[str], bool]:
    """The range a field's metadata declares, as text, and whether it is held finite."""
    parts, finite = [], False
    for meta in metadata:
        if isinstance(meta, FieldInfo):
            more, held = _bounds(meta.metadata)
            parts += more
            finite = finite or held
        elif isinstance(meta, at.Interval):
            more, held = _bounds([at.Gt(meta.gt) if meta.gt is not None else None,
                                  at.Ge(meta.ge) if meta.ge is not None else None,
                                  at.Lt(meta.lt) if meta.lt is not None else None,
                                  at.Le(meta.le) if meta.le is not None else None])
            parts += more
        elif isinstance(meta, at.Gt):
            parts.append(f"> {meta.gt:g}")
        elif isinstance(meta, at.Ge):
            parts.append(f">= {meta.ge:g}")
        elif isinstance(meta, at.Lt):
            parts.append(f"< {meta.lt:g}")
        elif isinstance(meta, at.Le):
            parts.append(f"<= {meta.le:g}")
        elif isinstance(meta, at.MultipleOf):
            parts.append(f"a multiple of {meta.multiple_of:g}")
        elif isinstance(meta, AllowInfNan) and not meta.allow_inf_nan:
            finite = True
    return parts, finite


def describe(annotation: Any, constraints: bool = True) -> str:
    """What a value of ``annotation`` is, in words: "a finite float > 0", "an int >= 1 or None",
    "one of uniform, global", "list[str]" (``constraints=False``: the type alone)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        if _has_expect(annotation):
            return _expect_text(args)
        bounds, finite = _bounds(list(args[1:]))
        base = describe(args[0], False)
        if not constraints or not bounds:
            return base
        article = "an" if args[0] is int else "a finite" if finite else "a"
        return f"{article} {base} " + " and ".join(bounds)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [describe(a, constraints) for a in args if a is not type(None)]
        return " or ".join(parts + (["None"] if type(None) in args else []))
    if annotation is type(None):
        return "None"
    if annotation is Any or annotation is inspect.Parameter.empty:
        return "any value"
    if origin is dict:
        values = describe(args[1], False) if args and args[1] is not Any else ""
        return "a table" + (f" of {values} values" if values else "")
    if origin in (list, tuple, set):
        return f"{origin.__name__}[{', '.join(describe(a, False) if a is not Ellipsis else '...' for a in args)}]"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def type_name(annotation: Any) -> str:
    """The type of an option, without its range: "float or None", "list[str]", "str"."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " or ".join(dict.fromkeys(type(a).__name__ for a in args))
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(dict.fromkeys(names + (["None"] if type(None) in args else [])))
    if origin is dict or annotation is dict:
        return "table"
    if origin in (list, tuple, set):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args if a is not Ellipsis)}]"
    if annotation is Any or annotation is inspect.Parameter.empty:
        return "any"
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def allowed(annotation: Any) -> str:
    """What values of its type an option takes: "> 0 and <= 1", "one of uniform, global" ("" for any)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        if _has_expect(annotation):
            return _expect_text(args)
        bounds, _ = _bounds(list(args[1:]))
        return " and ".join(bounds) or allowed(args[0])
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return "; ".join(part for part in (allowed(a) for a in args if a is not type(None)) if part)
    if origin is dict and args:
        inner = allowed(args[1])
        return f"values {inner}" if inner else ""
    return ""


@dataclass(frozen=True)
class OptionDoc:
    """One row of an option reference."""

    name: str
    type: str
    default: str
    allowed: str
    description: str


def option_reference(model: type[Options]) -> list[OptionDoc]:
    """Each option of ``model``: its type, default, allowed values and description."""
    rows = []
    for name, field in model.model_fields.items():
        annotation = model.declared.get(name, field.annotation)
        default = "(required)" if field.is_required() else _toml(field.default)
        rows.append(OptionDoc(name, type_name(annotation), default, allowed(annotation), field.description or ""))
    return rows


def renamed_options(model: type[Options]) -> dict[str, str]:
    """Deprecated option names (and spellings) and the names that replace them."""
    rules = {old: Renamed(rule) if isinstance(rule, str) else rule for old, rule in model.renamed.items()}
    return {rule.describe(old, quote=False): rule.new for old, rule in rules.items()}


def _toml(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value)
