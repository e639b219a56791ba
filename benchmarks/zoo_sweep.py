"""Sweep public model zoos through the whole pipeline, as a new user would run it.

    python -m benchmarks.zoo_sweep [--zoo timm,hf,torchvision] [--family F,...] [--models a,b] [--limit N]
                                   [--timeout 120] [--ratio 0.3] [--out bench-results/zoo_sweep.json]
    python -m benchmarks.zoo_sweep render [--before OLD.json] [--json bench-results/zoo_sweep.json] [--md OUT.md]
    python -m benchmarks.zoo_sweep select      # re-derive the timm models (benchmarks/zoo_models.json, minutes)

Per model (random weights, ``graphopt.tools.random_init.informative_init``; which models and how they
are built: ``benchmarks/zoo_models.py``): build, ``trace``, ``fold_batchnorm``, ``prune_channels(ratio)``
(MACs and parameters kept, the oracle's error, and what blocks the channel groups that stay), then
``insert_qdq`` (4 random calibration batches) + ``fold_qdq`` and the ``onnx_int8`` export with its
parity check. Each stage is verified by the PassManager as always. A stage that fails is recorded
with its reason and the pipeline goes on where it can (quantization runs on the unpruned graph
when pruning is refused), so every stage's refusals are counted. A model goes **through** when every
stage passes and pruning removes at least ``--min-cut`` of its MACs.

Each model runs in a worker process with a time limit (``timeout``, recorded with the stage it was
in); a crash or a timeout restarts the worker. Results are written after every model (JSON and the
Markdown tables), so an interrupted sweep keeps what it did; ``--resume`` skips models already in
``--out``. This is a tool, not a test: the full sweep takes hours on two cores.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any

STAGES = ("build", "trace", "fold_batchnorm", "prune_channels", "quantize", "onnx_int8")
CALIBRATION_BATCHES = 4
OUT = "bench-results/zoo_sweep.json"


# -- one model, in the worker --------------------------------------------------------------------------
def _short(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}"


def run_model(spec, ratio: float, progress=lambda stage, row: None) -> dict:
    """Every stage on one model; the row the sweep records."""
    import torch

    import graphopt
    from benchmarks.zoo_models import BUILDERS
    from graphopt import PassContext, PassManager
    from graphopt.backends import onnx_int8
    from graphopt.passes import FoldBatchNorm, FoldQDQ, InsertQDQ, PruneChannels
    from graphopt.passes.prune_channels import NothingToPrune, blocking_summary
    from graphopt.tools.random_init import informative_init

    row: dict[str, Any] = {"zoo": spec.zoo, "model": spec.model, "family": spec.family, "stages": {}}
    stages = row["stages"]

    def stage(name: str, fn):
        progress(name, row)
        start = time.perf_counter()
        try:
            value = fn()
            stages.setdefault(name, {})["ok"] = True
            return value
        except Exception as exc:   # a refusal or failure is a result of the sweep, recorded with its cause
            stages.setdefault(name, {}).update(ok=False, reason=_short(exc))
            if not isinstance(exc, (graphopt.GraphoptError, NothingToPrune)):
                stages[name]["where"] = traceback.format_exc().splitlines()[-3:-1]
            return None
        finally:
            stages.setdefault(name, {})["s"] = round(time.perf_counter() - start, 2)

    torch.manual_seed(0)
    built = stage("build", lambda: BUILDERS[spec.zoo](spec.model))
    if built is None:
        return row
    model, make_inputs, row["input"] = built
    model = informative_init(model)
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
    graph = stage("trace", lambda: graphopt.trace(model, make_inputs(0)))
    if graph is None:
        return row
    row["captured_by"] = graph.captured_by
    del model
    folded = stage("fold_batchnorm", lambda: PassManager([FoldBatchNorm()]).run(graph))
    if folded is not None:
        stages["fold_batchnorm"]["folded"] = folded.records[1].stats.get("folded", 0)
        graph = folded.graph

    def prune():
        plan = graph.analysis("channel_groups")
        info = stages.setdefault("prune_channels", {})
        info.update(groups=len(plan.groups), prunable=len(plan.prunable))
        if plan.blocked:
            info["blocking"] = blocking_summary(plan.blocked, top=3)[len("blocking: "):]
        return PassManager([PruneChannels(ratio=ratio)]).run(graph)

    pruned = stage("prune_channels", prune)
    info = stages["prune_channels"]
    if pruned is not None:
        before, after = pruned.records[0], pruned.records[1]
        info.update(macs_kept=round(after.macs / before.macs, 4), params_kept=round(after.params / before.params, 4),
                    channels_removed=after.stats["channels_removed"], oracle_error=after.contract_error)
        graph = pruned.graph
    else:
        info.setdefault("macs_kept", 1.0)

    calibration = [make_inputs(1 + i) for i in range(CALIBRATION_BATCHES)]
    quantized = stage("quantize", lambda: PassManager(
        [InsertQDQ(progress=False), FoldQDQ()], context=PassContext({"calibration_data": calibration})).run(graph))
    if quantized is None:
        return row
    stats = quantized.records[1].stats
    stages["quantize"].update(error=quantized.records[1].contract_error, sqnr_db=stats.get("sqnr_db"),
                              int8_layers=stats.get("int8_layers"), float_layers=len(stats.get("float_layers", {})))
    with tempfile.TemporaryDirectory() as tmp:
        report = stage("onnx_int8", lambda: onnx_int8.export(quantized.graph, os.path.join(tmp, "model.int8.onnx")))
    if report is not None:
        d = report.details
        stages["onnx_int8"].update(form=d.get("form"), lowering=d.get("lowering"),
                                   within_one_step=d.get("within_one_step"),
                                   outputs_within_one_step=d.get("outputs_within_one_step"),
                                   int8_mac_share=d.get("int8_mac_share"), max_rel_error=report.max_rel_error)
        if d.get("simplify_skipped"):
            stages["onnx_int8"]["simplify_skipped"] = str(d["simplify_skipped"])[:200]
    return row


def _worker(conn, ratio: float, threads: int) -> None:
    import torch

    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)
    import graphopt.backends  # noqa: F401  (registers the backends)
    import graphopt.passes  # noqa: F401

    while True:
        spec = conn.recv()
        if spec is None:
            return
        try:
            row = run_model(spec, ratio, lambda stage, partial: conn.send(("stage", (stage, partial))))
        except BaseException as exc:   # anything run_model did not catch is still one model's result
            row = {"zoo": spec.zoo, "model": spec.model, "family": spec.family, "stages": {},
                   "error": _short(exc)}
        conn.send(("row", row))


class Worker:
    """A process that runs models one at a time; killed and replaced on a timeout or a crash."""

    def __init__(self, ratio: float, threads: int):
        self.ratio, self.threads, self.process = ratio, threads, None

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, self.ratio, self.threads), daemon=True)
        self.process.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join()
            self.process = None

    def run(self, spec, timeout: float) -> dict:
        if self.process is None or not self.process.is_alive():
            self.start()
        self.conn.send(spec)
        deadline, current = time.monotonic() + timeout, "start"
        partial = {"zoo": spec.zoo, "model": spec.model, "family": spec.family, "stages": {}}
        while True:
            remaining = deadline - time.monotonic()
            try:
                ready = remaining > 0 and self.conn.poll(remaining)
                if ready:
                    kind, value = self.conn.recv()
                    if kind == "row":
                        return value
                    current, partial = value
                    continue
            except (EOFError, OSError):   # the process died (out of memory, a crash in native code)
                code = self.process.exitcode if self.process is not None else None
                self.stop()
                return dict(partial, error=f"worker crashed in stage {current} (exit code {code})", died_in=current)
            self.stop()   # what the stages before this one found is kept
            return dict(partial, error=f"timeout after {timeout:.0f} s in stage {current}", died_in=current)


# -- reading rows ----------------------------------------------------------------------------------------
def reached(row: dict) -> str:
    """The last stage passed in order, where a refused prune still lets the pipeline go on."""
    last = "-"
    for name in STAGES:
        info = row["stages"].get(name)
        if info is None or not info.get("ok"):
            return last
        last = name
    return last


def first_failure(row: dict) -> tuple[str, str]:
    """(stage, reason) of the first stage that did not pass; ('', '') when none."""
    if row.get("error"):
        return row.get("died_in", "-"), row["error"]
    for name in STAGES:
        info = row["stages"].get(name)
        if info is None:
            return name, "not run"
        if not info.get("ok"):
            return name, info.get("reason", "")
    return "", ""


def through(row: dict, min_cut: float) -> bool:
    prune = row["stages"].get("prune_channels", {})
    return reached(row) == STAGES[-1] and prune.get("macs_kept", 1.0) <= 1 - min_cut


def reason_class(text: str) -> str:
    """A refusal reason with its model-specific parts (node names, numbers, paths) blanked, so the
    same cause counts once across models."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    text = re.sub(r"\b[\w.]*\d[\w.]*\b", "N", text)
    text = re.sub(r"/\S+", "PATH", text)
    return text[:160]


