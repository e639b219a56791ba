"""Do int8 ONNX artifacts compute on an AVX2-only CPU what they compute on a VNNI one?

    python -m benchmarks.ort_recipe_avx2_check [--models resnet18,mobilenet_v2] [--samples 4]
                                                   [--targets x86-vnni,x86-avx2] [--plain] [--fp32]
                                                   [--emulator benchmarks/run_avx2.sh]
                                                   [--out bench-results/avx2_check.json]

Per model (random weights, as bench_quant), the int8 artifacts bench_quant times are built here:
onnxruntime's ``quantize_static`` after ``quant_pre_process`` (QOperator U8S8 per-channel: its
best recipe), the same with ``reduce_range=True``, and graphopt's ONNX int8 per target
(``insert_qdq(target=...)``); ``--plain`` adds ``quantize_static`` called plainly (QDQ), whose
float work makes it ~40x slower than the others under emulation, ``--fp32`` the fp32 model.
The same batch-1 inputs then run through each file twice, in one small onnxruntime-only child
process (this file run as a script: no torch, no graphopt): natively, on this CPU's exact int32
kernels (AVX-512 VNNI), and under ``--emulator`` (QEMU with an AVX2-only CPU; onnxruntime takes
its AVX2 u8 x s8 kernels, which add product pairs in a saturating int16). The emulated outputs
are compared with the native ones:

- rule: an output element agrees when |emulated - native| <= 1.001 x the output's quantization
  step, the scale of the DequantizeLinear that produces the graph output (every artifact here
  ends in one); an output with no such scale is float, and agrees within 1e-3 x max |native|;
- an artifact passes when >= 99% of its output elements agree (the share graphopt's own export
  check demands, layer by layer, against its simulated-int8 graph).

fp32 is a control: only float rounding differs between the two kernel sets.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

EMULATOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_avx2.sh")   # needs Debian's qemu-user
PASS_SHARE = 0.99
STEP_SLACK = 1.001          # as graphopt.backends._int8_checks.within_one_step
FLOAT_RELATIVE = 1e-3       # float outputs: agree within this x max |reference|
RULE = (f"an output element agrees when |emulated - native| <= {STEP_SLACK} x the output's quantization step "
        f"(scale of the DequantizeLinear producing the graph output), or <= {FLOAT_RELATIVE:g} x max |native| for "
        f"a float output; an artifact passes when >= {PASS_SHARE:.0%} of its output elements agree")


def output_steps(model) -> list[float | None]:
    """Per graph output of an onnx ModelProto, the scale of the DequantizeLinear that produces it
    (a scalar), else None (a float output)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    producers = {o: n for n in model.graph.node for o in n.output}
    steps = []
    for out in model.graph.output:
        node, step = producers.get(out.name), None
        if node is not None and node.op_type == "DequantizeLinear":
            scale = node.input[1]
            if scale in inits:
                value = numpy_helper.to_array(inits[scale])
            elif scale in consts:
                value = numpy_helper.to_array(consts[scale].attribute[0].t)
            else:
                value = None
            if value is not None and value.size == 1:
                step = float(value.reshape(()))
        steps.append(step)
    return steps


def agreement(reference: list[np.ndarray], other: list[np.ndarray], steps: list[float | None]) -> dict:
    """How far ``other`` is from ``reference``, output by output (lists of arrays, one per graph
    output, samples stacked on axis 0), by the module docstring's rule: the share of elements
    that agree, the largest difference (in steps, or relative to max |reference| for a float
    output), and top-1 agreement along the last axis of the first output."""
    within = total = 0
    worst_steps = worst_rel = 0.0
    for ref, out, step in zip(reference, other, steps):
        ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
        diff = np.abs(ref - out)
        scale = max(float(np.abs(ref).max()), 1e-12)
        tol = step * STEP_SLACK if step else FLOAT_RELATIVE * scale
        within += int((diff <= tol).sum())
        total += diff.size
        if step:
            worst_steps = max(worst_steps, float(diff.max()) / step)
        worst_rel = max(worst_rel, float(diff.max()) / scale)
    share = within / max(total, 1)
    top1 = float((np.asarray(reference[0]).argmax(-1) == np.asarray(other[0]).argmax(-1)).mean())
    return {"share": share, "passes": share >= PASS_SHARE, "elements": total,
            "max_diff_steps": worst_steps if any(steps) else None, "max_diff_rel": worst_rel,
            "top1_agreement": top1, "rule": "step" if all(steps) else ("float" if not any(steps) else "mixed")}


