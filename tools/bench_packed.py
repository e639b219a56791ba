"""Benchmark of the packed format: Deep Compression on Fashion-MNIST, and ResNet-50 load time.

    python -m graphopt.tools.bench_packed [--quick] [--threads 2]

1. A small CNN and a VGG-style net (conv blocks + large fully connected layers) are
   trained on Fashion-MNIST (a 20 000-image subset, cached under bench-results/cache),
   then pruned (gradual, distillation between steps), weight-shared to 4 bits (centroids
   fine-tuned by distillation) and packed. Reported: test accuracy before/after (and of
   the reloaded file, which must equal the compressed graph's outputs bit for bit), file
   size and ratio against the fp32 state_dict, raw and zipped. Targets: CNN >= 10x,
   VGG >= 40x, each at <= 1 point accuracy loss.
2. ResNet-50 (random weights; nothing is downloaded): time to get a runnable model from a
   packed fp32 file and from a pruned + int8 packed file, against torch.load of the fp32
   state_dict (alone, and followed by building the model and load_state_dict). Runs are
   interleaved A, B, C, ... in one process; medians and ratios are reported.
Writes bench-results/packed.json.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn as nn

import graphopt
import graphopt.backends  # noqa: F401  (registers backends)
import graphopt.passes  # noqa: F401  (registers passes)
from graphopt import PassContext, PassManager
from graphopt.backends import packed
from graphopt.evaluate import top1_accuracy
from graphopt.passes import FoldBatchNorm, PruneMagnitude, QuantizeWeights, RemoveIdentity, ShareWeights
from graphopt.latency import interleaved_latency
from graphopt.report import pass_table, table, write_json
from graphopt.tools import fashion_mnist

OUT = "bench-results"
TRAIN_LIMIT = 20_000


def fashion_cnn() -> nn.Module:
    """Two conv layers and a hidden fully connected layer (~206k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(inplace=True), nn.Linear(128, 10))


def fashion_vgg() -> nn.Module:
    """VGG-style: 3x3 conv-BN-ReLU blocks with max pooling, then two 512-wide FC layers (~600k)."""
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(1, 16), *block(16, 16), nn.MaxPool2d(2), *block(16, 32), *block(32, 32), nn.MaxPool2d(2),
        *block(32, 64), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(64 * 3 * 3, 512), nn.ReLU(inplace=True), nn.Dropout(0.3),
        nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(512, 10))


def train_data(limit: int = TRAIN_LIMIT, seed: int = 0):
    """A callable yielding shuffled (images, labels) batches of the training subset."""
    return fashion_mnist.shuffled_epochs(128, limit, seed)


def trained(name: str, factory, epochs: int, limit: int) -> nn.Module:
    """The model trained with Adam (cached in bench-results/cache by name and settings)."""
    torch.manual_seed(0)
    data = train_data(limit, seed=100)
    return fashion_mnist.cached_model(os.path.join(OUT, "cache", f"{name}-e{epochs}-n{limit}.pt"), factory,
                                      lambda m: fashion_mnist.train_classifier(m, epochs, lr=1e-3,
                                                                               data=lambda _: data()))


def accuracy(model) -> float:
    return 100 * top1_accuracy(model, fashion_mnist.test_batches(1000))


def compress(name: str, model: nn.Module, passes: list, target_ratio: float) -> dict:
    graph = graphopt.trace(model, torch.randn(1, 1, 28, 28))
    base = accuracy(graph)
    started = time.perf_counter()
    result = PassManager(passes, context=PassContext({"train_data": train_data()})).run(graph)
    seconds = time.perf_counter() - started
    print(pass_table(result.records))
    path = os.path.join(OUT, f"{name}.gpk")
    report = packed.export(result.graph, path)  # reloads and checks outputs bit for bit
    size = report.details["size"]
    print(packed.size_table({"layers": report.details["layers"], "totals": size}, min_params=1000))
    loaded = packed.load(path)
    after = accuracy(result.graph)
    x = next(fashion_mnist.batches("test", 256))[0]
    return {"model": name, "params": size["params"], "accuracy_fp32": round(base, 2),
            "accuracy_packed": round(after, 2), "accuracy_loaded": round(accuracy(loaded), 2),
            "loss_points": round(base - after, 2), "bit_exact_reload": bool(torch.equal(loaded.run(x),
                                                                                        result.graph.run(x))),
            "file_bytes": size["file_bytes"], "fp32_state_dict_bytes": size["fp32_state_dict_bytes"],
            "ratio_vs_fp32": size["ratio_vs_fp32"], "ratio_vs_fp32_zip": size["ratio_vs_fp32_zip"],
            "bits_per_weight": size["bits_per_weight"], "compress_seconds": round(seconds, 1),
            "target_ratio": target_ratio,
            "meets_target": bool(size["ratio_vs_fp32"] >= target_ratio and base - after <= 1.0),
            "layers": report.details["layers"]}