def summary(rows: list[dict], min_cut: float) -> dict:
    def count(pred):
        return sum(1 for r in rows if pred(r))

    ok = lambda r, s: r["stages"].get(s, {}).get("ok", False)  # noqa: E731
    return {"models": len(rows),
            "traced": count(lambda r: ok(r, "trace")),
            "pruned": count(lambda r: ok(r, "prune_channels")),
            "pruned_min_cut": count(lambda r: ok(r, "prune_channels")
                                    and r["stages"]["prune_channels"].get("macs_kept", 1) <= 1 - min_cut),
            "quantized": count(lambda r: ok(r, "quantize")),
            "int8_exported": count(lambda r: ok(r, "onnx_int8")),
            "int8_kernels": count(lambda r: ok(r, "onnx_int8")
                                  and (r["stages"]["onnx_int8"].get("int8_mac_share") or 0) >= 0.5),
            "through": count(lambda r: through(r, min_cut))}


def per_zoo(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """(zoo, its rows) for each zoo in the order first seen, then ("all", every row)."""
    zoos = list(dict.fromkeys(r["zoo"] for r in rows))
    return [(zoo, [r for r in rows if r["zoo"] == zoo]) for zoo in zoos] + [("all", list(rows))]


# #15's targets, per zoo: share of models through (pipeline complete, oracle and int8 parity passing),
# and share whose pruning at the sweep's ratio removes at least a quarter of the MACs
TARGET_THROUGH, TARGET_CUT, CUT = 0.95, 0.90, 0.25


def targets(rows: list[dict], min_cut: float) -> list[list]:
    """One row per zoo (and all): through and big-cut counts, shares, and whether each target is met."""
    table = []
    for zoo, mine in per_zoo(rows):
        n = len(mine)
        through_n = sum(through(r, min_cut) for r in mine)
        cut_n = sum(through(r, CUT) for r in mine)
        table.append([zoo, n, f"{through_n} ({through_n / n:.1%})", "met" if through_n >= TARGET_THROUGH * n else "missed",
                      f"{cut_n} ({cut_n / n:.1%})", "met" if cut_n >= TARGET_CUT * n else "missed"])
    return table


# -- Markdown --------------------------------------------------------------------------------------------
def _num(value: Any, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows])


