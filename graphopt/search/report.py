"""The search's report: one Markdown file beside its plots, saying what was chosen, what was done
to which layer, what each step cost and gained, the front, the baselines, and why candidates
were refused. Everything in it is read from the trials' records, not recomputed."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from graphopt.files import atomic_path
from graphopt.report import human

from graphopt.search.plots import write_plots

if TYPE_CHECKING:
    from graphopt.search.compress import CompressResult
    from graphopt.search.trial import Trial


def _md(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value else "-"


def _num(value, fmt: str = ".4g") -> str:
    return "-" if value is None or value != value else format(value, fmt)


def _row(result: "CompressResult", name: str, item, what: str) -> list:
    f = result.factors(item)
    ms = result.latency_of(name if not hasattr(item, "number") else f"trial {item.number}", item.latency_ms)
    return [name, what, _num(item.metric), _num(f["change"], "+.3g"), _num(ms, ".4g"), _x(f["speedup"]),
            human(item.size_bytes, "B") if item.size_bytes else "-", _x(f["smaller"])]


def _step_stats(stats: dict) -> str:
    keep = []
    for key, value in stats.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in list(value.items())[:6]) + (" ..." if len(value) > 6 else "")
            value = "{" + value + "}"
        elif isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value[:6])) + (" ..." if len(value) > 6 else "")
            value = "[" + value + "]"
        keep.append(f"{key}={value}")
    return "; ".join(keep)[:400]


def _steps(trial: "Trial") -> str:
    rows = []
    for step in trial.steps:
        rows.append([step["name"], human(step["params"]), human(step["macs"]), human(step["bytes"], "B"),
                     _num(step["error_vs_input"], ".3g"), f"{step['seconds']:.1f}", _step_stats(step["stats"])])
    return _md(["step", "params after", "MACs after", "bytes after", "output change vs original", "s", "what it did"],
               rows)


def write_report(result: "CompressResult") -> str:
    result.plots = write_plots(result)
    goal = result.goal
    lines = ["# graphopt compress", "", f"Goal: {goal.describe()}.", "",
             f"Original: metric {result.original.metric:.4g}, fp32 state_dict {human(result.fp32_file_bytes, 'B')}, "
             f"{_num(result.latency_of('original', result.original.latency_ms))} ms ({result.original.note}). "
             f"Allowed drop: {result.allowed_drop:.3g}. Stopped by {result.stopped_by} after "
             f"{len(result.trials)} trials in {result.seconds / 60:.1f} min.", ""]
    headers = ["", "recipe", "metric", "change", "ms", "x faster", "size", "x smaller than fp32 file"]
    rows = [_row(result, "original", result.original, result.original.note)]
    if result.chosen is not None:
        rows.append(_row(result, "**chosen**", result.chosen, f"trial {result.chosen.number}: "
                         f"{result.chosen.recipe.label()} ({result.chosen.backend})"))
    if result.accuracy_control is not None:
        rows.append(_row(result, "accuracy control", result.accuracy_control,
                         f"NNCF-style: {result.accuracy_control.recipe.label()}"))
    for point in result.baselines:
        rows.append(_row(result, point.name, point, point.note or "peer tool"))
    lines += ["## Result", "", _md(headers, rows), ""]
    if result.chosen is None:
        best = min((t for t in result.trials if t.drop is not None), key=lambda t: t.drop, default=None)
        lines += ["**No candidate met the constraint.** " + (
            f"The least loss was {best.drop:.3g} (trial {best.number}: {best.recipe.label()}), "
            f"{best.drop - result.allowed_drop:.3g} more than the allowed {result.allowed_drop:.3g}."
            if best else "No candidate could be measured."), ""]
    else:
        lines += [f"## What was done (trial {result.chosen.number})", "", _steps(result.chosen), ""]
        if result.artifact:
            lines += [f"Artifact: `{os.path.relpath(result.artifact, result.out_dir)}` "
                      f"({result.chosen.backend}; checked against the graph: max relative error "
                      f"{_num(result.chosen.export.get('max_rel_error'), '.3g')}).", ""]
    for name, path in result.plots.items():
        lines += [f"![{name}]({os.path.relpath(path, result.out_dir)})", ""]
    lines += ["## Pareto front", "", _md(["trial", "recipe", "metric", "drop", "ms", "size", "MACs"],
              [[t.number, t.recipe.label(), _num(t.metric), _num(t.drop, ".3g"), _num(t.latency_ms),
                human(t.size_bytes, "B") if t.size_bytes else "-", human(t.macs)] for t in result.front]), ""]
    s = result.sensitivity
    lines += ["## Sensitivity (first stage)", "",
              f"{len(s.prune_layers)} prunable layers, {len(s.quant_layers)} quantizable layers, {s.seconds:.1f} s. "
              "Most sensitive to pruning: " + ", ".join(f"{k} ({v:.3g})" for k, v in sorted(
                  s.prune_layers.items(), key=lambda kv: -kv[1])[:5]) + ". Most sensitive to int8: "
              + ", ".join(f"{k} ({v:.3g})" for k, v in sorted(s.quant_layers.items(), key=lambda kv: -kv[1])[:5])
              + ".", ""]
    if s.sweep:
        lines += [f"Structured pruning removes at most {s.reach:.1%} of the MACs (every group cut by max_ratio).", "",
                  _md(["MACs removed", "metric (no fine-tuning)"], [[f"{r:.0%}", _num(m)] for r, m in s.sweep.items()]),
                  ""]
    if s.epoch_seconds:
        lines += [f"One epoch of distillation takes {s.epoch_seconds:.1f} s here (unpruned student): the longest "
                  f"recovery a candidate may ask for is {s.longest_recovery:g} epochs.", ""]
    elif result.goal.max_finetune_epochs is not None:
        lines += [f"The longest recovery a candidate may ask for is {s.longest_recovery:g} epochs "
                  "(the goal's max_finetune_epochs).", ""]
    lines += [f"- {note}" for note in s.notes] + ([""] if s.notes else [])
    lines += ["## All trials", "", _md(["trial", "recipe", "status", "metric", "drop", "ms", "size", "s", "note"],
              [[t.number, t.recipe.label(), t.status, _num(t.metric), _num(t.drop, ".3g"), _num(t.latency_ms),
                human(t.size_bytes, "B") if t.size_bytes else "-", f"{t.seconds:.1f}",
                t.reason.replace("|", "/")[:160]] for t in result.trials]), ""]
    path = os.path.join(result.out_dir, "report.md")
    with atomic_path(path, ".md") as tmp:
        with open(tmp, "w") as f:
            f.write("\n".join(lines))
    result.report = path
    return path
