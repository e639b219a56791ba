"""Pipelines from TOML files: model source, example input, passes, backends, evaluation.

Everything in the file is checked before any work starts (unknown keys, wrong types,
missing files, unwritable outputs, unknown passes or backends), so a typo costs
seconds, not a half-finished run. The tables are typed (pydantic models below, with a pass's or
backend's own option model for its further keys); what is wrong is a ConfigError naming the key.

    [model]                  # one of: torchvision = "resnet18" | factory = "pkg.mod:fn"
    factory = "graphopt.tools.digits:DigitsCNN"
    checkpoint = "digits_cnn.pt"   # a state_dict (paths are relative to this file)
    input_shape = [1, 1, 8, 8]

    [[passes]]
    name = "fold_batchnorm"        # further keys are the pass's options (graphopt passes NAME)

    [[backends]]
    name = "onnx"
    path = "out/digits.onnx"       # further keys are the backend's options (graphopt backends NAME)

    [evaluate]
    data = "graphopt.tools.digits:test_batches"   # callable -> iterable of (inputs, labels)

    [report]
    json = "out/report.json"
"""
from __future__ import annotations

import difflib
import functools
import importlib
import os
import time
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable

import torch
import torch.nn as nn
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from graphopt import distributed
from graphopt.backend import ExportReport, check_backend_options, get_backend
from graphopt.devices import resolve as resolve_device
from graphopt.errors import ConfigError
from graphopt.app.evaluate import top1_accuracy
from graphopt.files import check_output_path
from graphopt.ir import Graph
from graphopt.app.latency import interleaved_latency
from graphopt.memory import check_fits, tensor_bytes
from graphopt.options import Count, Expect, choice, describe
from graphopt.pass_base import Pass, PassContext, get_pass
from graphopt.pass_manager import PassManager, PassRecord
from graphopt.trace import trace

METRICS = {"top1": top1_accuracy}
Metric = choice(lambda: METRICS)   # an alias: a lambda written in a (string) annotation would not see METRICS
CALLABLE = Annotated[str, Expect("a 'package.module:attribute' string")]


# -- the tables of a pipeline file ---------------------------------------------------------------------
class Table(BaseModel):
    """A table of a pipeline file: strict types, unknown keys refused."""

    model_config = ConfigDict(strict=True, extra="forbid")


def _shapes(shape: list) -> list[list[int]]:
    """``input_shape``: one shape (a list of positive integers) or a list of them, one per input."""
    shapes = shape if shape and isinstance(shape[0], list) else [shape]
    for s in shapes:
        if not isinstance(s, list) or not s or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                       for d in s):
            raise ValueError(INPUT_SHAPE)
    return shapes


INPUT_SHAPE = "a list of positive integers (or one such list per input), e.g. [1, 3, 224, 224]"


class ModelTable(Table):
    """[model]: where the model comes from and the shape of its example input."""

    torchvision: Annotated[str, Expect("a torchvision model name")] | None = None
    factory: CALLABLE | None = None
    kwargs: dict[str, Any] = {}
    checkpoint: Annotated[str, Expect("a file path")] | None = None
    trusted_checkpoint: bool = False
    input_shape: Annotated[list, Expect(INPUT_SHAPE), AfterValidator(_shapes)]
    input_dtype: str = "float32"
    device: Annotated[str, Expect("a torch device name, e.g. \"cpu\", \"cuda\", \"cuda:1\"")] | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if self.torchvision is not None and self.factory is not None:
            raise ValueError("give one of torchvision or factory, not both")
        if self.torchvision is None and self.factory is None and self.checkpoint is None:
            raise ValueError("name a model source: torchvision = \"name\", factory = \"pkg.mod:fn\" or "
                             "checkpoint = \"path\"")
        return self


class Entry(Table):
    """A [[passes]] or [[backends]] entry: its name; further keys are the pass's (backend's) options."""

    model_config = ConfigDict(strict=True, extra="allow")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PassEntry(Entry):
    name: Annotated[str, Expect("a pass name")]


class BackendEntry(Entry):
    name: Annotated[str, Expect("a backend name")]
    path: Annotated[str, Expect("an output path")]


class EvaluateTable(Table):
    """[evaluate]: the data the model is evaluated on before and after, and the metric."""

    data: CALLABLE
    metric: Metric = "top1"
    limit: Count = 1