# ---- the child: onnxruntime and numpy only (cheap to start under emulation) ----

def child(folder: str, tag: str, threads: int) -> None:
    """Run every model of ``folder``/manifest.json on ``folder``/inputs.npz; write
    ``folder``/out.``tag``.<name>.npz (outputs stacked over samples) and timings."""
    import onnxruntime as ort

    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    inputs = np.load(os.path.join(folder, "inputs.npz"))["x"]
    seconds = {}
    for name, path in manifest.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed_name = session.get_inputs()[0].name
        started = time.perf_counter()
        outs = [session.run(None, {feed_name: x[None]}) for x in inputs]
        seconds[name] = time.perf_counter() - started
        np.savez(os.path.join(folder, f"out.{tag}.{name}.npz"),
                 **{f"o{i}": np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))})
        print(f"[{tag}] {name}: {seconds[name]:.1f} s", flush=True)
    with open(os.path.join(folder, f"seconds.{tag}.json"), "w") as f:
        json.dump(seconds, f)


def _run_child(folder: str, tag: str, threads: int, emulator: str | None) -> float:
    command = [sys.executable, os.path.abspath(__file__), "--child", folder, "--tag", tag, "--threads", str(threads)]
    started = time.perf_counter()
    env = {**os.environ, "PYTHONNOUSERSITE": "1"}
    subprocess.run(([emulator] if emulator else []) + command, check=True, env=env)
    return time.perf_counter() - started


def _load(folder: str, tag: str, name: str) -> list[np.ndarray]:
    data = np.load(os.path.join(folder, f"out.{tag}.{name}.npz"))
    return [data[f"o{i}"] for i in range(len(data.files))]


# ---- the parent: builds the artifacts (torch, graphopt) and compares ----

def build_artifacts(model_name: str, folder: str, targets: list[str], threads: int, calib_batches: int,
                    plain: bool, fp32: bool) -> tuple[dict[str, str], dict]:
    """The int8 artifacts of bench_quant for one model: {name: path}, and graphopt's export reports."""
    import torch
    import torchvision

    import graphopt
    from graphopt import PassManager
    from graphopt.backends import onnx_int8
    from graphopt.passes import FoldBatchNorm, RemoveIdentity
    from benchmarks import bench_quant as bq

    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    batches = [torch.randn(8, 3, 224, 224) for _ in range(calib_batches)]
    fp32_path = os.path.join(folder, "fp32.onnx")
    bq.fp32_onnx(model, x, fp32_path)
    paths = {"ORT fp32": fp32_path} if fp32 else {}
    if plain:
        paths["ORT quantize_static plain"] = bq.ort_quantized(fp32_path, folder, batches, False)
    paths[bq.ORT_BEST] = bq.ort_quantized(fp32_path, folder, batches, True)
    paths[bq.ORT_REDUCED] = bq.ort_quantized(fp32_path, folder, batches, True, reduce_range=True)
    folded = PassManager([FoldBatchNorm(), RemoveIdentity()]).run(graphopt.trace(model, x)).graph
    reports = {}
    for target in targets:
        column = bq.int8_column("ONNX", target)
        path = os.path.join(folder, f"graphopt.{target}.int8.onnx")
        report = onnx_int8.export(bq.graphopt_int8(folded, batches, target), path, threads=threads)
        paths[column] = path
        reports[column] = {k: report.details[k] for k in ("target", "form", "check", "within_one_step",
                                                          "outputs_within_one_step")}
    return paths, reports


