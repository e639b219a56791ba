"""Int8 speed benchmark: graphopt's int8 backends against fp32 and the usual int8 recipes.

    python -m benchmarks.bench_quant [--models resnet18,resnet50,mobilenet_v2] [--batches 1,16]
                                         [--threads 2] [--targets x86-vnni,x86-avx2] [--prune-macs 0.5]
                                         [--out bench-results/quant.json]

Per model and batch size, every runtime runs in one process, interleaved (A, B, C, ... repeated),
medians reported as ratios over onnxruntime fp32. Thread counts are fixed (torch and
onnxruntime) and onnxruntime's thread spinning is off so it does not slow the torch runs.
torch's OpenMP threads keep spin-waiting between ops, as by default, but stop after about a
millisecond idle (GOMP_SPINCOUNT=20000; the default spins for ~10 ms after each torch run
and slowed the onnxruntime run timed next by a third on MobileNetV2, while
OMP_WAIT_POLICY=PASSIVE makes every torch op pay a thread wake-up: MobileNetV2's eager batch-1
time 2.7x). Each timed run follows an untimed run of the same column (steady state).
Columns: torch eager fp32; onnxruntime fp32; onnxruntime ``quantize_static`` called plainly
(QDQ, per-channel); onnxruntime ``quant_pre_process`` then ``quantize_static`` (QOperator,
U8 activations, S8 weights, per-channel); the same with ``reduce_range=True`` (7-bit weights:
onnxruntime's own answer for CPUs without VNNI, whose u8 x s8 pairs add in a saturating int16);
torch.ao FX int8 (x86); graphopt TorchScript int8 and graphopt ONNX int8, one column each per
``--targets`` entry (``insert_qdq(target=...)``: x86-vnni full-range weights, x86-avx2 weights in
[-64, 64]; graphopt.quant.targets). Compounding (image models; ``--prune-macs 0`` leaves it out):
graphopt fp32 (graphopt's fp32 ONNX backend on the dense folded graph: the export alone, a
control), graphopt pruned fp32 (prune_channels to ``--prune-macs`` x the MACs, round_to 32, as
bench_prune), and pruned + int8 ONNX per target; the compounding ratio is
(pruned+int8 speed-up) / (pruned fp32 speed-up x int8 speed-up), 1 where the two compose fully.
A graphopt artifact whose export check refuses it is reported as refused, with the reason.
Weights are random (torchvision ``weights=None``): speed does not depend on them.
``minilm`` is all-MiniLM-L6-v2 with its real weights at sequence length 128 (requirements-minilm.txt;
its torch.ao column is torch's dynamic int8, since torch.fx cannot trace BERT).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import tempfile
import time
import warnings

import onnxruntime as ort
import torch
import torchvision

import graphopt
from benchmarks import harness
from benchmarks.bench_prune import ROUND_TO, prune_to_macs
from graphopt import PassContext, PassManager
from graphopt.backends import onnx_int8, torchscript_int8
from graphopt.errors import GraphoptError
from graphopt.passes import FoldBatchNorm, FoldQDQ, InsertQDQ, RemoveIdentity
from graphopt.search.baselines import ort_quantized
from graphopt.report import markdown_table, table
from graphopt.quant.targets import TARGETS

SPEEDUP_GOALS = {"resnet50": 3.3, "mobilenet_v2": 2.1}   # graphopt ONNX int8 at the first batch size
COMPOUNDING_GOAL = 0.95                                  # pruned+int8 >= this x (pruned fp32 x int8)
ORT_BEST = "ORT pre_process+quantize_static"
ORT_REDUCED = "ORT pre_process+quantize_static reduce_range"
BASE_COLUMNS = ["eager fp32", "ORT fp32", "ORT quantize_static plain", ORT_BEST, ORT_REDUCED, "torch.ao FX int8"]
GRAPHOPT_FP32, PRUNED_FP32 = "graphopt fp32", "graphopt pruned fp32"


INT8_FORMS = {"ONNX": "graphopt ONNX int8", "TorchScript": "graphopt TorchScript int8",
              "pruned": "graphopt pruned+int8 ONNX"}


def int8_column(form: str, target: str) -> str:
    """The column of graphopt's int8 ``form`` (a key of INT8_FORMS) built for ``target``."""
    return f"{INT8_FORMS[form]} ({target})"


