"""Low-rank splitting benchmark: latency at half the MACs, and accuracy on a trained CNN.

    python -m benchmarks.bench_low_rank [--models resnet50 vgg16] [--target 0.5] [--repeats 10]
                                            [--threads 2] [--epochs 3] [--out bench-results/low_rank.json]

1. ResNet-50 and VGG-16 (torchvision, weights=None; BatchNorm folded first) split by
   ``split_low_rank(target_macs=0.5)``: latency of the split graph over the unsplit one,
   in eager torch and in onnxruntime, batch 1, fixed threads, A/B runs interleaved in one
   process, medians.
2. A small CNN trained on Fashion-MNIST (a few epochs, cached under bench-results/) split
   to the same budget: test accuracy as is, and after a short distillation from the
   unsplit model.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings

import torch
import torch.nn as nn
import torchvision

import graphopt
from benchmarks import harness
from graphopt import PassContext, PassManager
from graphopt.passes import Distill, FoldBatchNorm, SplitLowRank
from graphopt.report import markdown_table, table
from graphopt.tools import fashion_mnist


def split_latency(name: str, target: float, repeats: int, threads: int, folder: str) -> dict:
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    base = PassManager([FoldBatchNorm()]).run(graphopt.trace(model, x)).graph
    start = time.perf_counter()
    result = PassManager([SplitLowRank(target_macs=target)], verify=False).run(base)
    pass_seconds = time.perf_counter() - start
    split, record = result.graph, result.records[1]
    row = {"model": name, "macs_ratio": record.macs / result.records[0].macs,
           "params_ratio": record.params / result.records[0].params, "pass_seconds": pass_seconds,
           "layers_split": record.stats["split"],
           "methods": {m: sum(d["method"] == m for d in record.stats["layers"].values())
                       for m in ("svd", "spatial", "tucker2")}}
    with torch.inference_mode():
        eager = _pair(harness.latency({"base": base.gm, "split": split.gm}, (x,), repeats))
    ort = {tag: harness.ort_runner(harness.onnx_file(graph, os.path.join(folder, f"{name}.{tag}.onnx")), threads)
           for tag, graph in (("base", base), ("split", split))}
    ort_times = _pair(harness.latency(ort, (x,), repeats))
    row.update({"eager_ms": list(eager), "eager_ratio": eager[1] / eager[0],
                "ort_ms": list(ort_times), "ort_ratio": ort_times[1] / ort_times[0]})
    return row


def _pair(times: dict[str, float]) -> tuple[float, float]:
    return times["base"], times["split"]


class FashionCNN(nn.Module):
    """Two conv blocks and two Linears: ~4.2 M MACs, ~0.44 M parameters."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def trained_fashion_cnn(epochs: int, cache: str) -> FashionCNN:
    """Train (seed 0) or load the cached checkpoint for this many epochs."""
    torch.manual_seed(0)
    return fashion_mnist.cached_model(cache, FashionCNN, lambda m: fashion_mnist.train_classifier(m, epochs, lr=2e-3))


