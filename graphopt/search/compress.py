"""``graphopt.compress``: the whole job in one call. Trace, fold, measure the original, run the
cheap sensitivity stage, then search pass pipelines (structured pruning, low-rank, distillation,
weight coding, int8) with Optuna for the cheapest candidate within the allowed drop, every
candidate verified by the PassManager and its backend; report the front, the choice and the
baselines. Stopped early (budget, Ctrl-C), it still answers with the best found so far.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from graphopt import distributed
from graphopt.backend import get_backend
from graphopt.data import split_batch
from graphopt.devices import module_device, to_device
from graphopt.errors import ConfigError, GraphoptError
from graphopt.app.evaluate import top1_accuracy
from graphopt.files import atomic_path
from graphopt.ir import Graph
from graphopt.app.latency import interleaved_latency
from graphopt.pass_base import get_pass
from graphopt.pass_manager import PassManager
from graphopt.report import write_json
from graphopt.trace import trace

from graphopt.search import baselines as peer
from graphopt.search import sensitivity as sens
from graphopt.search.frontier import choose, pareto_front
from graphopt.search.goal import Goal, make_goal
from graphopt.search.recipe import LONG_RECOVERY, Recipe, Space, longest_recovery
from graphopt.search.trial import (EXTENSIONS, Evaluator, Trial, Workbench, batch_inputs, calls_per_sample,
                                   eager_runner, time_ms, torch_runner)

METRICS = ("top1", "cosine")
PUSH = 0.1   # a step harder: this much more of the MACs pruned


@dataclass
class Point:
    """A measured artifact outside the search: the original, or a peer tool's result."""
    name: str
    metric: float
    latency_ms: float | None
    size_bytes: int | None
    artifact: str | None = None
    note: str = ""
    runner: Callable | None = field(default=None, repr=False)
    comparable: bool = True   # timed in the same runtime as the candidates (else no speed-up is shown)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "metric", "latency_ms", "size_bytes", "artifact", "note")}