def columns(targets: list[str], prune: bool) -> list[str]:
    """Every column, in table order."""
    cols = BASE_COLUMNS + [int8_column(f, t) for f in ("TorchScript", "ONNX") for t in targets]
    if prune:
        cols += [GRAPHOPT_FP32, PRUNED_FP32] + [int8_column("pruned", t) for t in targets]
    return cols


def compounding(speedups: dict[str, float], target: str) -> dict[str, float] | None:
    """How pruning and int8 compose on ``target``: the three speed-ups over onnxruntime fp32,
    their expected product and ``ratio`` = pruned+int8 / (pruned fp32 x int8); None where a
    column is missing (not built, refused, not timed). With the graphopt fp32 control timed,
    also ``ratio_same_export``: pruning's speed-up in int8 (pruned+int8 / int8) over its
    speed-up in fp32 (pruned fp32 / graphopt fp32), both through graphopt's ONNX export, so the
    export's own effect on the fp32 time (torch.onnx's graph against graphopt's) drops out."""
    int8, pruned, both = (speedups.get(c) for c in (int8_column("ONNX", target), PRUNED_FP32,
                                                      int8_column("pruned", target)))
    if int8 is None or pruned is None or both is None:
        return None
    out = {"int8": int8, "pruned_fp32": pruned, "pruned_int8": both, "product": int8 * pruned,
           "ratio": both / (int8 * pruned)}
    if speedups.get(GRAPHOPT_FP32):
        out["ratio_same_export"] = (both / int8) / (pruned / speedups[GRAPHOPT_FP32])
    return out


def torch_ao_fx(model, x, batches):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
    with torch.no_grad():
        for b in batches:
            prepared(b)
    return torch.jit.script(convert_fx(prepared))


def fp32_onnx(model, x, path: str) -> None:
    """torch.onnx (dynamo) with a dynamic batch dimension, not simplified: what a user starts from."""
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(model, (x,), dynamo=True, opset_version=18, external_data=False, verbose=False,
                                    dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=256)}})
    program.save(path)


