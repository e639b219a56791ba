"""onnxruntime-only int8 A/B: onnxruntime's best recipe against graphopt's two ONNX int8 forms.

    python -m graphopt.tools.bench_quant_ab [--models resnet18,resnet50,mobilenet_v2] [--rounds 20]
                                            [--out bench-results/quant_ab.json]

``bench_quant`` times seven runtimes in one loop; on a shared 2-core machine the torch runs between
them move the onnxruntime ratios by tens of percent from run to run. This runs only onnxruntime
sessions (fp32, ``quant_pre_process`` + ``quantize_static`` QOperator U8S8 per-channel, graphopt
QOperator, graphopt QDQ), interleaved, 2 threads, spinning off, and reports speed-ups over fp32.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads sleep (see bench_quant)

import argparse  # noqa: E402
import tempfile
import warnings

import torch
import torchvision

import graphopt
from graphopt import PassContext, PassManager
from graphopt.backends import onnx_int8
from graphopt.app.latency import interleaved_latency
from graphopt.passes import FoldBatchNorm, FoldQDQ, InsertQDQ, RemoveIdentity
from graphopt.report import table, write_json
from graphopt.tools.bench_quant import fp32_onnx, ort_quantized, ort_runner

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
    return {k: ort_runner(paths[k], threads) for k in RUNNERS}


def main() -> None:
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
                x = torch.randn(batch, 3, 224, 224)
                times = interleaved_latency({k: (lambda f=f: f(x)) for k, f in run.items()}, rounds=rounds)
                speedup = {k: times["ORT fp32"] / v for k, v in times.items()}
                results.setdefault(name, {})[batch] = {"ms": {k: 1e3 * v for k, v in times.items()},
                                                       "speedup_over_ort_fp32": speedup}
                rows.append([name, batch, *(f"{speedup[k]:.2f}x" for k in RUNNERS[1:]),
                             f"{1e3 * times['ORT fp32']:.1f}"])
    print(f"speed-up over onnxruntime fp32, onnxruntime sessions only, {args.threads} threads, interleaved\n")
    print(table(["model", "batch", *RUNNERS[1:], "ORT fp32 ms"], rows))
    write_json(args.out, {"threads": args.threads, "rounds": args.rounds, "models": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