def split_accuracy(target: float, epochs: int, distill_epochs: float, cache: str) -> dict:
    model = trained_fashion_cnn(epochs, cache)
    graph = PassManager([FoldBatchNorm()]).run(graphopt.trace(model, torch.randn(2, 1, 28, 28))).graph
    split = PassManager([SplitLowRank(target_macs=target)]).run(graph)
    context = PassContext({"train_data": lambda: fashion_mnist.batches("train", 128, shuffle=True),
                           "teacher": graph})   # the unsplit model, not this run's input (the split one)
    distilled = PassManager([Distill(epochs=distill_epochs, lr=1e-3, progress=False)],
                            context=context).run(split.graph)
    record = split.records[1]
    return {"train_epochs": epochs, "distill_epochs": distill_epochs,
            "macs_ratio": record.macs / split.records[0].macs,
            "params_ratio": record.params / split.records[0].params,
            "layers": {k: {"method": v["method"], "rank": v["rank"], "error": v["error"]}
                       for k, v in record.stats["layers"].items()},
            "top1_fp32": harness.accuracy(graph), "top1_split": harness.accuracy(split.graph),
            "top1_split_distilled": harness.accuracy(distilled.graph)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet50", "vgg16"])
    parser.add_argument("--target", type=float, default=0.5, help="share of the original MACs to reach")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="Fashion-MNIST training epochs")
    parser.add_argument("--distill-epochs", type=float, default=1.0)
    parser.add_argument("--out", default="bench-results/low_rank.json")
    args = parser.parse_args()
    # idle OpenMP threads sleep, not spin: on a shared machine a spinning torch pool stalls behind
    # other processes (and the interleaved onnxruntime runs)
    harness.run_with_env(OMP_WAIT_POLICY="PASSIVE")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random weights can drive activations into denormals, as slow as they are rare
    warnings.filterwarnings("ignore", message="The value of the smallest subnormal")  # numpy, after the line above

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            rows.append(split_latency(name, args.target, args.repeats, args.threads, folder))
    print(f"split_low_rank(target_macs={args.target}), batch 1, {args.threads} threads, "
          f"median of {args.repeats} interleaved runs (random weights)\n")
    print(table(*_latency_rows(rows)))

    fashion = None
    if fashion_mnist.available():
        cache = os.path.join(os.path.dirname(args.out) or ".", f"fashion_cnn_{args.epochs}ep.pt")
        fashion = split_accuracy(args.target, args.epochs, args.distill_epochs, cache)
        print(f"\nFashion-MNIST CNN ({args.epochs} epochs), split to {fashion['macs_ratio']:.3f} of its MACs "
              f"({fashion['params_ratio']:.3f} of its parameters)\n")
        print(table(*_accuracy_rows(fashion)))
    else:
        print("\nFashion-MNIST not installed (apt-get install -y dataset-fashion-mnist): accuracy skipped")
    harness.write_results(args.out, {"target_macs": args.target, "threads": args.threads, "repeats": args.repeats,
                                     "torch": torch.__version__, "machine": platform.machine(),
                                     "cpus": os.cpu_count(), "latency": rows, "fashion_mnist": fashion}, markdown)
    print(f"wrote {args.out}")


def _latency_rows(rows: list[dict]) -> tuple[list[str], list[tuple]]:
    return (["model", "MACs", "params", "layers split", "eager ms base/split", "eager ratio", "ORT ms base/split",
             "ORT ratio", "pass s"],
            [(r["model"], f"{r['macs_ratio']:.3f}", f"{r['params_ratio']:.3f}", r["layers_split"],
              "{:.1f} / {:.1f}".format(*r["eager_ms"]), f"{r['eager_ratio']:.3f}",
              "{:.1f} / {:.1f}".format(*r["ort_ms"]), f"{r['ort_ratio']:.3f}", f"{r['pass_seconds']:.1f}")
             for r in rows])


def _accuracy_rows(fashion: dict) -> tuple[list[str], list[tuple]]:
    return (["model", "top-1"], [("fp32", f"{fashion['top1_fp32']:.4f}"), ("split", f"{fashion['top1_split']:.4f}"),
                                 (f"split + distill ({fashion['distill_epochs']:g} epoch)",
                                  f"{fashion['top1_split_distilled']:.4f}")])


def markdown(results: dict) -> str:
    """Split / unsplit latency per model and runtime; the Fashion-MNIST CNN's accuracy, split and distilled."""
    out = [f"`split_low_rank(target_macs={results['target_macs']})`, batch 1, {results['threads']} threads, median of "
           f"{results['repeats']} interleaved runs (random weights; ratio = split / unsplit time):\n\n"
           + markdown_table(*_latency_rows(results["latency"]))]
    fashion = results["fashion_mnist"]
    if fashion:
        out.append(f"Fashion-MNIST CNN ({fashion['train_epochs']} epochs), split to {fashion['macs_ratio']:.3f} of its "
                   f"MACs ({fashion['params_ratio']:.3f} of its parameters):\n\n"
                   + markdown_table(*_accuracy_rows(fashion)))
    return "\n\n".join(out)


if __name__ == "__main__":
    main()