@dataclass
class CompressResult:
    goal: Goal
    original: Point
    fp32_file_bytes: int               # the original's state_dict on disk: what "x smaller" divides
    allowed_drop: float
    chosen: Trial | None
    front: list[Trial]
    trials: list[Trial]
    baselines: list[Point]
    accuracy_control: Trial | None     # NNCF-style: int8, the most sensitive layers reverted until within the drop
    sensitivity: sens.Sensitivity
    stopped_by: str
    seconds: float
    out_dir: str
    artifact: str | None = None        # the chosen artifact, copied next to the report
    report: str | None = None
    plots: dict[str, str] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)   # final interleaved re-measure, ms

    def latency_of(self, name: str, fallback: float | None) -> float | None:
        return self.latency.get(name, fallback)

    def factors(self, trial: Trial | Point | None) -> dict[str, float | None]:
        """x faster than the original in the goal's runtime, x smaller than the fp32 file, metric change."""
        if trial is None:
            return {"speedup": None, "smaller": None, "change": None}
        name = trial.name if isinstance(trial, Point) else f"trial {trial.number}"
        ms = self.latency_of(name, trial.latency_ms)
        # like with like: the original's final timing when this one was timed with it, else its first
        base = self.latency_of("original", self.original.latency_ms) if name in self.latency \
            else self.original.latency_ms
        comparable = not isinstance(trial, Point) or trial.comparable
        return {"speedup": base / ms if ms and base and comparable else None,
                "smaller": self.fp32_file_bytes / trial.size_bytes if trial.size_bytes else None,
                "change": trial.metric - self.original.metric if trial.metric is not None else None}

    def summary(self) -> str:
        lines = [f"goal: {self.goal.describe()}",
                 f"original: metric {self.original.metric:.4g}; allowed drop {self.allowed_drop:.3g}"]
        if self.chosen is None:
            best = min((t for t in self.trials if t.drop is not None), key=lambda t: t.drop, default=None)
            lines.append("no candidate met the constraint" + (
                f": the least loss was {best.drop:.3g} (trial {best.number}, {best.recipe.label()}), "
                f"{best.drop - self.allowed_drop:.3g} over the allowed {self.allowed_drop:.3g}" if best else ""))
        else:
            f = self.factors(self.chosen)
            lines.append(f"chosen: trial {self.chosen.number}: {self.chosen.recipe.label()} ({self.chosen.backend})"
                         + ("; no compressed candidate within the drop was faster than the model as given"
                            if self.chosen.recipe == Recipe() else ""))
            lines.append(f"  metric {self.chosen.metric:.4g} ({f['change']:+.3g}); "
                         + (f"{f['speedup']:.2f}x faster in {self.goal.timed_in()}; "
                            if f["speedup"] else "")
                         + (f"{f['smaller']:.1f}x smaller than the fp32 file" if f["smaller"] else ""))
        lines.append(f"{len(self.trials)} trials ({sum(t.status == 'complete' for t in self.trials)} complete), "
                     f"stopped by {self.stopped_by}, {self.seconds / 60:.1f} min")
        if self.artifact:
            lines.append(f"artifact: {self.artifact}")
        if self.report:
            lines.append(f"report: {self.report}" + (f"; plots: {', '.join(self.plots.values())}" if self.plots else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"goal": self.goal.model_dump(), "original": self.original.to_dict(),
                "fp32_file_bytes": self.fp32_file_bytes, "allowed_drop": self.allowed_drop,
                "chosen": self.chosen.to_dict() if self.chosen else None,
                "chosen_factors": self.factors(self.chosen),
                "front": [t.number for t in self.front], "trials": [t.to_dict() for t in self.trials],
                "baselines": [dict(b.to_dict(), **self.factors(b)) for b in self.baselines],
                "accuracy_control": self.accuracy_control.number if self.accuracy_control else None,
                "accuracy_control_factors": self.factors(self.accuracy_control),
                "sensitivity": self.sensitivity.to_dict(), "stopped_by": self.stopped_by,
                "seconds": round(self.seconds, 1), "artifact": self.artifact, "report": self.report,
                "plots": self.plots, "latency_ms": self.latency}


def builtin_metric(name: str, eval_data: Callable | None, reference: nn.Module | None = None) -> Callable:
    """``top1``: accuracy in percent on (inputs, labels) batches; ``cosine``: mean cosine similarity
    (percent) of the outputs to the original model's on the same batches."""
    if name not in METRICS:
        raise ConfigError(f"evaluate: unknown metric {name!r}; give a function run -> float, or one of "
                          f"{', '.join(METRICS)}")
    if eval_data is None or not callable(eval_data):
        raise ConfigError(f"evaluate={name!r} needs eval_data: a function returning the evaluation batches")
    if name == "top1":
        return lambda run: 100.0 * top1_accuracy(run, eval_data())
    expected = []
    with torch.no_grad():
        for batch in eval_data():
            inputs, _ = split_batch(batch)
            out = reference(*to_device(inputs, module_device(reference)))
            out = out[0] if isinstance(out, (tuple, list)) else out
            expected.append((inputs, torch.as_tensor(out).cpu()))
    if not expected:
        raise ConfigError("evaluate='cosine': eval_data yielded no batches")

    def cosine(run):
        total = count = 0.0
        for inputs, want in expected:
            got = run(*inputs)
            got = got[0] if isinstance(got, (tuple, list)) else got
            sims = torch.nn.functional.cosine_similarity(torch.as_tensor(got).cpu().flatten(1).double(),
                                                         want.flatten(1).double(), dim=1)
            total, count = total + sims.sum().item(), count + sims.numel()
        return 100.0 * total / count
    return cosine


def _data_context(data: Callable | None) -> dict[str, Any]:
    if data is None:
        return {}
    if not callable(data):
        raise ConfigError("data must be a function returning an iterable of batches (called once per pass over "
                          "the data), e.g. lambda: loader")
    first = next(iter(data()), None)
    if first is None:
        raise ConfigError("data yielded no batches")
    split_batch(first)   # a shape it cannot read is named here, not in trial 3
    return {"calibration_data": data, "train_data": data}


def _real_example(example: tuple, data: Callable) -> tuple:
    """The first samples of ``data`` in the example inputs' shapes (as many as the example's batch),
    or the example itself where the data's inputs do not fit it."""
    inputs, _ = split_batch(next(iter(data())))
    if len(inputs) != len(example):
        return example
    out = []
    for x, want in zip(inputs, example):
        if not (isinstance(x, torch.Tensor) and isinstance(want, torch.Tensor)) or x.dim() != want.dim() \
                or x.dtype != want.dtype or x.shape[1:] != want.shape[1:] or x.shape[0] < want.shape[0]:
            return example
        out.append(x[:want.shape[0]].clone())
    return tuple(out)


def _out_dir(path: str) -> str:
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"out_dir {path} is a file; give a directory for the search's outputs")
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK):
        raise ConfigError(f"out_dir {path} is not writable")
    return path


def _state_dict_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