def check_model(model_name: str, targets: list[str], samples: int, threads: int, calib_batches: int,
                emulator: str, plain: bool, fp32: bool) -> dict:
    import onnx

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        paths, reports = build_artifacts(model_name, folder, targets, threads, calib_batches, plain, fp32)
        built = time.perf_counter() - started
        names = {f"a{i}": column for i, column in enumerate(paths)}
        with open(os.path.join(folder, "manifest.json"), "w") as f:
            json.dump({key: paths[column] for key, column in names.items()}, f)
        rng = np.random.default_rng(0)
        np.savez(os.path.join(folder, "inputs.npz"), x=rng.standard_normal((samples, 3, 224, 224), np.float32))
        native_s = _run_child(folder, "native", threads, None)
        emulated_s = _run_child(folder, "avx2", threads, emulator)
        rows = {}
        for key, column in names.items():
            steps = output_steps(onnx.load(paths[column]))
            rows[column] = {**agreement(_load(folder, "native", key), _load(folder, "avx2", key), steps),
                            "output_steps": steps}
            if column in reports:
                rows[column]["graphopt_export_check"] = reports[column]
        return {"artifacts": rows, "samples": samples, "build_s": built, "native_s": native_s,
                "emulated_s": emulated_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--samples", type=int, default=4, help="batch-1 inputs run through every artifact")
    parser.add_argument("--targets", default="x86-vnni,x86-avx2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--emulator", default=EMULATOR, help="runs CMD ARGS on an AVX2-only CPU")
    parser.add_argument("--plain", action="store_true", help="also onnxruntime's plain quantize_static (slow emulated)")
    parser.add_argument("--fp32", action="store_true", help="also the fp32 model (a control; slow emulated)")
    parser.add_argument("--out", default="bench-results/avx2_check.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tag", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.tag, args.threads)
        return

    import warnings

    import torch

    from benchmarks import harness
    from graphopt.report import table

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    results = {"rule": RULE, "emulator": args.emulator, "threads": args.threads, "models": {}}
    probe = os.path.join(os.path.dirname(os.path.abspath(args.emulator)), "cpuid_probe")
    if os.path.exists(probe):   # what the emulated CPU reports (the AVX2 harness ships this probe)
        results["emulated_cpuid"] = subprocess.run([args.emulator, probe], capture_output=True, text=True).stdout
        print(f"emulated CPU: {results['emulated_cpuid'].strip()}", flush=True)
    rows = []
    for model_name in args.models.split(","):
        entry = check_model(model_name, args.targets.split(","), args.samples, args.threads, args.calib_batches,
                            args.emulator, args.plain, args.fp32)
        results["models"][model_name] = entry
        print(f"{model_name}: built in {entry['build_s']:.0f} s, native run {entry['native_s']:.0f} s, "
              f"emulated run {entry['emulated_s']:.0f} s", flush=True)
        for column, r in entry["artifacts"].items():
            rows.append([model_name, column, f"{r['share']:.2%}", "yes" if r["passes"] else "no",
                         "-" if r["max_diff_steps"] is None else f"{r['max_diff_steps']:.1f}",
                         f"{r['max_diff_rel']:.2e}", f"{r['top1_agreement']:.0%}", r["rule"]])
    print(f"\nemulated AVX2 vs native (AVX-512 VNNI) onnxruntime outputs, {args.samples} batch-1 inputs; "
          f"pass: >= {PASS_SHARE:.0%} within one output step\n")
    print(table(["model", "artifact", "within one step", "passes", "max diff (steps)", "max diff / max |y|",
                 "top-1 same", "rule"], rows))
    harness.write_results(args.out, results, markdown)
    print(f"wrote {args.out}")


def markdown(results: dict) -> str:
    """Per model and artifact: the share of output elements that agree, emulated AVX2 against native."""
    from benchmarks import harness
    from benchmarks.bench_quant import INT8_FORMS, ORT_BEST, ORT_REDUCED
    from graphopt.report import markdown_table

    names = {"ORT fp32": "fp32 (control)", "ORT quantize_static plain": "ORT `quantize_static` plain",
             ORT_BEST: "ORT best", ORT_REDUCED: "ORT best + `reduce_range`"}
    columns = list(dict.fromkeys(c for m in results["models"].values() for c in m["artifacts"]))

    def header(column: str) -> str:
        prefix = INT8_FORMS["ONNX"] + " ("
        return f"graphopt `{column[len(prefix):-1]}`" if column.startswith(prefix) else names.get(column, column)

    def share(r: dict | None) -> str:
        return "-" if r is None else ("100%" if r["share"] == 1 else f"{r['share']:.2%}")
    return (markdown_table(["model"] + [header(c) for c in columns],
                           [[f"{harness.model_name(name)} ({m['samples']} input{'s' if m['samples'] != 1 else ''})"]
                            + [share(m["artifacts"].get(c)) for c in columns] for name, m in results["models"].items()])
            + f"\n\nRule: {results['rule']}.")


if __name__ == "__main__":
    main()