class ReportTable(Table):
    """[report]: a JSON report, and latency measured before and after."""

    json_path: Annotated[str, Expect("a path")] | None = Field(None, alias="json")   # BaseModel has .json
    latency: bool = False
    threads: Count = 2
    rounds: Count = 20


class DataTable(Table):
    """A [data] entry written as a table: the factory and its keyword arguments."""

    factory: CALLABLE
    kwargs: dict[str, Any] = {}


class PipelineFile(Table):
    """A pipeline file: the model, passes, backends, evaluation, report and named data."""

    model: ModelTable
    passes: Annotated[list[PassEntry], Expect("an array of tables ([[passes]])")] = []
    backends: Annotated[list[BackendEntry], Expect("an array of tables ([[backends]])")] = []
    evaluate: EvaluateTable | None = None
    report: ReportTable | None = None
    data: Annotated[dict[str, Any], Expect("a table of name = \"pkg.mod:fn\" entries")] = {}


def table_keys(model: type[BaseModel]) -> dict[str, str]:
    """The keys a table takes (as written in the file) and the fields they fill."""
    return {field.alias or name: name for name, field in model.model_fields.items()}


SECTIONS = set(table_keys(PipelineFile))
MODEL_KEYS = set(table_keys(ModelTable))
EVALUATE_KEYS = set(table_keys(EvaluateTable))
REPORT_KEYS = set(table_keys(ReportTable))


def check_table(model: type[BaseModel], table: Any, where: str, root: bool = False) -> Any:
    """``table`` (a TOML table named ``where``; with ``root``, a whole file named by its path) as
    ``model``; what is wrong is a ConfigError naming the key: "[model]: unknown key 'x'; valid keys:
    ...", "model.input_shape must be ..., got list [1, -1]"."""
    try:
        return model.model_validate(table)
    except ValidationError as exc:   # an unknown key first: a misspelt key also leaves one missing
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        raise ConfigError(_explain(model, errors[0], table, where, root)) from None


def _unwrap(annotation: Any) -> Any:
    """``annotation`` without Annotated metadata and without ``| None``."""
    while True:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is Annotated:
            annotation = args[0]
        elif origin in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
            annotation = next(a for a in args if a is not type(None))
        else:
            return annotation


