"""Pipelines from TOML files: model source, example input, passes, backends, evaluation.

Everything in the file is checked before any work starts (unknown keys, wrong types,
missing files, unwritable outputs, unknown passes or backends), so a typo costs
seconds, not a half-finished run.

    [model]                  # one of: torchvision = "resnet18" | factory = "pkg.mod:fn"
    factory = "graphopt.tools.digits:DigitsCNN"
    checkpoint = "digits_cnn.pt"   # a state_dict (paths are relative to this file)
    input_shape = [1, 1, 8, 8]

    [[passes]]
    name = "fold_batchnorm"        # further keys are the pass's options

    [[backends]]
    name = "onnx"
    path = "out/digits.onnx"       # further keys are the backend's options

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
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from graphopt import distributed
from graphopt.backend import ExportReport, check_backend_options, get_backend
from graphopt.errors import ConfigError
from graphopt.app.evaluate import top1_accuracy
from graphopt.files import check_output_path
from graphopt.ir import Graph
from graphopt.app.latency import interleaved_latency
from graphopt.memory import check_fits, tensor_bytes
from graphopt.pass_base import Pass, PassContext, get_pass
from graphopt.pass_manager import PassManager, PassRecord
from graphopt.trace import trace

SECTIONS = {"model", "passes", "backends", "evaluate", "report", "data"}
MODEL_KEYS = {"torchvision", "factory", "kwargs", "checkpoint", "trusted_checkpoint", "input_shape", "input_dtype"}
EVALUATE_KEYS = {"data", "metric", "limit"}
REPORT_KEYS = {"json", "latency", "threads", "rounds"}
METRICS = {"top1": top1_accuracy}


def check_keys(where: str, table: Any, valid: set[str]) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table, got {type(table).__name__}")
    unknown = sorted(set(table) - valid)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(valid))}")
    return table


def _typed(where: str, value: Any, kind: type | tuple, what: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))):
        raise ConfigError(f"{where} must be {what}, got {type(value).__name__} {value!r}")
    return value


def resolve_callable(spec: str, where: str) -> Callable:
    """'package.module:attribute' -> the attribute, with errors that name ``where``."""
    _typed(where, spec, str, "a 'package.module:attribute' string")
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
        check_keys(f"[{where}]", spec, {"factory", "kwargs"})
        fn = resolve_callable(spec.get("factory"), f"{where}.factory")
        kwargs = _typed(f"{where}.kwargs", spec.get("kwargs", {}), dict, "a table")
        return functools.partial(fn, **kwargs)
    return resolve_callable(spec, where)


def read_config(path: str, what: str, sections: set[str]) -> tuple[dict, Callable[[str], str], ModelSpec]:
    """A TOML file with a [model] table (pipeline or compress spec): its tables, a function making
    paths relative to the file, and the checked model."""
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

    check_keys(path, raw, sections)
    if "model" not in raw:
        raise ConfigError(f"{path}: missing [model] table")
    return raw, local, parse_model(check_keys("[model]", raw["model"], MODEL_KEYS), local)


def load_pipeline(path: str | os.PathLike) -> PipelineConfig:
    """Parse and fully check a pipeline file."""
    path = os.fspath(path)
    raw, local, model = read_config(path, "pipeline file", SECTIONS)

    passes = []
    for i, entry in enumerate(_typed("passes", raw.get("passes", []), list, "an array of tables ([[passes]])")):
        where = f"passes[{i}]"
        entry = dict(_typed(where, entry, dict, "a table"))
        name = _typed(f"{where}.name", entry.pop("name", None), str, "a pass name")
        passes.append(get_pass(name).from_config(entry))

    backends = []
    for i, entry in enumerate(_typed("backends", raw.get("backends", []), list, "an array of tables ([[backends]])")):
        where = f"backends[{i}]"
        entry = dict(_typed(where, entry, dict, "a table"))
        name = _typed(f"{where}.name", entry.pop("name", None), str, "a backend name")
        get_backend(name)
        out = local(_typed(f"{where}.path", entry.pop("path", None), str, "an output path"))
        out = check_output_path(out, f"{where}.path")
        check_backend_options(name, entry)
        backends.append((name, out, entry))

    evaluate = None
    if "evaluate" in raw:
        evaluate = dict(check_keys("[evaluate]", raw["evaluate"], EVALUATE_KEYS))
        resolve_callable(evaluate.get("data"), "evaluate.data")
        metric = evaluate.setdefault("metric", "top1")
        if not isinstance(metric, str) or metric not in METRICS:
            raise ConfigError(f"evaluate.metric: unknown metric {metric!r}; valid: {', '.join(METRICS)}")
        limit = evaluate.get("limit", 1)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
            raise ConfigError(f"evaluate.limit must be a positive integer, got {limit!r}")

    report_json, latency = None, None
    if "report" in raw:
        report = check_keys("[report]", raw["report"], REPORT_KEYS)
        if "json" in report:
            report_json = check_output_path(local(_typed("report.json", report["json"], str, "a path")),
                                            "report.json")
        if _typed("report.latency", report.get("latency", False), bool, "true or false"):
            latency = {}
            for key, default in (("threads", 2), ("rounds", 20)):
                value = report.get(key, default)
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ConfigError(f"report.{key} must be a positive integer, got {value!r}")
                latency[key] = value

    data = {}
    table = raw.get("data", {})
    for key, spec in check_keys("[data]", table, set(table) if isinstance(table, dict) else set()).items():
        data[key] = data_factory(key, spec)
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


def parse_model(table: dict, local: Callable[[str], str]) -> ModelSpec:
    sources = [k for k in ("torchvision", "factory") if k in table]
    if len(sources) > 1:
        raise ConfigError("[model]: give one of torchvision or factory, not both")
    if not sources and "checkpoint" not in table:
        raise ConfigError("[model]: name a model source: torchvision = \"name\", factory = \"pkg.mod:fn\" "
                          "or checkpoint = \"path\"")
    spec = ModelSpec()
    if "torchvision" in table:
        import torchvision

        name = _typed("model.torchvision", table["torchvision"], str, "a model name")
        known = torchvision.models.list_models()
        if name not in known:
            raise ConfigError(f"model.torchvision: unknown model {name!r}; e.g. {', '.join(sorted(known)[:8])}, ...")
        spec.torchvision = name
    if "factory" in table:
        spec.factory = table["factory"]
        resolve_callable(spec.factory, "model.factory")
    spec.kwargs = dict(_typed("model.kwargs", table.get("kwargs", {}), dict, "a table"))
    if "checkpoint" in table:
        spec.checkpoint = local(_typed("model.checkpoint", table["checkpoint"], str, "a file path"))
        if not os.path.isfile(spec.checkpoint):
            raise ConfigError(f"model.checkpoint: file not found: {spec.checkpoint}")
    spec.trusted_checkpoint = _typed("model.trusted_checkpoint", table.get("trusted_checkpoint", False), bool,
                                     "true or false")
    shape = table.get("input_shape")
    if shape is None:
        raise ConfigError("[model]: input_shape is required, e.g. input_shape = [1, 3, 224, 224]")
    shapes = shape if isinstance(shape, list) and shape and isinstance(shape[0], list) else [shape]
    for s in shapes:
        if not isinstance(s, list) or not s or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                       for d in s):
            raise ConfigError(f"model.input_shape must be a list of positive integers, got {shape!r}")
    spec.input_shapes = shapes
    spec.input_dtype = table.get("input_dtype", "float32")
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
