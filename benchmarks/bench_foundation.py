"""Foundation benchmark: time per stage for ResNet-50 (import, trace, passes, ONNX, TorchScript).

    python -m benchmarks.bench_foundation [--model resnet50] [--repeats 3] [--out bench-results/foundation.json]

Each stage is repeated and the median printed; torch runs on a fixed thread count.
Target (issue #2): trace + passes, with per-pass verification, <= 15 s on 2 cores; (issue #14)
``import graphopt`` in a fresh interpreter <= 2.5 s, shown beside ``import torch`` alone.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torchvision

import graphopt
from benchmarks import harness
from graphopt.backends import onnx as onnx_backend
from graphopt.backends import torchscript as ts_backend
from graphopt.passes import EliminateDeadCode, FoldBatchNorm, RemoveIdentity
from graphopt.report import markdown_table, table

TARGET_SECONDS = 15.0
IMPORT_TARGET_SECONDS = 2.5   # issue #14


def import_seconds(module: str, threads: int, tries: int = 3) -> float:
    """Wall time of ``python -c "import MODULE"`` in a fresh interpreter (what a user's script or the CLI pays),
    the fastest of ``tries``: other work on the machine only ever adds to it."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    times = []
    for _ in range(tries):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True, env=env)
        times.append(time.perf_counter() - start)
    return min(times)


def one_run(model: torch.nn.Module, x: torch.Tensor, folder: str, threads: int) -> dict[str, float]:
    times = {"import torch": import_seconds("torch", threads), "import graphopt": import_seconds("graphopt", threads)}
    times["graphopt's own import"] = times["import graphopt"] - times["import torch"]
    start = time.perf_counter()
    graph = graphopt.trace(model, x)
    times["trace"] = time.perf_counter() - start
    start = time.perf_counter()
    result = graphopt.PassManager([FoldBatchNorm(), RemoveIdentity(), EliminateDeadCode()]).run(graph)
    times["passes (verified)"] = time.perf_counter() - start
    times["trace + passes"] = times["trace"] + times["passes (verified)"]
    start = time.perf_counter()
    onnx_backend.export(result.graph, os.path.join(folder, "m.onnx"))
    times["onnx export (+simplify, ort check)"] = time.perf_counter() - start
    start = time.perf_counter()
    ts_backend.export(result.graph, os.path.join(folder, "m.pt"))
    times["torchscript export (+reload check)"] = time.perf_counter() - start
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench-results/foundation.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            runs.append(one_run(model, x, folder, args.threads))
    medians = {stage: statistics.median(r[stage] for r in runs) for stage in runs[0]}
    print(f"{args.model}, batch 1, {args.threads} threads, median of {args.repeats} runs\n")
    print(table(["stage", "median s", "min s", "max s"],
                [(s, f"{m:.3f}", f"{min(r[s] for r in runs):.3f}", f"{max(r[s] for r in runs):.3f}")
                 for s, m in medians.items()]))
    ok = medians["trace + passes"] <= TARGET_SECONDS
    print(f"\ntrace + passes {medians['trace + passes']:.2f} s: {'meets' if ok else 'MISSES'} the "
          f"{TARGET_SECONDS:.0f} s target")
    import_ok = medians["import graphopt"] <= IMPORT_TARGET_SECONDS
    print(f"import graphopt {medians['import graphopt']:.2f} s (torch alone {medians['import torch']:.2f} s): "
          f"{'meets' if import_ok else 'MISSES'} the {IMPORT_TARGET_SECONDS:g} s target")
    harness.write_results(args.out, {"model": args.model, "threads": args.threads, "repeats": args.repeats,
                                     "torch": torch.__version__, "machine": platform.machine(),
                                     "cpus": os.cpu_count(), "median_seconds": medians, "runs": runs,
                                     "target_seconds": TARGET_SECONDS, "meets_target": ok,
                                     "import_target_seconds": IMPORT_TARGET_SECONDS,
                                     "meets_import_target": import_ok}, markdown)
    print(f"wrote {args.out}")


STAGES = {"import torch": "import torch (fresh interpreter)",
          "import graphopt": "import graphopt (fresh interpreter; target ≤ {import_target:g} s)",
          "graphopt's own import": "graphopt's own share of its import (graphopt - torch)",
          "trace": "trace", "passes (verified)": "passes (BN fold, identity removal, DCE, each verified)",
          "trace + passes": "trace + passes (target ≤ {target:g} s)",
          "onnx export (+simplify, ort check)": "ONNX export + simplify + onnxruntime check",
          "torchscript export (+reload check)": "TorchScript export + reload check"}


def markdown(results: dict) -> str:
    """Median seconds per stage."""
    return markdown_table(["stage", "median s"],
                          [(STAGES.get(stage, stage).format(target=results["target_seconds"],
                                                              import_target=results.get("import_target_seconds", 0)),
                             f"{seconds:.2f}")
                           for stage, seconds in results["median_seconds"].items()])


if __name__ == "__main__":
    main()