class _Search:
    """The run's state: the study, the cache of built candidates, the clock."""

    def __init__(self, bench: Workbench, space: Space, goal: Goal, out_dir: str, study_name: str, resume: bool,
                 progress: bool):
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        self.bench, self.space, self.goal = bench, space, goal
        storage = JournalStorage(JournalFileBackend(os.path.join(out_dir, "study.journal")))
        names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
        if study_name in names and not resume:
            optuna.delete_study(study_name=study_name, storage=storage)
        sampler = optuna.samplers.TPESampler(seed=goal.seed, multivariate=True, n_startup_trials=6)
        self.study = optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True,
                                         directions=["maximize", "minimize"], sampler=sampler)
        self.trials: list[Trial] = []
        self.cache: dict[str, Trial] = {}
        for frozen in self.study.trials:   # a resumed study: its candidates are not built again
            if "trial" in frozen.user_attrs:
                done = Trial.from_dict(json.loads(frozen.user_attrs["trial"]))
                self.trials.append(done)
                self.cache[done.recipe.key()] = done
        self.progress = progress
        self.bar = None

    def best(self) -> Trial | None:
        return choose([t for t in self.trials if t.status == "complete"], lambda t: t.metric,
                      lambda t: t.objective(self.goal), lambda t: t.feasible)

    def sample(self, trial) -> Recipe:
        """Define-by-run: knobs that only matter with another (protect with prune) are asked only then."""
        s = self.space
        prune = trial.suggest_float("prune", 0.0, s.max_prune, step=sens.GRID) if s.max_prune > 0 else 0.0
        scope = trial.suggest_categorical("scope", list(s.scopes)) if prune else "global"
        protect = trial.suggest_int("protect", 0, s.max_protect) if prune and s.max_protect else 0
        round_to = (trial.suggest_categorical("round_to", list(s.round_to)) if len(s.round_to) > 1
                    else s.round_to[0]) if prune else 1
        low_rank = trial.suggest_categorical("low_rank", list(s.low_rank)) if len(s.low_rank) > 1 else 0.0
        finetune = (trial.suggest_categorical("finetune", list(s.finetune))
                    if (prune or low_rank) and len(s.finetune) > 1 else 0.0)
        sparsity = trial.suggest_categorical("sparsity", list(s.sparsity)) if len(s.sparsity) > 1 else 0.0
        share = trial.suggest_categorical("share_bits", list(s.share_bits)) if len(s.share_bits) > 1 else 0
        if (sparsity or share) and len(s.finetune) > 1 and not finetune:
            finetune = trial.suggest_categorical("finetune", list(s.finetune))
        quant = "fp32" if share else (trial.suggest_categorical("quant", list(s.quant)) if len(s.quant) > 1
                                      else s.quant[0])   # shared weights are already coded
        floats = (trial.suggest_int("sensitive_float", 0, s.max_sensitive_float)
                  if quant == "int8" and s.max_sensitive_float else 0)
        qat = trial.suggest_categorical("qat", list(s.qat)) if quant == "int8" and len(s.qat) > 1 else 0.0
        if prune:   # no deeper than these widths and protected layers let the pass go (the cache has it then)
            prune = min(prune, self.bench.reach(round_to, protect))
            if not prune:
                scope, protect, round_to = "global", 0, 1
        return Recipe(prune=round(prune, 4), scope=scope, protect=protect, round_to=round_to, low_rank=low_rank,
                      finetune=finetune, sparsity=sparsity, share_bits=share, quant=quant, sensitive_float=floats,
                      qat=qat)

    def step(self, params: dict | None = None) -> Trial:
        """Build one candidate (``params`` fixes its knobs) and tell the study what it measured."""
        return self.round([params])[0]

    def round(self, fixed: list[dict | None]) -> list[Trial]:
        """Ask the study for one candidate per entry of ``fixed`` (its parameters, or None: the
        sampler's choice), build those not built before (under torchrun, one per rank at once),
        tell the study what each measured; the trials in the order asked."""
        handles, recipes = [], []
        for params in fixed:
            if params is not None:
                self.study.enqueue_trial(params, skip_if_exists=False)
            handle = self.study.ask()
            handles.append(handle)
            recipes.append(self.sample(handle))
        jobs: dict[str, tuple[Recipe, int]] = {}
        for recipe in recipes:
            if recipe.key() not in self.cache and recipe.key() not in jobs:
                jobs[recipe.key()] = (recipe, len(self.trials) + len(jobs))
        for key, done in zip(jobs, build_shared(self.bench, list(jobs.values()))):
            self.trials.append(done)
            self.cache[key] = done
        out, told = [], set()
        for handle, recipe in zip(handles, recipes):
            done, fresh = self.cache[recipe.key()], recipe.key() in jobs and recipe.key() not in told
            told.add(recipe.key())
            handle.set_constraint("drop", (done.drop - self.bench.allowed_drop) if done.drop is not None else 1e9)
            if fresh:
                handle.set_user_attr("trial", json.dumps(done.to_dict(), default=str))
            if done.status == "complete":
                self.study.tell(handle, [done.metric, done.objective(self.goal)])
            else:
                state = self.optuna.trial.TrialState.PRUNED if done.status == "pruned" else \
                    self.optuna.trial.TrialState.FAIL
                self.study.tell(handle, state=state)
            self._show(done, not fresh)
            out.append(done)
        return out

    def _show(self, done: Trial, cached: bool) -> None:
        if self.bar is None:
            return
        if not cached:
            self.bar.update(1)
        best = self.best()
        unit = {"latency": "ms", "size": "B", "macs": "MACs"}[self.goal.objective]
        self.bar.set_postfix_str(
            f"best {best.objective(self.goal):.4g} {unit} @ {best.metric:.4g} (trial {best.number})" if best
            else "no feasible candidate yet")


def build_shared(bench: Workbench, jobs: list[tuple[Recipe, int]]) -> list[Trial]:
    """Build (recipe, number) candidates; under torchrun rank 0 sends the jobs and each rank builds
    a share, as one process (``distributed.map_shared``), the trials gathered on every rank. The
    other ranks wait for jobs in ``_serve``."""
    if not distributed.active():
        return [bench.build(recipe, number) for recipe, number in jobs]
    distributed.broadcast_object(jobs)
    return _build_jobs(bench, jobs)


def _build_jobs(bench: Workbench, jobs: list[tuple[Recipe, int]]) -> list[Trial]:
    return distributed.map_shared(lambda job: bench.build(*job), jobs)


def _serve(bench: Workbench) -> None:
    """A rank other than 0 during the search: build its share of each round until told to stop."""
    while True:
        jobs = distributed.broadcast_object(None)
        if jobs is None:
            return
        _build_jobs(bench, jobs)