def build(model_name: str, folder: str, threads: int, calib_batches: int, targets: list[str],
          prune_macs: float, round_to: int):
    """Every runtime's artifact for one model; returns (runners by column, file sizes, export info)."""
    model = torchvision.models.get_model(model_name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    batches = [torch.randn(8, 3, 224, 224) for _ in range(calib_batches)]
    raw = graphopt.trace(model, x)
    fp32_path = os.path.join(folder, "fp32.onnx")
    fp32_onnx(model, x, fp32_path)
    folded = PassManager([FoldBatchNorm(), RemoveIdentity()]).run(raw).graph
    ao = torch_ao_fx(model, x, batches)
    ao_path = os.path.join(folder, "torch_ao.pt")
    torch.jit.save(ao, ao_path)
    runners, sizes, info = int8_columns(folded, fp32_path, folder, batches, threads, model, ao, targets)
    sizes["torch.ao FX int8"] = os.path.getsize(ao_path)
    if prune_macs:
        more, more_sizes, info["pruned"] = pruned_columns(raw, folded, folder, batches, threads, targets,
                                                          prune_macs, round_to)
        runners.update(more)
        sizes.update(more_sizes)
    return runners, sizes, info


def graphopt_int8(graph, batches, target: str):
    """graphopt's int8 pipeline for ``target`` (the float graph is left as it is)."""
    return PassManager([InsertQDQ(progress=False, target=target), FoldQDQ()], verify=False,
                       context=PassContext({"calibration_data": batches})).run(graph).graph


def _export_or_refusal(export, graph, path: str, info: dict, column: str, **options) -> bool:
    """Run one graphopt export; a refusal (its checks failed) is a result, recorded in
    ``info["refused"]`` with the reason, not a crash of the whole benchmark."""
    try:
        report = export(graph, path, **options)
    except GraphoptError as exc:
        info.setdefault("refused", {})[column] = f"{type(exc).__name__}: {exc}"
        print(f"  {column}: refused ({exc})", flush=True)
        return False
    info.setdefault("exports", {})[column] = report.details
    return True


def int8_columns(graph, fp32_path: str, folder: str, batches, threads: int, eager, torch_int8, targets: list[str]):
    """Every column's runner from the float graph (quantized here by graphopt, once per target),
    its fp32 ONNX file (quantized by onnxruntime's three recipes), the eager model and torch's int8 model."""
    paths = {"ORT fp32": fp32_path,
             "ORT quantize_static plain": ort_quantized(fp32_path, folder, batches, False),
             ORT_BEST: ort_quantized(fp32_path, folder, batches, True),
             ORT_REDUCED: ort_quantized(fp32_path, folder, batches, True, reduce_range=True)}
    info: dict = {}
    runners = {"eager fp32": harness.eager_runner(eager), "torch.ao FX int8": harness.eager_runner(torch_int8)}
    for target in targets:
        int8 = graphopt_int8(graph, batches, target)
        onnx_col, ts_col = int8_column("ONNX", target), int8_column("TorchScript", target)
        path = os.path.join(folder, f"graphopt.{target}.int8.onnx")
        if _export_or_refusal(onnx_int8.export, int8, path, info, onnx_col, threads=threads):
            paths[onnx_col] = path
        path = os.path.join(folder, f"graphopt.{target}.int8.pt")
        if _export_or_refusal(torchscript_int8.export, int8, path, info, ts_col):
            paths[ts_col] = path
            runners[ts_col] = harness.eager_runner(torch.jit.load(path))
    for column, path in paths.items():
        if path.endswith(".onnx"):
            runners[column] = harness.ort_runner(path, threads)
    sizes = {c: os.path.getsize(p) for c, p in paths.items()}
    return runners, sizes, info


def pruned_columns(raw, folded, folder: str, batches, threads: int, targets: list[str], macs: float, round_to: int):
    """graphopt fp32 ONNX of the dense folded graph (the export alone), of the graph pruned to
    ``macs`` x its MACs (bench_prune's pruning), and of the pruned graph in int8 per target."""
    pruned, kept = prune_to_macs(raw, macs, round_to)
    pruned = PassManager([FoldBatchNorm(), RemoveIdentity()]).run(pruned).graph
    info = {"macs_kept": kept / raw.analysis("cost").macs, "round_to": round_to}
    paths = {}
    for column, graph, name in ((GRAPHOPT_FP32, folded, "graphopt.fp32.onnx"),
                                (PRUNED_FP32, pruned, "graphopt.pruned.fp32.onnx")):
        paths[column] = harness.onnx_file(graph, os.path.join(folder, name))
    for target in targets:
        column = int8_column("pruned", target)
        path = os.path.join(folder, f"graphopt.pruned.{target}.onnx")
        if _export_or_refusal(onnx_int8.export, graphopt_int8(pruned, batches, target), path, info, column,
                              threads=threads):
            paths[column] = path
    return ({c: harness.ort_runner(p, threads) for c, p in paths.items()}, {c: os.path.getsize(p) for c, p in paths.items()},
            info)


def build_minilm(folder: str, threads: int, calib_batches: int, targets: list[str]):
    """The same columns for all-MiniLM-L6-v2 (sequence 128). torch.fx cannot trace Hugging Face
    BERT, so the torch.ao column is torch's dynamic int8 (``quantize_dynamic``), the recipe torch
    offers for transformers. No pruning columns."""
    from graphopt.tools import minilm

    tokenizer, encoder = minilm.load()
    graph = minilm.encoder_graph()
    batches = [tuple(b[0]) for b in minilm.distill_batches(tokenizer, batch_size=16)[:calib_batches]]
    fp32_path = os.path.join(folder, "fp32.onnx")
    harness.onnx_file(graph, fp32_path, simplify=False)
    dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(encoder), {torch.nn.Linear}, dtype=torch.qint8)
    runners, sizes, info = int8_columns(graph, fp32_path, folder, batches, threads, encoder, dynamic, targets)
    info["torch.ao column"] = "torch.ao quantize_dynamic (eager): torch.fx cannot trace BERT"
    torch.save(dynamic.state_dict(), os.path.join(folder, "torch_dynamic.pt"))
    sizes["torch.ao FX int8"] = os.path.getsize(os.path.join(folder, "torch_dynamic.pt"))
    inputs = lambda batch: minilm.tokenize(tokenizer, ["word " * 126] * batch, max_length=128)
    return runners, sizes, info, inputs


