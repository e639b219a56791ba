"""Training-aware compression next to post-training compression, same models, same data, one run
(issue #19): int8 PTQ vs PTQ + AdaRound vs PTQ + QAT, 4-bit weights by round-to-nearest vs
AdaRound (Fashion-MNIST CNN, committed weights), and structured pruning to half the MACs with the
same training budget spent as distillation after pruning vs penalised training before it
(sparsify_channels) (the Fashion-MNIST residual CNN of bench_prune).

    python -m benchmarks.bench_training [--out bench-results/training.json] [--skip-pruning]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import graphopt
from graphopt import PassContext, PassManager
from graphopt.app.evaluate import top1_accuracy
from graphopt.passes import (QAT, AdaRound, Distill, FoldBatchNorm, FoldQDQ, InsertQDQ, PruneChannels,
                             QuantizeWeights, SparsifyChannels)
from graphopt.report import table
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
        start = time.perf_counter()
        out = PassManager(steps + [FoldQDQ()], context=calib).run(ptq).graph
        rows.append({"model": "Fashion CNN", "variant": name, "top1": _acc(out),
                     "seconds": round(time.perf_counter() - start, 1)})
    for bits in (4, 2):
        for name, steps in ((f"int{bits} weights, nearest", [QuantizeWeights(bits=bits)]),
                            (f"int{bits} weights, AdaRound", [AdaRound(bits=bits, progress=False),
                                                              QuantizeWeights(bits=bits)])):
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
    recipes = {
        f"prune 50% MACs + distill {budget:g} epoch": [FoldBatchNorm(), PruneChannels(target_macs=0.5),
                                                       Distill(epochs=budget, lr=3e-3, progress=False)],
        f"sparsify {budget / 2:g} epoch + prune + distill {budget / 2:g} epoch": [
            SparsifyChannels(target_macs=0.5, epochs=budget / 2, lr=3e-3, progress=False), FoldBatchNorm(),
            PruneChannels(target_macs=0.5), Distill(epochs=budget / 2, lr=3e-3, progress=False)],
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("bench-results", "training.json"))
    parser.add_argument("--skip-pruning", action="store_true")
    args = parser.parse_args(argv)
    if not fashion_mnist.available():
        raise SystemExit("needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    rows = quantization_rows()
    if not args.skip_pruning:
        rows += pruning_rows()
    columns = ["model", "variant", "top1", "vs fp32 (points)", "macs_kept", "seconds"]
    print(table(columns, [[r.get(c, "-") if c != "top1" else f"{r['top1']:.4f}" for c in columns] for r in rows]))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "threads": torch.get_num_threads()}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