def compress(model: nn.Module | Graph, example_inputs: Any, *, evaluate: Callable | str = "top1",
             data: Callable | None = None, eval_data: Callable | None = None, goal: Goal | dict | None = None,
             out_dir: str = "graphopt-compress", resume: bool = True, finetune_batches: int | None = 200,
             progress: bool = True) -> CompressResult:
    """Search for the cheapest compression of ``model`` whose metric stays within the goal.

    ``evaluate``: ``run -> float`` (higher is better; ``run(*inputs)`` calls the candidate's
    artifact and returns tensors), or ``"top1"`` / ``"cosine"`` on ``eval_data``. ``data``: a
    function returning calibration and fine-tuning batches (with labels or without: distillation
    learns from the original's outputs). ``goal``: a Goal or its fields as a dict. The study is
    kept in ``out_dir`` (``resume=True`` continues it; no candidate is built twice).
    """
    goal = make_goal(goal)
    started = time.perf_counter()
    # trials stop early enough to leave time for the baselines, the final timing and the report
    deadline = started + goal.max_minutes * 60 * 0.9
    out_dir = _out_dir(out_dir)
    if isinstance(model, Graph):
        graph, module = model, model.gm
    elif isinstance(model, nn.Module):
        module = model.eval()
        graph = trace(module, example_inputs if isinstance(example_inputs, tuple) else (example_inputs,))
    else:
        raise ConfigError(f"compress takes a torch.nn.Module or a graphopt Graph, got {type(model).__name__}")
    metric_fn = evaluate if callable(evaluate) else builtin_metric(evaluate, eval_data, module)
    evaluator = Evaluator(metric_fn)
    context = _data_context(data)
    if finetune_batches is not None and (isinstance(finetune_batches, bool) or not isinstance(finetune_batches, int)
                                         or finetune_batches < 1):
        raise ConfigError(f"finetune_batches must be a positive integer or None, got {finetune_batches!r}")
    threads = torch.get_num_threads()
    torch.set_num_threads(_rank_threads(goal.threads))
    try:
        return _run(graph, module, goal, evaluator, context, out_dir, resume, finetune_batches, progress, started,
                    deadline)
    finally:
        torch.set_num_threads(threads)


