"""onnxruntime-only int8 A/B: onnxruntime's best recipe against graphopt's two ONNX int8 forms.

    python -m benchmarks.bench_quant_ab [--models resnet18,resnet50,mobilenet_v2] [--rounds 20]
                                            [--out bench-results/quant_ab.json]

``bench_quant`` times seven runtimes in one loop; on a shared 2-core machine the torch runs between
them move the onnxruntime ratios by tens of percent from run to run. This runs only onnxruntime
sessions (fp32, ``quant_pre_process`` + ``quantize_static`` QOperator U8S8 per-channel, graphopt
QOperator, graphopt QDQ), interleaved, 2 threads, spinning off, and reports speed-ups over fp32.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import torch
import torchvision

import graphopt
from benchmarks import harness
from benchmarks.bench_quant import fp32_onnx, ort_quantized
from graphopt import PassContext, PassManager
from graphopt.backends import onnx_int8
from graphopt.passes import FoldBatchNorm, FoldQDQ, InsertQDQ, RemoveIdentity
from graphopt.report import markdown_table, table

RUNNERS = ("ORT fp32", "ORT best recipe", "graphopt QOperator", "graphopt QDQ")


def runners(name: str, folder: str, threads: int) -> dict:
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    batches = [torch.randn(8, 3, 224, 224) for _ in range(4)]
    fp32 = os.path.join(folder, "fp32.onnx")
    fp32_onnx(model, x, fp32)
    graph = PassManager([FoldBatchNorm(), RemoveIdentity()]).run(graphopt.trace(model, x)).graph
    int8 = PassManager([InsertQDQ(progress=False), FoldQDQ()], verify=False,
                       context=PassContext({"calibration_data": batches})).run(graph).graph
    paths = {"ORT fp32": fp32, "ORT best recipe": ort_quantized(fp32, folder, batches, True)}
    for form in ("qoperator", "qdq"):
        paths[f"graphopt {'QOperator' if form == 'qoperator' else 'QDQ'}"] = path = \
            os.path.join(folder, f"graphopt.{form}.onnx")
        onnx_int8.export(int8, path, form=form, threads=threads)
    return {k: harness.ort_runner(paths[k], threads) for k in RUNNERS}


def main() -> None:
    harness.run_with_env(OMP_WAIT_POLICY="PASSIVE")   # idle torch threads sleep (see bench_quant)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50,mobilenet_v2")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds at batch 1 (8 at batch 16)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench-results/quant_ab.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    rows, results = [], {}
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as folder:
            run = runners(name, folder, args.threads)
            for batch, rounds in ((1, args.rounds), (16, max(3, args.rounds * 2 // 5))):
                ms = harness.latency(run, (torch.randn(batch, 3, 224, 224),), rounds)
                speedup = {k: ms["ORT fp32"] / v for k, v in ms.items()}
                results.setdefault(name, {})[batch] = {"ms": ms, "speedup_over_ort_fp32": speedup}
                rows.append([name, batch, *(f"{speedup[k]:.2f}x" for k in RUNNERS[1:]), f"{ms['ORT fp32']:.1f}"])
    print(f"speed-up over onnxruntime fp32, onnxruntime sessions only, {args.threads} threads, interleaved\n")
    print(table(["model", "batch", *RUNNERS[1:], "ORT fp32 ms"], rows))
    harness.write_results(args.out, {"threads": args.threads, "rounds": args.rounds, "models": results}, markdown)
    print(f"wrote {args.out}")


def markdown(results: dict) -> str:
    """Speed-up over onnxruntime fp32 per model, the batch sizes side by side (``1 / 16``)."""
    rows = []
    for name, batches in results["models"].items():
        rows.append([harness.model_name(name), " / ".join(batches)]
                    + [" / ".join(f"{b['speedup_over_ort_fp32'][k]:.2f}x" for b in batches.values())
                       for k in RUNNERS[1:]])
    return markdown_table(["model", "batch", "ORT `quant_pre_process` + `quantize_static`", "graphopt QOperator",
                           "graphopt QDQ"], rows)


if __name__ == "__main__":
    main()
