"""Int8 accuracy of the committed Fashion-MNIST CNN per int8 target: fp32 against the simulated-int8
graph and both int8 artifacts, on the 10 000 test images.

    python -m benchmarks.quant_accuracy_fashion [observer] [--targets x86-vnni,x86-avx2]
                                                [--out bench-results/quant_accuracy_fashion.json]

One column per ``--targets`` entry (graphopt.quant.targets: x86-vnni full-range weights, x86-avx2
7-bit weights, arm64, auto); each quantized with fold_batchnorm, insert_qdq (``observer``,
calibrated on 1 024 training images) and fold_qdq, then exported by onnx_int8 (run in
onnxruntime) and torchscript_int8. Also the simulated graph's SQNR against fp32.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import torch

from benchmarks import harness
from graphopt import PassContext, PassManager
from graphopt.backends import onnx_int8, torchscript_int8
from graphopt.passes import FoldBatchNorm, FoldQDQ, InsertQDQ
from graphopt.quant.targets import get_target
from graphopt.report import markdown_table, table
from graphopt.tools.fashion_cnn import calibration_batches, trained_fashion_cnn

ROWS = {"int8 simulated": "simulated", "int8 ONNX (onnxruntime)": "onnxruntime", "int8 TorchScript": "TorchScript"}


def fp32_graph():
    import graphopt

    return graphopt.trace(trained_fashion_cnn(), next(calibration_batches())[0][:4])  # real images: the
    # contract is checked on the example inputs, which must look like the calibration data


def int8_run(graph, observer: str, target: str) -> tuple[dict[str, float], dict]:
    """Test accuracy of the simulated-int8 graph and both int8 artifacts, quantized for
    ``target``; and insert_qdq's stats."""
    result = PassManager([FoldBatchNorm(), InsertQDQ(observer=observer, progress=False, target=target), FoldQDQ()],
                         context=PassContext({"calibration_data": calibration_batches})).run(graph)
    int8 = result.graph
    accuracy = {"int8 simulated": harness.accuracy(int8)}
    with tempfile.TemporaryDirectory() as folder:
        onnx = onnx_int8.export(int8, os.path.join(folder, "m.onnx"))
        ts = torchscript_int8.export(int8, os.path.join(folder, "m.pt"))
        accuracy["int8 ONNX (onnxruntime)"] = harness.accuracy(onnx.runner)
        accuracy["int8 TorchScript"] = harness.accuracy(torch.jit.load(ts.path))
    return accuracy, next(r.stats for r in result.records if r.name == "insert_qdq")


def ptq_targets_report(observer: str = "mse", targets=("x86-vnni", "x86-avx2")) -> dict:
    """fp32 test accuracy once; for each target the int8 accuracies and the simulated graph's SQNR
    (dB, on one held calibration batch)."""
    graph = fp32_graph()
    runs = {target: int8_run(graph, observer, target) for target in targets}
    return {"fp32": harness.accuracy(graph),
            "targets": {target: accuracy for target, (accuracy, _) in runs.items()},
            "sqnr_db": {target: stats["sqnr_db"] for target, (_, stats) in runs.items()}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("observer", nargs="?", default="mse")
    harness.add_targets_option(parser, "one column each")
    parser.add_argument("--out", default="bench-results/quant_accuracy_fashion.json")
    args = parser.parse_args(argv)
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
    harness.write_results(args.out, {"observer": args.observer, "fp32": fp32,
                                     "weight_range": {t: [get_target(t).weight_qmin, get_target(t).weight_qmax]
                                                      for t in args.targets},
                                     "targets": per_target,
                                     "delta_points": {t: {k: round(100 * (v - fp32), 4) for k, v in r.items()}
                                                      for t, r in per_target.items()},
                                     "sqnr_db": report["sqnr_db"]}, markdown)
    print(f"wrote {args.out}")


def markdown(results: dict) -> str:
    """Test accuracy of fp32 and of each int8 form per target (change in points), and the SQNR."""
    fp32, targets = results["fp32"], list(results["targets"])

    def header(t: str) -> str:
        low, high = results["weight_range"][t]
        return f"`{t}` int8" + ("" if high > 64 else " (7-bit weights)" if high == 64 else f" (weights [{low}, {high}])")
    rows = [[ROWS.get(row, row), f"{100 * fp32:.2f}%"]
            + [f"{100 * results['targets'][t][row]:.2f}% ({100 * (results['targets'][t][row] - fp32):+.2f})"
               for t in targets] for row in results["targets"][targets[0]]]
    rows.append(["SQNR of the simulated graph", ""] + [f"{results['sqnr_db'][t]:.1f} dB" for t in targets])
    return markdown_table(["", "fp32", *(header(t) for t in targets)], rows)


if __name__ == "__main__":
    main()