def _is_table(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _explain(model: type[BaseModel], error: dict, table: Any, where: str, root: bool) -> str:
    """One line for pydantic's ``error``: the key's dotted name, what it must be, what it is."""
    loc, kind = list(error["loc"]), error["type"]
    names = [] if root else [where]
    node, value = model, table
    for part in loc:   # walk down to the table field (or table) the error is about
        inner = _unwrap(node)
        if _is_table(inner) and part in table_keys(inner):
            node = typing.get_type_hints(inner, include_extras=True)[table_keys(inner)[part]]
            names.append(str(part))
            value = value.get(part) if isinstance(value, dict) else None
        elif typing.get_origin(inner) is list and isinstance(part, int) \
                and _is_table(_unwrap(typing.get_args(inner)[0])):
            node = typing.get_args(inner)[0]
            names[-1] += f"[{part}]"
            value = value[part] if isinstance(value, list) and part < len(value) else None
        else:
            break
    inner, dotted = _unwrap(node), ".".join(names)
    if kind == "extra_forbidden":
        valid = ", ".join(sorted(table_keys(inner))) if _is_table(inner) else ""
        return f"{f'[{dotted}]' if dotted else where}: unknown key {loc[-1]!r}; valid keys: {valid}"
    if kind == "missing" and root and loc == ["model"]:
        return f"{where}: missing [model] table"
    if kind == "value_error" and _is_table(inner):   # a rule across the table's keys
        return f"[{dotted}]: {error['ctx']['error']}"
    expected = "a table" if _is_table(inner) else describe(node)
    if kind == "missing":
        return f"{dotted} must be {expected} (it is missing)"
    return f"{dotted} must be {expected}, got {type(value).__name__} {value!r}"


def check_keys(where: str, table: Any, valid: set[str]) -> dict:
    """A table that must have only ``valid`` keys (a compress spec's [data])."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table, got {type(table).__name__}")
    unknown = sorted(set(table) - valid)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(valid))}")
    return table


def resolve_callable(spec: str, where: str) -> Callable:
    """'package.module:attribute' -> the attribute, with errors that name ``where``."""
    if not isinstance(spec, str):
        raise ConfigError(f"{where} must be a 'package.module:attribute' string, got {type(spec).__name__} {spec!r}")
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{where}: {spec!r} is not of the form 'package.module:attribute'")
    if module_name.startswith("."):
        raise ConfigError(f"{where}: {module_name!r} is a relative module name; give the full 'package.module'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import module {module_name!r}: {exc}") from None
    except Exception as exc:   # the module itself fails: a syntax error, an exception at import
        raise ConfigError(f"{where}: importing module {module_name!r} failed: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{where}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{where}: {spec!r} is not callable")
    return target


# dtypes graphopt can make seeded example inputs of (random normal, or integers in [0, 100))
INPUT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
                torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


def input_dtype(name: Any) -> torch.dtype:
    """The torch dtype ``model.input_dtype`` names; a ConfigError for any other value, naming why."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"model.input_dtype: unknown dtype {name!r} (e.g. float32, int64)")
    if dtype not in INPUT_DTYPES:
        kind = "a quantized" if str(dtype).removeprefix("torch.").startswith(("qint", "quint")) else "an unsupported"
        raise ConfigError(f"model.input_dtype: {dtype} is {kind} dtype for example inputs; give one of "
                          f"{', '.join(str(d).removeprefix('torch.') for d in INPUT_DTYPES)} (graphopt quantizes "
                          f"a float model itself: insert_qdq)")
    return dtype


@dataclass
class ModelSpec:
    torchvision: str | None = None
    factory: str | None = None
    kwargs: dict = field(default_factory=dict)
    checkpoint: str | None = None
    trusted_checkpoint: bool = False
    input_shapes: list[list[int]] = field(default_factory=list)
    input_dtype: str = "float32"
    device: str | None = None     # where the model is put once built (the passes run there); None: the CPU

    def check_inputs(self, where: str = "model.input_shape") -> torch.dtype:
        """The input dtype, once the example inputs are known to be makeable and to fit in memory."""
        dtype = input_dtype(self.input_dtype)
        total = sum(tensor_bytes(s, dtype) for s in self.input_shapes)
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        check_fits(total, f"{where}: example inputs of shape {shapes} ({self.input_dtype})")
        return dtype

    def example_inputs(self) -> tuple:
        dtype = self.check_inputs()
        generator = torch.Generator().manual_seed(0)
        if dtype.is_floating_point or dtype.is_complex:
            return tuple(torch.randn(*s, generator=generator, dtype=dtype) for s in self.input_shapes)
        high = 2 if dtype == torch.bool else 100
        return tuple(torch.randint(0, high, s, generator=generator, dtype=dtype) for s in self.input_shapes)

    def build(self) -> nn.Module:
        model = None
        if self.torchvision:
            import torchvision

            known = torchvision.models.list_models()
            if self.torchvision not in known:
                close = difflib.get_close_matches(self.torchvision, known, n=3)
                raise ConfigError(f"model.torchvision: unknown model {self.torchvision!r}"
                                  + (f"; did you mean {', '.join(close)}?" if close else ""))
            model = _call("model.torchvision", lambda: torchvision.models.get_model(self.torchvision, weights=None,
                                                                                     **self.kwargs))
        elif self.factory:
            factory = resolve_callable(self.factory, "model.factory")
            model = _call(f"model.factory {self.factory}", lambda: factory(**self.kwargs))
        if model is not None and not isinstance(model, nn.Module):
            raise ConfigError(f"model: the model source gave {type(model).__name__}, not a torch.nn.Module")
        if self.checkpoint:
            model = _load_checkpoint(self.checkpoint, model, self.trusted_checkpoint)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model: the model source gave {type(model).__name__}, not a torch.nn.Module")
        if self.device is not None:
            model = model.to(resolve_device(self.device))
        return model.eval()


def _call(where: str, make: Callable) -> Any:
    """Run a user's model constructor; its failure is a ConfigError naming it and the reason."""
    try:
        return make()
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"{where} failed: {type(exc).__name__}: {text}") from exc


def _load_checkpoint(path: str, model: nn.Module | None, trusted: bool) -> nn.Module:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if model is not None or not trusted:
            hint = "" if model is not None else " (a whole pickled module needs trusted_checkpoint = true)"
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else "empty or unreadable file"
            raise ConfigError(f"model.checkpoint: cannot load {path} as a state_dict: "
                              f"{type(exc).__name__}: {text}{hint}") from None
        return torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if model is None:
        raise ConfigError(f"model.checkpoint: {path} holds weights only; name the architecture with "
                          "model.torchvision or model.factory")
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ConfigError(f"model.checkpoint: {path} holds a {type(state).__name__}, not a state_dict "
                          f"(a mapping of parameter names to tensors)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"model.checkpoint: {path} does not fit the model: {str(exc).splitlines()[0]} "
                          f"{' '.join(str(exc).split())[:400]}") from None
    return model