def _image(batch: int) -> tuple:
    return (torch.randn(batch, 3, 224, 224),)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def goals(ratios: dict[str, float], targets: list[str]) -> dict:
    """Per target: graphopt's int8 against onnxruntime's best recipe (and its reduce_range form),
    and how pruning and int8 compose (``compounding``)."""
    out = {}
    for target in targets:
        onnx_x = ratios.get(int8_column("ONNX", target))
        entry = {"graphopt_onnx_int8": onnx_x,
                 "graphopt_torchscript_int8": ratios.get(int8_column("TorchScript", target)),
                 "ort_best": ratios.get(ORT_BEST), "ort_reduce_range": ratios.get(ORT_REDUCED)}
        if onnx_x is not None and entry["ort_best"] is not None:
            entry["onnx_int8_ge_ort_best"] = onnx_x >= entry["ort_best"]
        comp = compounding(ratios, target)
        if comp is not None:
            entry["compounding"] = {**comp, "goal": COMPOUNDING_GOAL, "met": comp["ratio"] >= COMPOUNDING_GOAL}
        out[target] = entry
    return out


def main() -> None:
    harness.run_with_env(GOMP_SPINCOUNT="20000")   # torch's OpenMP spin-wait cut to ~1 ms (module docstring)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,minilm")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds at batch 1 (fewer at larger batch)")
    parser.add_argument("--rounds-large", type=int, default=None,
                        help="interleaved rounds at batch sizes above 4 (default: --rounds / (batch / 4), at least 3)")
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--targets", default="x86-vnni,x86-avx2",
                        help=f"graphopt int8 targets, one column each ({', '.join(TARGETS)})")
    parser.add_argument("--prune-macs", type=float, default=0.5,
                        help="compounding columns: prune to this share of the MACs (0: leave them out)")
    parser.add_argument("--round-to", type=int, default=ROUND_TO, help="pruned channel counts in multiples of this")
    parser.add_argument("--columns", default="all",
                        help="comma-separated subset of columns to time (ORT fp32 is always timed)")
    parser.add_argument("--out", default="bench-results/quant.json")
    args = parser.parse_args()
    targets = args.targets.split(",")
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets {sorted(unknown)}; targets: {', '.join(TARGETS)}")
    all_columns = columns(targets, bool(args.prune_macs))
    wanted = set(all_columns) if args.columns == "all" else {"ORT fp32", *args.columns.split(",")}
    unknown = wanted - set(all_columns)
    if unknown:
        raise SystemExit(f"unknown columns {sorted(unknown)}; columns: {', '.join(all_columns)}")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    results = {"threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
               "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"), "targets": targets,
               "prune_macs": args.prune_macs, "round_to": args.round_to,
               "torch": torch.__version__, "onnxruntime": ort.__version__,
               "machine": platform.machine(), "cpus": os.cpu_count(), "models": {}}
    int8_headers = [c for c in all_columns if c in BASE_COLUMNS[:1] + BASE_COLUMNS[2:]
                    or any(c.startswith(INT8_FORMS[f]) for f in ("TorchScript", "ONNX"))]
    rows, comp_rows, goal_rows, size_rows = [], [], [], []
    for model_name in args.models.split(","):
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            if model_name == "minilm":
                runners, sizes, info, make_inputs = build_minilm(folder, args.threads, args.calib_batches, targets)
            else:
                runners, sizes, info = build(model_name, folder, args.threads, args.calib_batches, targets,
                                             args.prune_macs, args.round_to)
                make_inputs = _image
            entry = {"sizes": sizes, "export": info, "build_s": time.perf_counter() - started, "batches": {}}
            runners = {c: r for c, r in runners.items() if c in wanted}
            for batch in (int(b) for b in args.batches.split(",")):
                rounds = args.rounds if batch <= 4 else (args.rounds_large or max(3, args.rounds // (batch // 4)))
                # each timed run right after an untimed one of the same column (module docstring)
                ms = harness.latency(runners, make_inputs(batch), rounds, warmup=1, hot=1)
                base = ms["ORT fp32"]
                ratios = {c: base / v for c, v in ms.items()}
                entry["batches"][batch] = {"median_ms": ms, "speedup_over_ort_fp32": ratios, "rounds": rounds,
                                           "goals": goals(ratios, targets)}
                rows.append([model_name, batch] + [_x(ratios.get(c)) if c not in info.get("refused", {})
                                                   else "refused" for c in int8_headers] + [f"{base:.1f}"])
                for target, g in entry["batches"][batch]["goals"].items():
                    comp = g.get("compounding")
                    if args.prune_macs and model_name != "minilm":
                        comp_rows.append([model_name, batch, target, _x(ratios.get(GRAPHOPT_FP32)),
                                          _x(ratios.get(PRUNED_FP32)), _x(g["graphopt_onnx_int8"]),
                                          _x(ratios.get(int8_column("pruned", target))),
                                          _x(comp and comp["product"]), f"{comp['ratio']:.2f}" if comp else "-",
                                          f"{comp['ratio_same_export']:.2f}" if comp and "ratio_same_export" in comp
                                          else "-"])
                    goal_rows.append([model_name, batch, target, _x(g["graphopt_onnx_int8"]), _x(g["ort_best"]),
                                      _x(g["ort_reduce_range"]),
                                      {True: "yes", False: "no"}.get(g.get("onnx_int8_ge_ort_best"), "-"),
                                      {True: "yes", False: "no"}.get(comp and comp["met"], "-")])
                print(f"{model_name} batch {batch}: timed in {rounds} rounds", flush=True)
            goal = SPEEDUP_GOALS.get(model_name)
            if goal:
                first = entry["batches"][int(args.batches.split(",")[0])]["speedup_over_ort_fp32"]
                entry["speedup_goal"] = {"speedup": goal, "met": {t: first[int8_column("ONNX", t)] >= goal
                                                                  for t in targets if int8_column("ONNX", t) in first}}
            entry["onnx_int8_size_share"] = {t: sizes[int8_column("ONNX", t)] / sizes["ORT fp32"]
                                             for t in targets if int8_column("ONNX", t) in sizes}
            size_rows.append([model_name] + [f"{sizes[c] / 1e6:.1f}" if c in sizes else "-" for c in all_columns
                                             if c not in ("eager fp32",)])
            results["models"][model_name] = entry
            for column, details in info.get("exports", {}).items():
                print(f"{model_name}: {column}: " + (f"form={details['form']}, " if "form" in details else "")
                      + f"int8 MAC share {details.get('int8_mac_share', float('nan')):.1%}, "
                      f"layerwise within one step {details.get('within_one_step', float('nan')):.4%}", flush=True)
            if "pruned" in info:
                print(f"{model_name}: pruned to {info['pruned']['macs_kept']:.3f} of the MACs "
                      f"(round_to {info['pruned']['round_to']})", flush=True)
            print(f"{model_name}: built in {entry['build_s']:.0f} s, done in {time.perf_counter() - started:.0f} s",
                  flush=True)
    print(f"\nspeed-up over onnxruntime fp32 (median, interleaved, {args.threads} threads; higher is faster)\n")
    print(table(["model", "batch"] + int8_headers + ["ORT fp32 ms"], rows))
    if comp_rows:
        print(f"\ncompounding: pruned to {args.prune_macs:g} of the MACs, int8; ratio = pruned+int8 / "
              f"(pruned fp32 x int8), goal >= {COMPOUNDING_GOAL}\n")
        print(table(["model", "batch", "target", GRAPHOPT_FP32, PRUNED_FP32, "int8 ONNX", "pruned+int8 ONNX",
                     "product", "ratio", "ratio, same export"], comp_rows))
    print("\ngoals: graphopt ONNX int8 >= onnxruntime's best recipe; compounding ratio >= "
          f"{COMPOUNDING_GOAL}\n")
    print(table(["model", "batch", "target", "graphopt ONNX int8", ORT_BEST, ORT_REDUCED, ">= ORT best",
                 "compounds"], goal_rows))
    print("\nfile sizes (MB)\n")
    print(table(["model"] + [c for c in all_columns if c != "eager fp32"], size_rows))
    harness.write_results(args.out, results, markdown)
    print(f"wrote {args.out}")


def markdown(results: dict) -> str:
    """Speed-up over onnxruntime fp32 per model, batch and column; with pruning, how pruning and
    int8 compound per target; file sizes."""
    targets, out = results["targets"], []
    timed = [c for c in columns(targets, bool(results["prune_macs"]))
             if c != "ORT fp32" and any(c in b["speedup_over_ort_fp32"] for m in results["models"].values()
                                        for b in m["batches"].values())]
    rows, comp_rows = [], []
    for name, entry in results["models"].items():
        refused = entry["export"].get("refused", {})
        for batch, b in entry["batches"].items():
            ratios = b["speedup_over_ort_fp32"]
            rows.append([harness.model_name(name), batch] + ["refused" if c in refused else _x(ratios.get(c))
                                                             for c in timed] + [f"{b['median_ms']['ORT fp32']:.1f}"])
            comp = {t: b["goals"][t].get("compounding") for t in targets}
            if results["prune_macs"] and name != "minilm":
                comp_rows.append([harness.model_name(name), batch, _x(ratios.get(ORT_BEST)), _x(ratios.get(ORT_REDUCED)),
                                  " / ".join(_x(ratios.get(int8_column("ONNX", t))) for t in targets),
                                  _x(ratios.get(PRUNED_FP32)),
                                  " / ".join(_x(ratios.get(int8_column("pruned", t))) for t in targets),
                                  " / ".join(f"{comp[t]['ratio']:.2f}" if comp[t] else "-" for t in targets)])
    out.append(f"Speed-up over onnxruntime fp32 ({results['threads']} threads, interleaved medians; higher is "
               "faster):\n\n" + markdown_table(["model", "batch", *timed, "ORT fp32 ms"], rows))
    if comp_rows:
        ts = " / ".join(f"`{t}`" for t in targets)
        out.append(f"Pruned to {results['prune_macs']:g} of the MACs (round_to {results['round_to']}) and int8; "
                   "compounding = pruned + int8 / (pruned fp32 x int8), 1.0 where the two speed-ups multiply:\n\n"
                   + markdown_table(["model", "batch", "ORT best", "ORT best + `reduce_range`", f"graphopt int8 {ts}",
                                     "pruned fp32", f"pruned + int8 {ts}", f"compounding {ts}"], comp_rows))
    sized = [c for c in columns(targets, bool(results["prune_macs"])) if c != "eager fp32"
             and any(c in m["sizes"] for m in results["models"].values())]
    out.append("File sizes (MB):\n\n" + markdown_table(
        ["model", *sized], [[harness.model_name(name)] + [f"{m['sizes'][c] / 1e6:.1f}" if c in m["sizes"] else "-"
                                                          for c in sized] for name, m in results["models"].items()]))
    return "\n\n".join(out)


if __name__ == "__main__":
    main()
