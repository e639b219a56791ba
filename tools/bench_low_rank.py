"""Low-rank splitting benchmark: latency at half the MACs, and accuracy on a trained CNN.

    python -m graphopt.tools.bench_low_rank [--models resnet50 vgg16] [--target 0.5] [--repeats 10]
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

import os

# Idle OpenMP threads must sleep, not spin: on a shared machine a spinning torch pool
# stalls behind other processes (and the interleaved onnxruntime runs). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import platform
import tempfile
import time
import warnings

import torch
import torch.nn as nn
import torchvision

import graphopt
from graphopt import PassContext, PassManager
from graphopt.backends import onnx as onnx_backend
from graphopt.app.evaluate import top1_accuracy
from graphopt.app.latency import interleaved_latency
from graphopt.passes import Distill, FoldBatchNorm, SplitLowRank
from graphopt.report import table, write_json
from graphopt.tools import fashion_mnist


def latency(name: str, target: float, repeats: int, threads: int, folder: str) -> dict:
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
        eager = _pair(interleaved_latency({"base": lambda: base.gm(x), "split": lambda: split.gm(x)}, repeats))
    paths = [os.path.join(folder, f"{name}.{tag}.onnx") for tag in ("base", "split")]
    for graph, path in zip((base, split), paths):
        onnx_backend.export(graph, path, tolerance=1e-3)
    sessions = [onnx_backend.ort_session(p, threads) for p in paths]
    ort_times = _pair(interleaved_latency({"base": lambda: onnx_backend.run_onnx(sessions[0], (x,)),
                                           "split": lambda: onnx_backend.run_onnx(sessions[1], (x,))}, repeats))
    row.update({"eager_ms": [1e3 * t for t in eager], "eager_ratio": eager[1] / eager[0],
                "ort_ms": [1e3 * t for t in ort_times], "ort_ratio": ort_times[1] / ort_times[0]})
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


def accuracy(target: float, epochs: int, distill_epochs: float, cache: str) -> dict:
    model = trained_fashion_cnn(epochs, cache)
    graph = PassManager([FoldBatchNorm()]).run(graphopt.trace(model, torch.randn(2, 1, 28, 28))).graph
    split = PassManager([SplitLowRank(target_macs=target)]).run(graph)
    context = PassContext({"train_data": lambda: fashion_mnist.batches("train", 128, shuffle=True),
                           "teacher": graph})   # the unsplit model, not this run's input (the split one)
    distilled = PassManager([Distill(epochs=distill_epochs, lr=1e-3, progress=False)],
                            context=context).run(split.graph)
    test = fashion_mnist.test_batches
    record = split.records[1]
    return {"train_epochs": epochs, "distill_epochs": distill_epochs,
            "macs_ratio": record.macs / split.records[0].macs,
            "params_ratio": record.params / split.records[0].params,
            "layers": {k: {"method": v["method"], "rank": v["rank"], "error": v["error"]}
                       for k, v in record.stats["layers"].items()},
            "top1_fp32": top1_accuracy(graph, test()), "top1_split": top1_accuracy(split.graph, test()),
            "top1_split_distilled": top1_accuracy(distilled.graph, test())}


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
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random weights can drive activations into denormals, as slow as they are rare
    warnings.filterwarnings("ignore", message="The value of the smallest subnormal")  # numpy, after the line above

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            rows.append(latency(name, args.target, args.repeats, args.threads, folder))
    print(f"split_low_rank(target_macs={args.target}), batch 1, {args.threads} threads, "
          f"median of {args.repeats} interleaved runs (random weights)\n")
    print(table(["model", "MACs", "params", "layers split", "eager ms base/split", "eager ratio",
                 "ORT ms base/split", "ORT ratio", "pass s"],
                [(r["model"], f"{r['macs_ratio']:.3f}", f"{r['params_ratio']:.3f}", r["layers_split"],
                  "{:.1f} / {:.1f}".format(*r["eager_ms"]), f"{r['eager_ratio']:.3f}",
                  "{:.1f} / {:.1f}".format(*r["ort_ms"]), f"{r['ort_ratio']:.3f}", f"{r['pass_seconds']:.1f}")
                 for r in rows]))

    fashion = None
    if fashion_mnist.available():
        cache = os.path.join(os.path.dirname(args.out) or ".", f"fashion_cnn_{args.epochs}ep.pt")
        fashion = accuracy(args.target, args.epochs, args.distill_epochs, cache)
        print(f"\nFashion-MNIST CNN ({args.epochs} epochs), split to {fashion['macs_ratio']:.3f} of its MACs "
              f"({fashion['params_ratio']:.3f} of its parameters)\n")
        print(table(["model", "top-1"], [("fp32", f"{fashion['top1_fp32']:.4f}"),
                                          ("split", f"{fashion['top1_split']:.4f}"),
                                          (f"split + distill ({args.distill_epochs:g} epoch)",
                                           f"{fashion['top1_split_distilled']:.4f}")]))
    else:
        print("\nFashion-MNIST not installed (apt-get install -y dataset-fashion-mnist): accuracy skipped")
    write_json(args.out, {"target_macs": args.target, "threads": args.threads, "repeats": args.repeats,
                          "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
                          "latency": rows, "fashion_mnist": fashion})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