def finetune(epochs: float) -> dict:
    return {"finetune_epochs": epochs, "lr": 5e-4}


def resnet50_load_times(repeats: int) -> dict:
    import torchvision

    model = torchvision.models.resnet50(weights=None).eval()
    state_path = os.path.join(OUT, "resnet50.fp32.pt")
    torch.save(model.state_dict(), state_path)
    graph = graphopt.trace(model, torch.randn(1, 3, 224, 224))
    dense_path, small_path = os.path.join(OUT, "resnet50.fp32.gpk"), os.path.join(OUT, "resnet50.int8.gpk")
    packed.save(graph, dense_path)
    small = PassManager([FoldBatchNorm(), PruneMagnitude(sparsity=0.5), QuantizeWeights(bits=8)],
                        verify=False).run(graph).graph
    packed.save(small, small_path)
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(packed.load_module(small_path)(x), small.run(x))

    def torch_load():
        return torch.load(state_path, weights_only=True)

    def torch_model():
        m = torchvision.models.resnet50(weights=None)
        m.load_state_dict(torch.load(state_path, weights_only=True))
        return m

    cases = {"torch.load(state_dict)": torch_load, "torch.load + resnet50() + load_state_dict": torch_model,
             "packed fp32 -> GraphModule": lambda: packed.load_module(dense_path),
             "packed pruned-50% int8 -> GraphModule": lambda: packed.load_module(small_path)}
    times = interleaved_latency(cases, rounds=repeats, warmup=0)
    base = times["torch.load(state_dict)"]
    rows = [{"case": k, "median_s": round(v, 3), "ratio_vs_torch_load": round(v / base, 2)} for k, v in times.items()]
    sizes = {"fp32_state_dict": os.path.getsize(state_path), "packed_fp32": os.path.getsize(dense_path),
             "packed_pruned_int8": os.path.getsize(small_path)}
    return {"repeats": repeats, "rows": rows, "bytes": sizes}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="baseline training epochs")
    parser.add_argument("--repeats", type=int, default=5, help="ResNet-50 load repeats")
    parser.add_argument("--skip-resnet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(OUT, exist_ok=True)
    results: dict = {"threads": args.threads, "train_images": TRAIN_LIMIT, "models": []}
    convs = ["0", "3"]
    cnn = trained("fashion_cnn", fashion_cnn, args.epochs, TRAIN_LIMIT)
    results["models"].append(compress("fashion_cnn", cnn, [
        PruneMagnitude(sparsity=0.5, layers=convs + ["9"]),
        PruneMagnitude(sparsity=0.8, layers=["7"], steps=2, **finetune(0.5)),
        ShareWeights(bits=5, **finetune(0.5))], target_ratio=10))
    vgg = trained("fashion_vgg", fashion_vgg, args.epochs, TRAIN_LIMIT)
    results["models"].append(compress("fashion_vgg", vgg, [
        FoldBatchNorm(), RemoveIdentity(),
        PruneMagnitude(sparsity=0.5, exclude=["19", "22"]),
        PruneMagnitude(sparsity=0.95, layers=["19", "22"], steps=3, **finetune(0.5)),
        ShareWeights(bits=4, **finetune(0.5))], target_ratio=40))
    print()
    print(table(["model", "params", "acc fp32", "acc packed", "loss pt", "bytes", "x fp32", "x zip", "bits/w",
                 "exact", "target"],
                [(r["model"], r["params"], f"{r['accuracy_fp32']:.2f}", f"{r['accuracy_packed']:.2f}",
                  f"{r['loss_points']:.2f}", r["file_bytes"], f"{r['ratio_vs_fp32']:.1f}",
                  f"{r['ratio_vs_fp32_zip']:.1f}", f"{r['bits_per_weight']:.2f}", r["bit_exact_reload"],
                  f"{'met' if r['meets_target'] else 'MISSED'} {r['target_ratio']}x") for r in results["models"]]))
    if not args.skip_resnet:
        results["resnet50_load"] = resnet50_load_times(args.repeats)
        print(f"\nResNet-50 load ({args.threads} threads, median of {args.repeats}, interleaved); bytes: "
              f"{results['resnet50_load']['bytes']}\n")
        print(table(["case", "median s", "x torch.load"],
                    [(r["case"], f"{r['median_s']:.3f}", f"{r['ratio_vs_torch_load']:.2f}")
                     for r in results["resnet50_load"]["rows"]]))
    write_json(os.path.join(OUT, "packed.json"), results)
    print(f"wrote {os.path.join(OUT, 'packed.json')}")


if __name__ == "__main__":
    main()