@dataclass
class PipelineConfig:
    path: str
    model: ModelSpec
    passes: list[Pass]
    backends: list[tuple[str, str, dict]]
    evaluate: dict | None = None
    report_json: str | None = None
    data: dict[str, Callable] = field(default_factory=dict)
    latency: dict | None = None  # {"threads": n, "rounds": n} when [report] latency = true


def data_factory(key: str, spec: Any) -> Callable:
    """A [data] entry: "pkg.mod:fn", or a table {factory = "pkg.mod:fn", kwargs = {...}}.
    Passes receive the callable and call it each time they need a fresh pass over the data."""
    where = f"data.{key}"
    if isinstance(spec, dict):
        table = check_table(DataTable, spec, where)
        return functools.partial(resolve_callable(table.factory, f"{where}.factory"), **table.kwargs)
    return resolve_callable(spec, where)


def read_toml(path: str, what: str) -> tuple[dict, Callable[[str], str]]:
    """A TOML file's tables, and a function making paths relative to the file."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:   # TOML files are UTF-8 text
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    base = os.path.dirname(os.path.abspath(path))

    def local(p: str) -> str:
        return p if not p or os.path.isabs(p) else os.path.join(base, p)   # "" stays empty: refused as such

    return raw, local


def read_config(path: str, what: str, sections: set[str]) -> tuple[dict, Callable[[str], str], ModelSpec]:
    """A TOML file with a [model] table (pipeline or compress spec): its tables, a function making
    paths relative to the file, and the checked model."""
    raw, local = read_toml(path, what)
    check_keys(path, raw, sections)
    if "model" not in raw:
        raise ConfigError(f"{path}: missing [model] table")
    return raw, local, parse_model(check_table(ModelTable, raw["model"], "model"), local)


def load_pipeline(path: str | os.PathLike) -> PipelineConfig:
    """Parse and fully check a pipeline file."""
    path = os.fspath(path)
    raw, local = read_toml(path, "pipeline file")
    document: PipelineFile = check_table(PipelineFile, raw, path, root=True)
    model = parse_model(document.model, local)

    passes = [get_pass(entry.name).from_config(entry.options) for entry in document.passes]

    backends = []
    for i, entry in enumerate(document.backends):
        get_backend(entry.name)
        out = check_output_path(local(entry.path), f"backends[{i}].path")
        backends.append((entry.name, out, check_backend_options(entry.name, entry.options)))

    evaluate = None
    if document.evaluate is not None:
        evaluate = document.evaluate.model_dump()
        resolve_callable(evaluate["data"], "evaluate.data")

    report_json, latency = None, None
    if document.report is not None:
        report = document.report
        if report.json_path is not None:
            report_json = check_output_path(local(report.json_path), "report.json")
        if report.latency:
            latency = {"threads": report.threads, "rounds": report.rounds}

    data = {key: data_factory(key, spec) for key, spec in document.data.items()}
    config = PipelineConfig(path, model, passes, backends, evaluate, report_json, data, latency)
    check_outputs(config)
    return config


def check_outputs(config: PipelineConfig, report_json: str | None = None) -> None:
    """Refuse, before any work, an output that would overwrite an input (the pipeline file, the
    checkpoint) or another output: paths compared after resolving links and ``..``."""
    claims: dict[str, str] = {os.path.realpath(config.path): "the pipeline file"}
    if config.model.checkpoint:
        claims[os.path.realpath(config.model.checkpoint)] = "model.checkpoint"
    outputs = [(f"backends[{i}].path", path) for i, (_, path, _) in enumerate(config.backends)]
    if report_json is not None:
        check_output_path(report_json, "the report JSON")
    json_path = report_json if report_json is not None else config.report_json
    if json_path:
        outputs.append(("the report JSON" if report_json is not None else "report.json", json_path))
    for where, path in outputs:
        real = os.path.realpath(path)
        if real in claims:
            raise ConfigError(f"{where}: {path} would overwrite {claims[real]}; choose another path")
        claims[real] = where


def parse_model(table: ModelTable, local: Callable[[str], str]) -> ModelSpec:
    """The model a checked [model] table names, its sources resolved and its inputs sized."""
    spec = ModelSpec()
    if table.torchvision is not None:
        import torchvision

        known = torchvision.models.list_models()
        if table.torchvision not in known:
            raise ConfigError(f"model.torchvision: unknown model {table.torchvision!r}; "
                              f"e.g. {', '.join(sorted(known)[:8])}, ...")
        spec.torchvision = table.torchvision
    if table.factory is not None:
        spec.factory = table.factory
        resolve_callable(spec.factory, "model.factory")
    spec.kwargs = dict(table.kwargs)
    if table.checkpoint is not None:
        spec.checkpoint = local(table.checkpoint)
        if not os.path.isfile(spec.checkpoint):
            raise ConfigError(f"model.checkpoint: file not found: {spec.checkpoint}")
    spec.trusted_checkpoint = table.trusted_checkpoint
    spec.input_shapes = table.input_shape
    spec.input_dtype = table.input_dtype
    if table.device is not None:
        try:
            resolve_device(table.device)
        except ConfigError as exc:
            raise ConfigError(f"model.device: {exc}") from None
        spec.device = table.device
    spec.check_inputs()
    return spec


@dataclass
class PipelineOutcome:
    config: PipelineConfig
    input_graph: Graph
    graph: Graph
    records: list[PassRecord]
    exports: list[ExportReport]
    metrics: dict[str, dict[str, float]]
    seconds: dict[str, float]
    latency: dict[str, float] = field(default_factory=dict)  # median ms on the example inputs

    def to_dict(self) -> dict[str, Any]:
        out = {
            "pipeline": self.config.path,
            "captured_by": self.graph.captured_by,
            "passes": [r.to_dict() for r in self.records],
            "exports": [e.to_dict() for e in self.exports],
            "metrics": self.metrics,
            "latency_ms": self.latency,
            "seconds": self.seconds,
        }
        if distributed.world_size() > 1:
            out["distributed"] = {"world_size": distributed.world_size()}
        return out


def run_pipeline(config: PipelineConfig, progress: bool = True) -> PipelineOutcome:
    """Build the model, trace, run the passes, export, evaluate before/after.

    Under torchrun every rank traces and runs the passes (each reading its share of the data);
    rank 0 alone exports, evaluates and times: the other ranks return no exports or metrics."""
    seconds = {}
    start = time.perf_counter()
    model = config.model.build()
    graph = trace(model, config.model.example_inputs())
    seconds["trace"] = time.perf_counter() - start

    context = PassContext(dict(config.data))
    start = time.perf_counter()
    result = PassManager(config.passes, context=context, progress=progress).run(graph)
    seconds["passes"] = time.perf_counter() - start

    if not distributed.is_main():   # every rank holds the same graph (checked after each pass); rank 0 writes
        return PipelineOutcome(config, graph, result.graph, result.records, [], {}, seconds)
    exports = []
    start = time.perf_counter()
    for name, out, options in config.backends:
        exports.append(get_backend(name)(result.graph, out, **options))
    seconds["export"] = time.perf_counter() - start

    metrics: dict[str, dict[str, float]] = {}
    if config.evaluate:
        start = time.perf_counter()
        metric = METRICS[config.evaluate["metric"]]
        data_fn = resolve_callable(config.evaluate["data"], "evaluate.data")
        limit = config.evaluate.get("limit")
        metrics["before"] = {config.evaluate["metric"]: metric(graph, data_fn(), limit, progress)}
        metrics["after"] = {config.evaluate["metric"]: metric(result.graph, data_fn(), limit, progress)}
        seconds["evaluate"] = time.perf_counter() - start
    latency = measure_latency(graph, result.graph, exports, **config.latency) if config.latency is not None else {}
    return PipelineOutcome(config, graph, result.graph, result.records, exports, metrics, seconds, latency)


def measure_latency(before: Graph, after: Graph, exports: list[ExportReport], threads: int,
                    rounds: int) -> dict[str, float]:
    """Median ms per call on the example inputs: the graph before and after the passes in
    torch eager, and every exported artifact in its runtime, interleaved."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = before.example_inputs
        runners = {"eager before": lambda: before.run(*inputs), "eager after": lambda: after.run(*inputs)}
        for e in exports:
            if e.runner is not None:
                runners[e.backend] = functools.partial(e.runner, *inputs)
        return {k: v * 1e3 for k, v in interleaved_latency(runners, rounds).items()}
    finally:
        torch.set_num_threads(previous)