def _rank_threads(wanted: int) -> int:
    """Threads for this process: ``wanted``, but under torchrun no more than this machine's cores
    shared among the ranks on it (ranks building trials side by side must not oversubscribe it)."""
    if not distributed.active():
        return wanted
    local = int(os.environ.get("LOCAL_WORLD_SIZE", distributed.world_size()))
    cap = max(1, (os.cpu_count() or 1) // max(1, local))
    if wanted > cap and distributed.is_main():
        tqdm.write(f"compress: {local} ranks share {os.cpu_count()} cores here: each builds with {cap} thread(s) "
                   f"(the goal asks {wanted}; the final timing on rank 0 uses the same)")
    return min(wanted, cap)


def _run(graph, module, goal, evaluator, context, out_dir, resume, finetune_batches, progress, started, deadline):
    from graphopt.search.report import write_report

    say = (lambda text: tqdm.write(text)) if progress and distributed.is_main() else (lambda text: None)
    base = PassManager([get_pass(n)() for n in ("fold_batchnorm", "remove_identity", "eliminate_dead_code")]
                       ).run(graph).graph
    if context:   # contracts and export checks on real inputs: calibrated ranges clip random ones
        base.example_inputs = distributed.broadcast_object(_real_example(base.example_inputs,
                                                                         context["calibration_data"]))
    original = _shared_original(base, module, goal, evaluator, out_dir)
    allowed = goal.allowed_drop(original.metric)
    say(f"original: metric {original.metric:.4g}, {original.latency_ms:.3g} ms in {goal.timed_in()}; "
        f"allowed drop {allowed:.3g}")

    sensitivity = _sensitivity_stage(base, evaluator, context, goal, original.metric, allowed, finetune_batches,
                                     out_dir, resume, say)
    space = _space(goal, context, sensitivity, original.metric, allowed)
    bench = Workbench(base, goal, evaluator, original.metric, allowed, context, out_dir,
                      sensitivity.protected_order(), finetune_batches,
                      reaches={(1, 0): sens.on_grid(sensitivity.reach)})   # the stage measured that one
    fingerprint = _digest(goal, repr(space), len(list(base.nodes)), original.metric)
    bench.folder = os.path.join(out_dir, fingerprint)
    if not distributed.is_main():   # under torchrun: build a share of each round, then take rank 0's answer
        _serve(bench)
        return distributed.broadcast_object(None)
    search = _Search(bench, space, goal, out_dir, f"compress-{fingerprint}", resume, progress)
    try:
        stopped_by, accuracy_control = _trials(search, space, goal, deadline)
    finally:
        if distributed.active():
            distributed.broadcast_object(None)   # the other ranks stop serving

    complete = [t for t in search.trials if t.status == "complete"]
    front = pareto_front(complete, lambda t: t.metric, lambda t: t.objective(goal))
    chosen = search.best()
    if accuracy_control is None:
        accuracy_control = _accuracy_control(search.trials)
    baselines = _peer_baselines(base, goal, evaluator, context, out_dir, original, say)
    result = CompressResult(goal, original, _state_dict_bytes(module), allowed, chosen, front, search.trials,
                            baselines, accuracy_control, sensitivity, stopped_by, 0.0, out_dir)
    _load_runners(search.trials, bench, goal)
    finalists = _finalists(search.trials, goal, bench, chosen)
    result.latency = _remeasure(result, bench, finalists)
    if goal.objective == "latency" and result.latency:   # the choice is the fastest when timed side by side
        timed = [t for t in finalists if f"trial {t.number}" in result.latency]
        if timed:
            result.chosen = min(timed, key=lambda t: result.latency[f"trial {t.number}"])
    chosen = result.chosen
    if chosen is not None and chosen.artifact:
        result.artifact = os.path.join(out_dir, "model" + EXTENSIONS[chosen.backend])
        with atomic_path(result.artifact, EXTENSIONS[chosen.backend]) as tmp:
            shutil.copyfile(chosen.artifact, tmp)
    result.seconds = time.perf_counter() - started
    write_report(result)
    write_json(os.path.join(out_dir, "compress.json"), result.to_dict())
    if distributed.active():
        distributed.broadcast_object(_without_runners(result))
    return result


def _trials(search: _Search, space: Space, goal: Goal, deadline: float) -> tuple[str, Trial | None]:
    """Run the search: the original's export (latency goals), accuracy control, the seeds, the best
    so far pushed a step harder while it has drop to spare, then the sampler, in rounds of one
    candidate per rank (one at a time in one process); (why it stopped, the accuracy-control trial)."""
    ranks = distributed.world_size()
    stopped_by = "max_trials"
    accuracy_control: Trial | None = None

    def room() -> int:
        return min(ranks, goal.max_trials - len(search.trials))

    def out_of_time() -> bool:
        return _out_of_time(search.trials, time.perf_counter(), deadline)
    search.bar = tqdm(total=goal.max_trials, initial=len(search.trials), desc="compress",
                      disable=not search.progress, leave=True)
    try:
        if goal.objective == "latency" and Recipe().key() not in search.cache:
            # the original's own export is a candidate: an answer slower than the model as given is no answer
            # (the Fashion-MNIST CNN's int8 runs at 0.82x of its fp32 file in onnxruntime at batch 1)
            search.round([_params(space, Recipe())])
        if "int8" in space.quant:   # NNCF-style accuracy control: quantize all, revert the most sensitive
            floats, found = list(range(space.max_sensitive_float + 1)), False
            while floats and not found:
                if len(search.trials) >= goal.max_trials or out_of_time():
                    break
                batch, floats = floats[:room()], floats[room():]
                done = search.round([_params(space, Recipe(quant="int8", sensitive_float=k)) for k in batch])
                for k, trial in zip(batch, done):
                    if trial.feasible or trial.status == "failed" and k == 0:
                        accuracy_control, found = (trial if trial.feasible else None), True
                        break
        seeds = list(_seeds(space, int8=_int8_pays(search.trials, goal)))
        while seeds:
            if len(search.trials) >= goal.max_trials or out_of_time():
                break
            batch: list[Recipe] = []
            while seeds and len(batch) < room():
                seed = seeds.pop(0)
                if seed.key() not in search.cache and all(seed.key() != b.key() for b in batch):
                    batch.append(seed)
            if batch:
                search.round([_params(space, seed) for seed in batch])
        while len(search.trials) < goal.max_trials and not out_of_time():
            # the best candidate so far, with half the allowed drop or more to spare, one step harder
            best = search.best()
            lost = [t.recipe for t in search.trials if t.status in ("complete", "pruned") and not t.feasible]
            harder = [r for r in _harder(space, best.recipe, search.bench.reach, lost) if r.key() not in search.cache] \
                if best is not None and best.drop <= search.bench.allowed_drop / 2 else []
            built = len(search.trials)
            if harder:
                search.round([_params(space, r) for r in harder[:room()]])
            if len(search.trials) == built:   # nothing new (the sampler mapped it onto a built candidate)
                break
        asked = 0
        while len(search.trials) < goal.max_trials and asked < 5 * goal.max_trials:
            if out_of_time():
                stopped_by = "max_minutes"
                break
            count = min(room(), 5 * goal.max_trials - asked)
            search.round([None] * count)
            asked += count
        else:
            if asked >= 5 * goal.max_trials:
                stopped_by = "search space exhausted"
    except KeyboardInterrupt:
        stopped_by = "interrupted"
    finally:
        search.bar.close()
    if len(search.trials) < goal.max_trials and stopped_by == "max_trials":
        stopped_by = "max_minutes"
    return stopped_by, accuracy_control


def _out_of_time(trials: list[Trial], now: float, deadline: float) -> bool:
    """Never before one candidate has been measured (an answer, not "nothing"); after that, a
    round starts only while the time left holds the slowest trial so far, so the run ends
    within max_minutes (the Fashion-MNIST CNN's last candidate, 32 epochs of distillation,
    190 s, started 9 s before the trials' deadline: the run took 16.7 of its 15 minutes)."""
    slowest = max((t.seconds for t in trials), default=0.0)
    return now + slowest > deadline and any(t.status == "complete" for t in trials)


def _shared_original(base: Graph, module: nn.Module, goal: Goal, evaluator: Evaluator, out_dir: str) -> Point:
    """The original measured (and its artifact written) on rank 0; the other ranks get its numbers."""
    if not distributed.active():
        return _measure_original(base, module, goal, evaluator, out_dir)
    original = _measure_original(base, module, goal, evaluator, out_dir) if distributed.is_main() else None
    shared = distributed.broadcast_object(replace(original, runner=None) if original else None)
    return original or shared


def _without_runners(result: CompressResult) -> CompressResult:
    """The result as other ranks receive it: runners (open sessions) stay on rank 0."""
    return replace(result, original=replace(result.original, runner=None),
                   baselines=[replace(b, runner=None) for b in result.baselines])


def _load_runners(trials: list[Trial], bench: Workbench, goal: Goal, k: int = 4) -> None:
    """Under torchrun, runners for the fastest feasible candidates other ranks built, from their
    artifacts (ONNX in onnxruntime, TorchScript in torch), so the final timing sees them too."""
    if distributed.world_size() == 1 or goal.objective != "latency":
        return
    ok = sorted((t for t in trials if t.feasible and t.latency_ms is not None and t.artifact),
                key=lambda t: t.latency_ms)[:k]
    for trial in ok:
        if trial.number in bench.runners or not os.path.exists(trial.artifact):
            continue
        try:
            if trial.backend.startswith("onnx"):
                bench.runners[trial.number] = peer.ort_runner(trial.artifact, goal.threads)
            elif trial.backend.startswith("torchscript"):
                bench.runners[trial.number] = eager_runner(torch.jit.load(trial.artifact))
        except Exception:   # not loadable here: it keeps the latency its own trial measured
            continue


def _params(space: Space, recipe: Recipe) -> dict:
    """A recipe as the study's parameters (only those the sampler would ask for it)."""
    params: dict[str, Any] = {}
    if space.max_prune > 0:
        params["prune"] = recipe.prune
    if recipe.prune:
        params["scope"] = recipe.scope
        if space.max_protect:
            params["protect"] = recipe.protect
        if len(space.round_to) > 1:
            params["round_to"] = recipe.round_to
    if len(space.low_rank) > 1:
        params["low_rank"] = recipe.low_rank
    if (recipe.prune or recipe.low_rank or recipe.sparsity or recipe.share_bits) and len(space.finetune) > 1:
        params["finetune"] = recipe.finetune
    if len(space.sparsity) > 1:
        params["sparsity"] = recipe.sparsity
    if len(space.share_bits) > 1:
        params["share_bits"] = recipe.share_bits
    if len(space.quant) > 1 and not recipe.share_bits:
        params["quant"] = recipe.quant
    if recipe.quant == "int8" and space.max_sensitive_float:
        params["sensitive_float"] = recipe.sensitive_float
    if recipe.quant == "int8" and len(space.qat) > 1:
        params["qat"] = recipe.qat
    return params


def _int8_alone(recipe: Recipe) -> bool:
    """int8 and nothing else (some layers may stay float): what accuracy control builds."""
    return recipe == Recipe(quant="int8", sensitive_float=recipe.sensitive_float)


def _int8_pays(trials: list[Trial], goal: Goal) -> bool:
    """Whether int8 ran faster than the original's own export, where both were measured (latency
    goals: the accuracy-control trials run before the seeds). The Fashion-MNIST CNN's int8 runs at
    0.81x of its fp32 file in onnxruntime at batch 1, so its seeds prune in fp32."""
    if goal.objective != "latency":
        return True
    timed = {t.recipe: t.latency_ms for t in trials if t.status == "complete" and t.latency_ms is not None}
    original = timed.get(Recipe())
    int8 = [ms for recipe, ms in timed.items() if _int8_alone(recipe)]
    return original is None or not int8 or min(int8) < original


def _seeds(space: Space, int8: bool = True) -> list[Recipe]:
    """Starting points that make an early stop worth having: the compounds that usually win
    (pruned and int8 for latency, unless ``int8`` says it runs slower here than fp32)."""
    finetune = max(space.finetune)
    half = sens.on_grid(space.max_prune / 2)
    prunes = [p for p in (half, space.max_prune) if p > 0]
    if max(space.share_bits) > 0:   # size: Deep Compression's compound (sparse + shared) first; shared weights
        bits = [b for b in space.share_bits if b]
        middle = bits[len(bits) // 2]
        seeds = [Recipe(prune=p, finetune=finetune, share_bits=middle) for p in prunes]
        if max(space.sparsity) > 0:
            # at half the range (safe), then a grid step short of its end (sparsity and sharing
            # lose their own share): the smallest within a point were deep (MobileNetV2 pruned by
            # 60%, +1.85 points, 26.9x; the Fashion-MNIST CNN by 60%, -0.87, 21.2x), and pushing
            # there from half by 10% steps took MobileNetV2 three candidates and 29 minutes
            deep = sens.on_grid(space.max_prune - sens.GRID)
            sparse = space.sparsity[len(space.sparsity) // 2]
            seeds[:0] = [Recipe(prune=p, finetune=finetune, share_bits=min(bits), sparsity=sparse)
                         for p in dict.fromkeys((half, max(deep, half)))]
        return seeds
    quant = "int8" if int8 and "int8" in space.quant else "fp32"
    return [Recipe(prune=p, finetune=finetune, quant=quant, round_to=space.round_to[0]) for p in prunes]


def _harder(space: Space, recipe: Recipe, reach: Callable[[int, int], float],
            too_deep: Iterable[Recipe] = ()) -> list[Recipe]:
    """The recipe one step further along each knob it already turns: pruning by PUSH of the MACs
    (within the range, what ``reach(round_to, protect)`` says the pass can remove, and a grid step
    short of the shallowest of ``too_deep`` -- built, outside the drop -- that differs from it only
    in pruning), sparsity to the space's next level. (MobileNetV2's size seed, prune 30% +
    sparsity 70% + 4-bit sharing, gained 2.5 points and stopped at 19.7x.)"""
    out = []
    deepest = min(space.max_prune, reach(recipe.round_to, recipe.protect))
    lost = [r.prune for r in too_deep if r.prune > recipe.prune and replace(r, prune=recipe.prune) == recipe]
    if lost:
        deepest = min(deepest, round(min(lost) - sens.GRID, 4))
    if recipe.prune and recipe.prune < deepest:
        out.append(replace(recipe, prune=round(min(recipe.prune + PUSH, deepest), 4)))
    levels = sorted(level for level in space.sparsity if level > recipe.sparsity)
    if recipe.sparsity and levels:
        out.append(replace(recipe, sparsity=levels[0]))
    return out


def _accuracy_control(trials: list[Trial]) -> Trial | None:
    """The accuracy-control baseline read from the trials: int8 with the fewest float layers within the drop."""
    ok = [t for t in trials if t.feasible and _int8_alone(t.recipe)]
    return min(ok, key=lambda t: t.recipe.sensitive_float, default=None)


def _measure_original(base: Graph, module: nn.Module, goal: Goal, evaluator: Evaluator, out_dir: str) -> Point:
    """The original in the goal's runtime: fp32 ONNX in onnxruntime, TorchScript in torch, or the
    packed fp32 file for size goals; its metric is the user's metric of the model as given."""
    metric = evaluator(eager_runner(module), "the original model")
    backend = Recipe().backend(goal)
    folder = os.path.join(out_dir, "original")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model" + EXTENSIONS[backend])
    try:
        report = get_backend(backend)(base, path)
    except GraphoptError as exc:
        raise ConfigError(f"the original model cannot be exported for the goal's runtime ({backend}): {exc}") from exc
    run = report.runner or eager_runner(base.gm)
    inputs = batch_inputs(base.example_inputs, goal.batch_size)
    try:
        latency = time_ms(run, inputs)
    except Exception as exc:
        raise ConfigError(f"the original's {backend} artifact does not run at batch_size={goal.batch_size}: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return Point("original", metric, latency, report.bytes, path, f"{backend}, fp32", torch_runner(run))


def _sensitivity_stage(base, evaluator, context, goal, original_metric, allowed, finetune_batches, out_dir,
                       resume, say) -> sens.Sensitivity:
    started = time.perf_counter()
    result = sens.Sensitivity()
    try:
        result.prune_layers = sens.prune_layer_sensitivity(base)
    except GraphoptError as exc:
        result.notes.append(f"no structured pruning: {exc}")
    if result.prune_layers:
        result.reach = sens.prune_reach(base)
        result.sweep = sens.prune_sweep(base, lambda g: evaluator(eager_runner(g.gm), "the pruning sweep"))
    if context and goal.objective != "macs":
        try:
            result.quant_layers = sens.quant_layer_sensitivity(base, context)
        except GraphoptError as exc:
            result.notes.append(f"no int8: {exc}")
    elif goal.objective != "macs":
        result.notes.append("no int8: calibration needs data")
    if goal.max_finetune_epochs is not None:   # the user's cap: nothing to measure
        result.longest_recovery = float(goal.max_finetune_epochs)
    elif context and result.prune_layers:
        try:
            result.epoch_seconds, result.longest_recovery = _recovery(base, context, goal, original_metric,
                                                                      finetune_batches, out_dir, resume)
        except GraphoptError as exc:   # the trials' own distillation will name it
            result.notes.append(f"recovery cost not measured: {exc}")
    result.seconds = time.perf_counter() - started
    pruning = (f"pruning reaches {result.reach:.0%} of the MACs; sweep (no fine-tuning) "
               + ", ".join(f"{r:.0%} -> {m:.4g}" for r, m in result.sweep.items())) if result.prune_layers \
        else "no structured pruning"
    recovery = f"; an epoch of distillation {result.epoch_seconds:.1f} s" if result.epoch_seconds else ""
    say(f"sensitivity: {len(result.prune_layers)} prunable layers, {len(result.quant_layers)} quantizable layers; "
        f"{pruning}{recovery} ({result.seconds:.1f} s)")
    return result


def _digest(goal: Goal, *parts: Any) -> str:
    """A short name for a run's settings, the goal's budget left out (a longer run resumes a shorter one)."""
    return hashlib.sha256(json.dumps([goal.model_dump(exclude={"max_minutes", "max_trials"}), *parts],
                                     default=str).encode()).hexdigest()[:12]


def _recovery(base: Graph, context: dict, goal: Goal, original_metric: float, finetune_batches: int | None,
              out_dir: str, resume: bool) -> tuple[float | None, float]:
    """The cost of a distillation epoch and the longest recovery it allows, measured once per
    ``out_dir``: a resumed run (even with a longer ``max_minutes``) keeps the search space, and so
    the study, it started with, however the timing of a second measurement would fall."""
    path = os.path.join(out_dir, "recovery.json")
    key = _digest(goal, len(list(base.nodes)), original_metric, finetune_batches)
    saved = None
    if resume and distributed.is_main() and os.path.isfile(path):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = None
    if distributed.active():
        saved = distributed.broadcast_object(saved)
    if isinstance(saved, dict) and saved.get("key") == key and saved.get("longest_recovery") in (8.0, *LONG_RECOVERY) \
            and isinstance(saved.get("epoch_seconds"), (int, float, type(None))):   # anything else: measured again
        return saved["epoch_seconds"], float(saved["longest_recovery"])
    seconds = sens.distill_epoch_seconds(base, context["train_data"], finetune_batches)
    longest = longest_recovery(goal, seconds)
    if distributed.is_main():
        os.makedirs(out_dir, exist_ok=True)
        write_json(path, {"key": key, "epoch_seconds": seconds, "longest_recovery": longest})
    return seconds, longest


def _space(goal: Goal, context: dict, sensitivity: sens.Sensitivity, original: float, allowed: float) -> Space:
    space = Space.for_goal(goal, has_train_data=bool(context), longest=sensitivity.longest_recovery)
    changes: dict[str, Any] = {}
    if not sensitivity.prune_layers:
        changes.update(max_prune=0.0, max_protect=0)
    else:
        changes["max_prune"] = sensitivity.max_prune(original, allowed, max(space.finetune), space.max_prune)
        changes["max_protect"] = min(space.max_protect, max(len(sensitivity.prune_layers) - 1, 0))
    if not sensitivity.quant_layers:   # no calibration data, or nothing int8 can run: weight coding stays
        changes.update(quant=tuple(q for q in space.quant if q != "int8"), max_sensitive_float=0)
    else:
        changes["max_sensitive_float"] = min(space.max_sensitive_float, len(sensitivity.quant_layers) - 1)
    return replace(space, **changes)


def _peer_baselines(base: Graph, goal: Goal, evaluator: Evaluator, context: dict, out_dir: str, original: Point,
                    say) -> list[Point]:
    """onnxruntime's quantize_static recipes on the original's fp32 ONNX file, measured like the trials."""
    if goal.runtime != "onnxruntime" or goal.objective == "macs" or "calibration_data" not in context:
        return []
    folder = os.path.join(out_dir, "baselines")
    os.makedirs(folder, exist_ok=True)
    fp32 = original.artifact if original.artifact.endswith(".onnx") else None
    if fp32 is None:
        fp32 = os.path.join(folder, "fp32.onnx")
        get_backend("onnx")(base, fp32)
    batches = [split_batch(b)[0] for _, b in zip(range(16), context["calibration_data"]())]
    batches = [b if len(b) > 1 else b[0] for b in batches]
    inputs = batch_inputs(base.example_inputs, goal.batch_size)
    points = []
    for name, (pre, reduce_range) in peer.ORT_RECIPES.items():
        try:
            with _quiet_logging():   # onnxruntime's tools log advice on the root logger
                path = peer.ort_quantized(fp32, folder, batches, pre, reduce_range)
            run = peer.ort_runner(path, goal.threads)
            metric = evaluator(run, name)
            points.append(Point(name, metric, time_ms(run, inputs), os.path.getsize(path), path,
                                "" if goal.objective != "size" else "onnxruntime (not the packed runtime)", run,
                                comparable=goal.objective != "size"))
        except GraphoptError:
            raise
        except Exception as exc:   # a peer tool failing is a result to show, not a reason to stop
            points.append(Point(name, float("nan"), None, None, None, f"failed: {type(exc).__name__}: {exc}"))
    say("baselines: " + "; ".join(f"{p.name}: {p.metric:.4g}" + (f", {p.latency_ms:.3g} ms" if p.latency_ms else "")
                                  for p in points))
    return points


def _finalists(trials: list[Trial], goal: Goal, bench: Workbench, chosen: Trial | None, k: int = 4) -> list[Trial]:
    """For latency goals, the k fastest feasible candidates as their trials timed them (one at a
    time, on a machine that may have been busy): timed again side by side before one is chosen."""
    if goal.objective != "latency":
        return [chosen] if chosen else []
    ok = sorted((t for t in trials if t.feasible and t.number in bench.runners), key=lambda t: t.latency_ms)
    return ok[:k] or ([chosen] if chosen else [])


@contextlib.contextmanager
def _quiet_logging():
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _remeasure(result: CompressResult, bench: Workbench, finalists: list[Trial]) -> dict[str, float]:
    """Latency of the original, the finalists, the accuracy-control baseline and the peers, timed
    interleaved in one loop so their ratios do not depend on when each trial happened to run."""
    runners: dict[str, Callable] = {}
    if result.original.runner:
        runners["original"] = result.original.runner
    plain = []   # the original's own export: the same file as "original", so its timing, not a second one
    for trial in {id(t): t for t in (*finalists, result.accuracy_control) if t is not None}.values():
        run = bench.runners.get(trial.number)
        if trial.recipe == Recipe() and "original" in runners:
            plain.append(f"trial {trial.number}")
        elif run is not None:
            runners[f"trial {trial.number}"] = run
    for point in result.baselines:
        if point.runner is not None:
            runners[point.name] = point.runner
    if len(runners) < 2:
        return {}
    inputs = bench.inputs()
    runs = {k: (lambda r=r: r(*inputs)) for k, r in runners.items()}
    inner = calls_per_sample(next(iter(runners.values())), inputs)
    # each sample after as many untimed calls: a model timed with its own weights in cache, as it runs
    # when deployed, not right after its neighbour evicted them
    timed = {k: v * 1e3 for k, v in interleaved_latency(runs, rounds=20, inner=inner, hot=inner).items()}
    return timed | {name: timed["original"] for name in plain}