SUMMARY_COLUMNS = [("models", "models"), ("traced", "traced"), ("pruned", "pruned (any channel)"),
                   ("pruned_min_cut", "pruned >= min cut"), ("quantized", "int8 graph"),
                   ("int8_exported", "int8 ONNX"), ("int8_kernels", "int8 kernels >= 50% of MACs"),
                   ("through", "**through**")]


def markdown(payload: dict, before: dict | None = None) -> str:
    rows, min_cut = payload["rows"], payload["config"]["min_cut"]
    out = [f"# Zoo sweep: {payload['config']['pipeline']}", "",
           f"Generated by `python -m benchmarks.zoo_sweep` ({payload['config']['when']}; random weights, "
           f"{payload['config']['threads']} thread(s), {payload['config']['timeout']:.0f} s per model). "
           f"**through** = every stage passed and pruning removed at least {min_cut:.0%} of the MACs. "
           f"int8 parity: share of quantized values of the ONNX file within one step of the simulated-int8 "
           f"graph (the export refuses below 99%); MACs in int8 kernels: share of the conv/linear MACs "
           f"onnxruntime runs in integer kernels." + (f" Run: {payload['config']['label']}." if
                                                       payload['config'].get('label') else ""), ""]
    header = ["zoo"] + [label for _, label in SUMMARY_COLUMNS]
    if before is not None:
        old_rows = {(r["zoo"], r["model"]): r for r in before["rows"]}
        for r in before["rows"]:   # an earlier sweep may not have counted everything this one does
            r["stages"].get("onnx_int8", {}).setdefault("int8_mac_share", None)
        out += ["## Coverage before -> after", "",
                f"Before: {before['config'].get('label') or before['config']['when']}; after: "
                f"{payload['config'].get('label') or payload['config']['when']} (same models where both ran).", ""]
        table = []
        for zoo, new in per_zoo(rows):
            old = [old_rows[(r["zoo"], r["model"])] for r in new if (r["zoo"], r["model"]) in old_rows]
            a, b = summary(old, min_cut), summary(new, min_cut)
            table.append([zoo] + [f"{a[k]} -> {b[k]}" if len(old) == len(new) else f"? -> {b[k]}"
                                  for k, _ in SUMMARY_COLUMNS])
        out += [_table(header, table), ""]
    out += ["## Coverage", ""]
    table = [[zoo] + [summary(mine, min_cut)[k] for k, _ in SUMMARY_COLUMNS] for zoo, mine in per_zoo(rows)]
    out += [_table(header, table), ""]
    out += ["## Targets", "", f"Through: target {TARGET_THROUGH:.0%} of each zoo. Big cut: through with at least "
            f"{CUT:.0%} of the MACs removed at ratio {payload['config']['ratio']}, target {TARGET_CUT:.0%}.", "",
            _table(["zoo", "models", "through", f"{TARGET_THROUGH:.0%}", "big cut", f"{TARGET_CUT:.0%}"],
                   targets(rows, min_cut)), ""]
    out += ["## Why models stop", "", "First failing stage and reason (model-specific names blanked), most "
            "frequent first; pruning that removes less than the minimum cut counts as a refusal here.", ""]
    classes: collections.Counter = collections.Counter()
    examples: dict[tuple, list] = collections.defaultdict(list)
    for r in rows:
        stage, reason = first_failure(r)
        if not stage and not through(r, min_cut):
            stage = "prune_channels"
            reason = "pruned too little: " + r["stages"]["prune_channels"].get("blocking", "")
        if stage:
            key = (stage, reason_class(reason))
            classes[key] += 1
            examples[key].append(f"{r['zoo']}:{r['model']}")
    out += [_table(["stage", "reason", "models", "e.g."],
                   [[s, c, n, ", ".join(examples[(s, c)][:3])] for (s, c), n in classes.most_common()]), ""]
    out += ["## Every model", ""]
    table = []
    for r in rows:
        st = r["stages"]
        prune, quant, export = st.get("prune_channels", {}), st.get("quantize", {}), st.get("onnx_int8", {})
        stage, reason = first_failure(r)
        note = reason if stage else prune.get("blocking", "") if not through(r, min_cut) else ""
        table.append([r["zoo"], r["family"], r["model"], r.get("input", "-"), _num(r.get("params_m"), ".2f"),
                      "yes" if through(r, min_cut) else "no", reached(r),
                      f"{prune.get('prunable', '-')}/{prune.get('groups', '-')}",
                      _num(prune.get("macs_kept") if prune.get("ok") else None, ".3f"),
                      _num(prune.get("oracle_error"), ".1e"), _num(quant.get("error"), ".3f"),
                      _num(export.get("within_one_step"), ".2%"),
                      _num(export.get("int8_mac_share"), ".0%"), export.get("form") or "-",
                      (f"{stage}: " if stage else "") + note[:220]])
    out += [_table(["zoo", "family", "model", "input", "params M", "through", "reached", "prunable groups",
                    "MACs kept", "oracle err", "int8 graph err", "int8 parity", "MACs in int8 kernels", "form",
                    "first refusal (or what blocks pruning)"], table), ""]
    return "\n".join(out)


