"""Training-aware compression next to post-training compression, same models, same data, one run
(issue #19): int8 PTQ vs PTQ + AdaRound vs PTQ + QAT, 4-bit weights by round-to-nearest vs
AdaRound vs weight-only QAT (Fashion-MNIST CNN, committed weights; and MobileNetV2 with its
ImageNet weights, read by the Fashion-MNIST linear probe of benchmarks.quant_accuracy), and
structured pruning to half the MACs with the same training budget spent as distillation after
pruning vs penalised training before it (sparsify_channels) (the Fashion-MNIST residual CNN of
bench_prune).

    python -m benchmarks.bench_training [--out bench-results/training.json] [--skip-pruning]
                                        [--skip-mobilenet]

One thread (the rows' seconds are comparable with each other, not with other benchmarks).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn as nn

import graphopt
from benchmarks import harness
from graphopt import PassContext, PassManager
from graphopt.app.evaluate import top1_accuracy
from graphopt.passes import (QAT, AdaRound, Distill, FoldBatchNorm, FoldQDQ, InsertQDQ, PruneChannels,
                             QuantizeWeights, RemoveIdentity, SparsifyChannels)
from graphopt.report import markdown_table, table
from graphopt.tools import fashion_cnn, fashion_mnist


def _acc(graph) -> float:
    return top1_accuracy(graph, fashion_mnist.test_batches())


def _train_data():
    return fashion_mnist.batches("train", 128, shuffle=True)


def quantization_rows() -> list[dict]:
    model = fashion_cnn.trained_fashion_cnn()
    graph = graphopt.trace(model, next(fashion_cnn.calibration_batches())[0][:4])
    folded = PassManager([FoldBatchNorm()]).run(graph).graph
    fp32 = _acc(folded)
    calib = PassContext({"calibration_data": fashion_cnn.calibration_batches, "train_data": _train_data,
                         "teacher": folded})
    rows = [{"model": "Fashion CNN", "variant": "fp32", "top1": fp32}]
    ptq = PassManager([InsertQDQ(progress=False)], context=calib).run(folded).graph
    variants = {
        "int8 PTQ": [],
        "int8 PTQ + AdaRound": [AdaRound(progress=False)],
        "int8 PTQ + QAT (0.5 epoch)": [QAT(epochs=0.5, progress=False)],
    }
    for name, steps in variants.items():
        torch.manual_seed(0)
        start = time.perf_counter()
        out = PassManager(steps + [FoldQDQ()], context=calib).run(ptq).graph
        rows.append({"model": "Fashion CNN", "variant": name, "top1": _acc(out),
                     "seconds": round(time.perf_counter() - start, 1)})
    weight_variants = [("fp32 + distillation (0.5 epoch, lr 1e-3), no quantization",
                        [Distill(epochs=0.5, lr=1e-3, progress=False)])]
    for bits in (4, 2):
        weight_variants += [(f"int{bits} weights, nearest", [QuantizeWeights(bits=bits)]),
                            (f"int{bits} weights, AdaRound", [AdaRound(bits=bits, progress=False),
                                                              QuantizeWeights(bits=bits)]),
                            (f"int{bits} weights, QAT (0.5 epoch, lr 1e-3)",
                             [QAT(bits=bits, epochs=0.5, lr=1e-3, progress=False), QuantizeWeights(bits=bits)])]
    for name, steps in weight_variants:
        torch.manual_seed(0)
        start = time.perf_counter()
        out = PassManager(steps, context=calib).run(folded).graph
        rows.append({"model": "Fashion CNN", "variant": name, "top1": _acc(out),
                     "seconds": round(time.perf_counter() - start, 1)})
    for row in rows:
        row["vs fp32 (points)"] = round(100 * (row["top1"] - fp32), 2)
    return rows


def pruning_rows(epochs: int = 3, budget: float = 1.0) -> list[dict]:
    from benchmarks.bench_prune import trained_residual_cnn

    model = trained_residual_cnn(epochs)
    dense = graphopt.trace(model, torch.randn(1, 1, 28, 28))
    base = _acc(dense)
    ctx = PassContext({"train_data": _train_data})
    rows = [{"model": "residual CNN", "variant": "dense", "top1": base}]
    # BatchNorm stays through the training (as in bench_prune accuracy: distilling the folded net at
    # lr 3e-3 loses 9 points) and is folded after it
    recipes = {
        f"prune 50% MACs (taylor, global) + distill {budget:g} epoch": [
            PruneChannels(target_macs=0.5, importance="taylor", scope="global"),
            Distill(epochs=budget, lr=3e-3, progress=False), FoldBatchNorm()],
        f"sparsify {budget / 2:g} epoch + prune + distill {budget / 2:g} epoch": [
            SparsifyChannels(target_macs=0.5, epochs=budget / 2, lr=3e-3, progress=False),
            PruneChannels(target_macs=0.5), Distill(epochs=budget / 2, lr=3e-3, progress=False), FoldBatchNorm()],
        f"sparsify {budget:g} epoch + prune": [SparsifyChannels(target_macs=0.5, epochs=budget, lr=3e-3,
                                                                progress=False), FoldBatchNorm(),
                                               PruneChannels(target_macs=0.5)],
    }
    for name, steps in recipes.items():
        torch.manual_seed(0)
        start = time.perf_counter()
        result = PassManager(steps, context=ctx).run(dense)
        rows.append({"model": "residual CNN", "variant": name, "top1": _acc(result.graph),
                     "macs_kept": round(result.records[-1].macs / result.records[0].macs, 3),
                     "seconds": round(time.perf_counter() - start, 1)})
    for row in rows:
        row["vs fp32 (points)"] = round(100 * (row["top1"] - base), 2)
    return rows


MOBILENET_TARGET = "x86-vnni"   # full-range int8 weights: the row does not depend on this CPU's "auto"


def mobilenet_rows(qat_images: int = 4096, qat_epochs: float = 1.0, qat_lr: float = 1e-4) -> list[dict]:
    """MobileNetV2 (ImageNet weights) as a Fashion-MNIST feature extractor (benchmarks.quant_accuracy's
    probe: logistic regression fitted on fp32 features of 5 000 training images at 64 px, scored
    on 2 000 test images): every layer int8 by PTQ, after QAT (``qat_epochs`` over ``qat_images``
    other unlabelled training images, distilling the fp32 features: MSE), and 4-bit weights by
    round-to-nearest, AdaRound and weight-only QAT."""
    from sklearn.linear_model import LogisticRegression

    from benchmarks.quant_accuracy import fashion_rgb, mobilenet_v2

    model = mobilenet_v2()
    backbone = nn.Sequential(model.features, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    train_x, test_x = fashion_rgb("train", 5000), fashion_rgb("test", 2000)
    train_y = fashion_mnist.load("train")[1][:5000].numpy()
    test_y = fashion_mnist.load("test")[1][:2000].numpy()
    calibration = list(fashion_rgb("train", 256, offset=10000).split(32))
    qat_data = list(fashion_rgb("train", qat_images, offset=20000).split(32))

    def features(graph, x):
        with torch.no_grad():
            return torch.cat([graph.run(part) for part in x.split(250)]).numpy()

    graph = graphopt.trace(backbone, train_x[:2])
    folded = PassManager([FoldBatchNorm(), RemoveIdentity()]).run(graph).graph
    probe = LogisticRegression(max_iter=2000, C=1.0).fit(features(folded, train_x), train_y)
    fp32 = float(probe.score(features(folded, test_x), test_y))
    ctx = PassContext({"calibration_data": lambda: calibration, "train_data": lambda: qat_data, "teacher": folded})
    name = "MobileNetV2 (probe)"
    rows = [{"model": name, "variant": "fp32", "top1": fp32}]
    start = time.perf_counter()
    ptq = PassManager([InsertQDQ(progress=False, bound=1.0, target=MOBILENET_TARGET)], context=ctx).run(folded).graph
    calibrate = time.perf_counter() - start
    qat = f"QAT ({qat_epochs:g} epoch over {qat_images} images)"
    variants = {
        "int8 PTQ, every layer": (ptq, []),
        f"int8 PTQ + {qat}": (ptq, [QAT(epochs=qat_epochs, lr=qat_lr, loss="mse", progress=False)]),
        # LSQ at lr 1e-4 moves the scales too far (measured: -9.5 points); 1e-5 holds
        f"int8 PTQ + {qat}, LSQ scales, lr 1e-5": (ptq, [QAT(epochs=qat_epochs, lr=1e-5, loss="mse",
                                                             learn_scales=True, progress=False)]),
        "int4 weights, nearest": (folded, [QuantizeWeights(bits=4)]),
        "int4 weights, AdaRound": (folded, [AdaRound(bits=4, progress=False), QuantizeWeights(bits=4)]),
        f"int4 weights, {qat}": (folded, [QAT(bits=4, epochs=qat_epochs, lr=qat_lr, loss="mse", progress=False),
                                           QuantizeWeights(bits=4)]),
    }
    for variant, (source, steps) in variants.items():
        torch.manual_seed(0)
        begin = time.perf_counter()
        if source is ptq:
            steps = steps + [FoldQDQ()]
        out = PassManager(steps, context=ctx).run(source).graph if steps else source
        seconds = time.perf_counter() - begin + (calibrate if source is ptq else 0.0)
        rows.append({"model": name, "variant": variant, "top1": float(probe.score(features(out, test_x), test_y)),
                     "seconds": round(seconds, 1)})
        print(f"{variant}: {rows[-1]['top1']:.4f} ({seconds:.0f} s)", flush=True)
    for row in rows:
        row["vs fp32 (points)"] = round(100 * (row["top1"] - fp32), 2)
    return rows


COLUMNS = ["model", "variant", "top1", "vs fp32 (points)", "macs_kept", "seconds"]


def _cells(row: dict) -> list:
    return [f"{100 * row['top1']:.2f}%" if c == "top1" else f"{row[c]:+.2f}" if c == "vs fp32 (points)"
            else row.get(c, "-") for c in COLUMNS]


def markdown(results: dict) -> str:
    """One table per model: top-1 (the probe's for MobileNetV2), its change against fp32 (the dense
    model for pruning) in points, the share of MACs kept, and the seconds the compression took."""
    parts = []
    for model in dict.fromkeys(r["model"] for r in results["rows"]):
        rows = [_cells(r)[1:] for r in results["rows"] if r["model"] == model]
        parts.append(f"{model}:\n\n" + markdown_table(["variant", "top-1", "vs fp32 (points)", "MACs kept",
                                                         "seconds"], rows))
    return "\n\n".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(harness.RESULTS, "training.json"))
    parser.add_argument("--skip-pruning", action="store_true")
    parser.add_argument("--skip-mobilenet", action="store_true")
    args = parser.parse_args(argv)
    harness.run_with_env(OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if not fashion_mnist.available():
        raise SystemExit("needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    rows = quantization_rows()
    if not args.skip_mobilenet:
        rows += mobilenet_rows()
    if not args.skip_pruning:
        rows += pruning_rows()
    print(table(COLUMNS, [_cells(r) for r in rows]))
    harness.write_results(args.out, {"rows": rows, "threads": torch.get_num_threads()}, markdown)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
