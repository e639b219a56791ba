"""A small CNN trained on Fashion-MNIST: the real-data accuracy check for int8 PTQ.

    python -m graphopt.tools.fashion_cnn train     # 2 epochs, writes tools/examples/fashion_cnn.pt
    python -m graphopt.tools.fashion_cnn ptq [observer] [--targets x86-vnni,x86-avx2] [--out FILE.json]
        # fp32 vs int8 (simulated, ONNX, TorchScript) test accuracy, one column per int8 target
        # (graphopt.quant.targets: x86-vnni full-range weights, x86-avx2 7-bit weights, arm64, auto)
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import torch
import torch.nn as nn

from graphopt.tools import fashion_mnist

CHECKPOINT = os.path.join(os.path.dirname(__file__), "examples", "fashion_cnn.pt")


class FashionCNN(nn.Module):
    """conv-bn-relu, pool, conv-bn-relu, pool, conv-bn-relu with a residual add, linear."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
                                   nn.ReLU(), nn.MaxPool2d(2))
        self.conv3 = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(2 * width))
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.stem(x))
        x = self.relu(self.conv3(x) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


def trained_fashion_cnn() -> FashionCNN:
    model = FashionCNN()
    model.load_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    return model.eval()


def train(epochs: int = 2, seed: int = 0) -> FashionCNN:
    torch.manual_seed(seed)
    return fashion_mnist.train_classifier(FashionCNN(), epochs, lr=2e-3)


def calibration_batches():
    """1 024 training images (never test images) in batches of 128."""
    return fashion_mnist.batches("train", 128, limit=1024, shuffle=True, seed=123)


def _fp32_graph():
    import graphopt

    return graphopt.trace(trained_fashion_cnn(), next(calibration_batches())[0][:4])  # real images: the
    # contract is checked on the example inputs, which must look like the calibration data


def int8_accuracy(graph, observer: str = "mse", target: str = "auto") -> dict[str, float]:
    """Test accuracy of the simulated-int8 graph and both int8 artifacts, quantized for ``target``."""
    return _int8_run(graph, observer, target)[0]


def _int8_run(graph, observer: str, target: str) -> tuple[dict[str, float], dict]:
    """``int8_accuracy`` and insert_qdq's stats."""
    from graphopt import PassContext, PassManager
    from graphopt.backends import onnx_int8, torchscript_int8
    from graphopt.app.evaluate import top1_accuracy
    from graphopt.passes import FoldBatchNorm, FoldQDQ, InsertQDQ

    result = PassManager([FoldBatchNorm(), InsertQDQ(observer=observer, progress=False, target=target), FoldQDQ()],
                         context=PassContext({"calibration_data": calibration_batches})).run(graph)
    int8 = result.graph
    accuracy = {"int8 simulated": top1_accuracy(int8, fashion_mnist.test_batches())}
    with tempfile.TemporaryDirectory() as folder:
        onnx = onnx_int8.export(int8, os.path.join(folder, "m.onnx"))
        ts = torchscript_int8.export(int8, os.path.join(folder, "m.pt"))
        accuracy["int8 ONNX (onnxruntime)"] = top1_accuracy(onnx.runner, fashion_mnist.test_batches())
        accuracy["int8 TorchScript"] = top1_accuracy(torch.jit.load(ts.path), fashion_mnist.test_batches())
    return accuracy, next(r.stats for r in result.records if r.name == "insert_qdq")


def ptq_report(observer: str = "mse", target: str = "auto") -> dict[str, float]:
    """Test accuracy of fp32, the simulated-int8 graph and both int8 artifacts (one target)."""
    from graphopt.app.evaluate import top1_accuracy

    graph = _fp32_graph()
    return {"fp32": top1_accuracy(graph, fashion_mnist.test_batches()), **int8_accuracy(graph, observer, target)}


def ptq_targets_report(observer: str = "mse", targets=("x86-vnni", "x86-avx2")) -> dict:
    """fp32 test accuracy once; for each target the int8 rows of ``ptq_report`` and the simulated
    graph's SQNR (dB, on one held calibration batch)."""
    from graphopt.app.evaluate import top1_accuracy

    graph = _fp32_graph()
    runs = {target: _int8_run(graph, observer, target) for target in targets}
    return {"fp32": top1_accuracy(graph, fashion_mnist.test_batches()),
            "targets": {target: accuracy for target, (accuracy, _) in runs.items()},
            "sqnr_db": {target: stats["sqnr_db"] for target, (_, stats) in runs.items()}}


def parse_targets(text: str) -> list[str]:
    """``--targets``: comma-separated names of graphopt.quant.targets (or ``auto``), each once."""
    from graphopt.quant.targets import TARGET_NAMES

    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [t for t in names if t not in TARGET_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown target(s) {', '.join(unknown) or '(none)'}; "
                                         f"known: {', '.join(TARGET_NAMES)}")
    return names


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("train", help="train 2 epochs and write tools/examples/fashion_cnn.pt")
    ptq = sub.add_parser("ptq", help="fp32 vs int8 test accuracy, per int8 target")
    ptq.add_argument("observer", nargs="?", default="mse")
    ptq.add_argument("--targets", type=parse_targets, default="x86-vnni,x86-avx2",
                     help="comma-separated int8 targets (default: x86-vnni,x86-avx2)")
    ptq.add_argument("--out", default=None, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    if args.command == "train":
        model = train()
        torch.save(model.state_dict(), CHECKPOINT)
        print(f"wrote {CHECKPOINT}")
        return
    if args.command is None:
        args = parser.parse_args(["ptq", *(argv or [])])
    from graphopt.report import table, write_json
    from graphopt.quant.targets import get_target

    warnings.simplefilter("ignore", FutureWarning)   # torch.jit.load's deprecation notice
    torch.set_num_threads(2)
    report = ptq_targets_report(args.observer, args.targets)
    fp32, per_target = report["fp32"], report["targets"]
    rows = [["fp32", *(f"{100 * fp32:.2f}%" for _ in args.targets)]]
    for row in next(iter(per_target.values())):
        rows.append([row, *(f"{100 * per_target[t][row]:.2f}% ({100 * (per_target[t][row] - fp32):+.2f})"
                            for t in args.targets)])
    headers = ["Fashion-MNIST test accuracy",
               *(f"{t} (weights +-{get_target(t).weight_qmax})" for t in args.targets)]
    print(f"FashionCNN, int8 PTQ ({args.observer} observer); change against fp32 in points in brackets\n")
    print(table(headers, rows))
    print("\nsimulated int8 SQNR vs fp32 (one calibration batch): "
          + ", ".join(f"{t} {report['sqnr_db'][t]:.1f} dB" for t in args.targets))
    if args.out:
        write_json(args.out, {"observer": args.observer, "fp32": fp32,
                              "weight_range": {t: [get_target(t).weight_qmin, get_target(t).weight_qmax]
                                               for t in args.targets},
                              "targets": per_target,
                              "delta_points": {t: {k: round(100 * (v - fp32), 4) for k, v in r.items()}
                                               for t, r in per_target.items()},
                              "sqnr_db": report["sqnr_db"]})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