def write(path: str, payload: dict, md_path: str | None, before: dict | None = None) -> None:
    from graphopt.report import write_json

    payload["summary"] = {zoo: summary(mine, payload["config"]["min_cut"]) for zoo, mine in per_zoo(payload["rows"])}
    write_json(path, payload)
    if md_path:
        os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
        with open(md_path, "w") as f:
            f.write(markdown(payload, before))


# -- command line ----------------------------------------------------------------------------------------
def _load(path: str | None) -> dict | None:
    if not path:
        return None
    with open(path) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["select"]:
        from benchmarks.zoo_models import CATALOGUE, select_timm

        print(f"{len(select_timm())} timm models written to {CATALOGUE}")
        return
    if argv[:1] == ["render"]:
        parser = argparse.ArgumentParser(description="Markdown of a sweep's JSON, against an earlier one")
        parser.add_argument("--json", default=OUT)
        parser.add_argument("--before")
        parser.add_argument("--md", default=None)
        args = parser.parse_args(argv[1:])
        payload = _load(args.json)
        with open(args.md or os.path.splitext(args.json)[0] + ".md", "w") as f:
            f.write(markdown(payload, _load(args.before)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="timm,hf,torchvision")
    parser.add_argument("--family", help="comma-separated families (timm modules, torchvision name stems, "
                                         "encoder/decoder/vision/encoder-decoder for hf)")
    parser.add_argument("--models", help="comma-separated model names")
    parser.add_argument("--limit", type=int, help="at most this many models per zoo")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--min-cut", type=float, default=0.1, help="share of MACs pruning must remove (through)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--md", help="Markdown tables (default: beside --out)")
    parser.add_argument("--before", help="an earlier sweep's JSON: the Markdown compares coverage with it")
    parser.add_argument("--label", default="", help="a name for this run in before/after tables")
    parser.add_argument("--resume", action="store_true", help="keep --out's rows and run only the others")
    args = parser.parse_args(argv)

    from benchmarks.zoo_models import specs

    chosen = specs(args.zoo.split(","))
    if args.family:
        families = set(args.family.split(","))
        chosen = [s for s in chosen if s.family in families]
    if args.models:
        names = set(args.models.split(","))
        chosen = [s for s in chosen if s.model in names]
    if args.limit:
        per_zoo: collections.Counter = collections.Counter()
        chosen = [s for s in chosen if (per_zoo.update([s.zoo]) or per_zoo[s.zoo] <= args.limit)]
    md_path = args.md or os.path.splitext(args.out)[0] + ".md"
    rows = []
    if args.resume and os.path.exists(args.out):
        rows = _load(args.out)["rows"]
        done = {(r["zoo"], r["model"]) for r in rows}
        chosen = [s for s in chosen if (s.zoo, s.model) not in done]
    config = {"pipeline": f"fold_batchnorm -> prune_channels(ratio={args.ratio}) -> insert_qdq + fold_qdq -> "
                          f"onnx_int8", "ratio": args.ratio, "min_cut": args.min_cut, "timeout": args.timeout,
              "threads": args.threads, "when": time.strftime("%Y-%m-%d"), "label": args.label,
              "calibration_batches": CALIBRATION_BATCHES}
    before = _load(args.before)
    worker = Worker(args.ratio, args.threads)
    try:
        for index, spec in enumerate(chosen, 1):
            start = time.perf_counter()
            row = worker.run(spec, args.timeout)
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            stage, reason = first_failure(row)
            verdict = "through" if through(row, args.min_cut) else f"stops at {stage or 'prune_channels'}"
            print(f"[{index}/{len(chosen)}] {spec.key}: {verdict} ({row['seconds']} s)"
                  + (f": {reason[:150]}" if stage else ""), flush=True)
            write(args.out, {"config": config, "rows": rows}, md_path, before)
    finally:
        worker.stop()
    payload = _load(args.out) if rows else {"summary": {}}
    for zoo, counts in payload["summary"].items():
        print(zoo, ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"wrote {args.out} and {md_path}")


if __name__ == "__main__":
    main()
