"""``graphopt compress SPEC.toml``: the model as in a pipeline file, the data, the metric, the goal
and where the outputs go, every field checked before the first trial.

    [model]                       # as in a pipeline file
    factory = "graphopt.tools.digits:DigitsCNN"
    checkpoint = "digits_cnn.pt"
    input_shape = [1, 1, 8, 8]

    [data]                        # calibration and fine-tuning batches
    batches = "graphopt.tools.digits:train_batches"

    [evaluate]
    metric = "top1"               # top1 | cosine, on `data`; or function = "pkg.mod:fn" (run -> float)
    data = "graphopt.tools.digits:test_batches"

    [goal]                        # graphopt.search.Goal's fields
    max_drop = 1.0
    objective = "latency"

    [output]
    dir = "out/compress"
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from graphopt.errors import ConfigError
from graphopt.app.pipeline import ModelSpec, check_keys, data_factory, read_config, resolve_callable

from graphopt.search.goal import Goal, make_goal, validated

SECTIONS = {"model", "data", "evaluate", "goal", "output"}
# what a run writes inside its output folder (besides trials/ and baselines/)
OUTPUT_FILES = ("report.md", "compress.json", "tradeoff.png", "sensitivity.png", "study.journal")


class EvaluateSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: str | None = None
    function: str | None = None
    data: str | None = None


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dir: str = "graphopt-compress"
    finetune_batches: int | None = Field(default=200, ge=1)


@dataclass
class CompressSpec:
    path: str
    model: ModelSpec
    data: Callable | None
    evaluate: Callable | str
    eval_data: Callable | None
    goal: Goal
    out_dir: str
    finetune_batches: int | None

    def run(self, progress: bool = True, resume: bool = True, **goal_overrides: Any):
        from graphopt.search.compress import compress

        goal = make_goal({**self.goal.model_dump(exclude_unset=True), **goal_overrides}, "goal")
        return compress(self.model.build(), self.model.example_inputs(), evaluate=self.evaluate, data=self.data,
                        eval_data=self.eval_data, goal=goal, out_dir=self.out_dir, resume=resume,
                        finetune_batches=self.finetune_batches, progress=progress)


def load_spec(path: str | os.PathLike, out_dir: str | None = None) -> CompressSpec:
    """Parse and check a compress spec; relative paths are relative to the file."""
    path = os.fspath(path)
    raw, local, model = read_config(path, "compress spec", SECTIONS)
    data = None
    if "data" in raw:
        table = check_keys("[data]", raw["data"], {"batches"})
        if "batches" not in table:
            raise ConfigError("[data]: give batches = \"pkg.mod:fn\" (a function returning calibration and "
                              "fine-tuning batches)")
        data = data_factory("batches", table["batches"])
    evaluate = validated(EvaluateSpec, raw.get("evaluate", {}), "[evaluate]")
    if evaluate.function and evaluate.metric:
        raise ConfigError("[evaluate]: give metric or function, not both")
    metric: Callable | str = (resolve_callable(evaluate.function, "evaluate.function") if evaluate.function
                              else evaluate.metric or "top1")
    eval_data = resolve_callable(evaluate.data, "evaluate.data") if evaluate.data else None
    if isinstance(metric, str) and eval_data is None:
        raise ConfigError(f"[evaluate]: metric {metric!r} needs data = \"pkg.mod:fn\" (the evaluation batches)")
    goal = make_goal(raw.get("goal", {}), "[goal]")
    output = validated(OutputSpec, raw.get("output", {}), "[output]")
    folder = os.path.abspath(out_dir or local(output.dir))
    _check_out_dir(folder, [path] + ([model.checkpoint] if model.checkpoint else []))
    return CompressSpec(path, model, data, metric, eval_data, goal, folder, output.finetune_batches)


def _check_out_dir(folder: str, inputs: list[str]) -> None:
    """The output folder may not be an input, nor hold an input under a name the run writes."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"output dir {folder} is a file; give a directory")
    written = {os.path.realpath(os.path.join(folder, name)) for name in OUTPUT_FILES}
    written |= {os.path.realpath(os.path.join(folder, "model" + ext))
                for ext in (".onnx", ".int8.onnx", ".pt", ".int8.pt", ".gpk")}
    for item in inputs:
        real = os.path.realpath(item)
        if real == os.path.realpath(folder) or real in written:
            raise ConfigError(f"output dir {folder}: the run would overwrite {item}; choose another directory")
