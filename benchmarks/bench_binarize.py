"""Binarization benchmark on Fashion-MNIST: accuracy, size and latency of fp32, int8, binary
weights, and binary weights + activations; plus the XNOR-popcount path against fp32 layers.

    python -m benchmarks.bench_binarize [--epochs 3] [--distill-epochs 1] [--act-distill-epochs 1]
                                            [--threads 2] [--out bench-results/binarize.json] [--retrain]

Recipe: train the CNN in fp32 (cached under bench-results/); binarize the hidden layers
(conv2, fc1; the input conv and output linear stay fp32), fine-tune the latent weights by
distillation from the fp32 model, fold BatchNorm into the latent weights, freeze, save 1-bit.
Latencies are medians of interleaved runs in this one process, on a fixed thread count;
compare the ratios, not the milliseconds.
"""
from __future__ import annotations

import argparse
import copy
import io
import os
import platform
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from benchmarks import harness
from graphopt import PassContext, PassManager
from graphopt.backends import binary as binary_backend
from graphopt.backends import onnx as onnx_backend
from graphopt.backends import torchscript as ts_backend
from graphopt.backends import xnor_cpu
from graphopt.quant.binary import BinaryConv2d, BinaryLinear, freeze
from graphopt.passes import Binarize, FoldBatchNorm, FreezeBinary
from graphopt.report import markdown_table, table
from graphopt.tools import fashion_mnist

CACHE = "bench-results/fashion_cnn_fp32.pt"
HIDDEN = ["conv2", "fc1"]


class FashionCNN(nn.Module):
    """conv-bn-relu-pool x2, fc-bn-relu, fc: ~0.83 M parameters, 97% of them in fc1."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.fc1, self.bn3 = nn.Linear(64 * 7 * 7, 256), nn.BatchNorm1d(256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.bn3(self.fc1(torch.flatten(x, 1)))))


def train_fp32(epochs: int) -> FashionCNN:
    torch.manual_seed(0)
    data = fashion_mnist.shuffled_epochs()
    return fashion_mnist.train_classifier(FashionCNN(), epochs, lr=2e-3, one_cycle=True, data=lambda _: data())


def binarize_pipeline(graph, activations: bool, epochs: float, lr: float):
    passes = [Binarize(layers=HIDDEN, activations=activations, distill_epochs=epochs, lr=lr, freeze=False),
              FoldBatchNorm(), FreezeBinary()]
    return PassManager(passes, context=PassContext({"train_data": fashion_mnist.shuffled_epochs(seed=100)})).run(graph)


def int8_static(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """torch.ao FX static int8 (x86 engine), calibrated on 20 training batches."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(model.eval(), get_default_qconfig_mapping("x86"), (example,))
    with torch.no_grad():
        for i, (x, _) in enumerate(fashion_mnist.batches("train", 128, shuffle=True, seed=7)):
            if i == 20:
                break
            prepared(x)
    return convert_fx(prepared)


class XnorModule(nn.Module):
    """Runs a frozen binary-activation layer through the numpy XNOR path inside a torch model."""

    def __init__(self, layer):
        super().__init__()
        self.runner = xnor_cpu.compile_layer(layer)

    def forward(self, x):
        return torch.from_numpy(np.asarray(self.runner(x.detach().numpy()), dtype=np.float32))


def xnor_layer_bench(repeats: int) -> list[dict]:
    """XNOR-popcount vs the fp32 layer of the same shape (and the float binary layer)."""
    shapes = [("conv2 32->64 3x3 @14x14", lambda: nn.Conv2d(32, 64, 3, padding=1), (32, 14, 14)),
              ("conv 256->256 3x3 @14x14", lambda: nn.Conv2d(256, 256, 3, padding=1), (256, 14, 14)),
              ("fc1 3136->256", lambda: nn.Linear(3136, 256), (3136,)),
              ("fc 4096->4096", lambda: nn.Linear(4096, 4096), (4096,))]
    rows = []
    for label, make, in_shape in shapes:
        for batch in (1, 16):
            fp32 = make().eval()
            binary = (BinaryConv2d.from_float if isinstance(fp32, nn.Conv2d) else BinaryLinear.from_float)(
                fp32, activations=True).eval()
            freeze(binary)
            runner = xnor_cpu.compile_layer(binary)
            x = torch.randn(batch, *in_shape)
            xn = x.numpy()
            with torch.no_grad():
                err = (torch.from_numpy(np.asarray(runner(xn), np.float32)) - binary(x)).abs().max().item()
                t = harness.latency({"fp32": lambda: fp32(x), "binary_float": lambda: binary(x),
                                     "xnor": lambda: runner(xn)}, (), repeats, warmup=1, inner=5)
            rows.append({"layer": label, "batch": batch, "fp32_ms": t["fp32"],
                         "binary_float_ms": t["binary_float"], "xnor_ms": t["xnor"],
                         "speedup_vs_fp32": t["fp32"] / t["xnor"], "max_abs_diff": err})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="fp32 training epochs")
    parser.add_argument("--distill-epochs", type=float, default=1.0)
    parser.add_argument("--act-distill-epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2, help="threads for training")
    parser.add_argument("--bench-threads", type=int, default=1, help="threads for latency (numpy XNOR is 1)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--out", default="bench-results/binarize.json")
    args = parser.parse_args()
    if not fashion_mnist.available():
        raise SystemExit("Fashion-MNIST missing: apt-get install -y dataset-fashion-mnist")
    torch.set_num_threads(args.threads)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if args.retrain and os.path.exists(CACHE):
        os.remove(CACHE)
    model = fashion_mnist.cached_model(CACHE, FashionCNN, lambda _: train_fp32(args.epochs))
    seconds["fp32 training (or cache)"] = time.perf_counter() - start
    example = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    fp32 = graphopt.trace(model, example)
    fp32_folded = PassManager([FoldBatchNorm()]).run(fp32).graph

    variants = {}
    for name, activations, epochs in (("binary weights", False, args.distill_epochs),
                                      ("binary weights + activations", True, args.act_distill_epochs)):
        start = time.perf_counter()
        result = binarize_pipeline(fp32, activations, epochs, args.lr)
        seconds[f"{name}: binarize + distill"] = time.perf_counter() - start
        variants[name] = result

    start = time.perf_counter()
    int8 = int8_static(copy.deepcopy(model), example)
    seconds["int8 static quantization"] = time.perf_counter() - start

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        buffer = io.BytesIO()
        torch.save(fp32_folded.gm.state_dict(), buffer)
        fp32_bytes = buffer.getbuffer().nbytes
        buffer = io.BytesIO()
        torch.save(int8.state_dict(), buffer)
        int8_bytes = buffer.getbuffer().nbytes
        entries = {"fp32": (fp32_folded, fp32_bytes, None), "int8 (torch.ao static, x86)": (int8, int8_bytes, None)}
        for name, result in variants.items():
            report = binary_backend.export(result.graph, os.path.join(folder, "m.gobin"))
            onnx_tol = 1e-4 if "activations" not in name else 0.5  # a sign may flip at a threshold
            onnx_report = onnx_backend.export(result.graph, os.path.join(folder, "m.onnx"), tolerance=onnx_tol)
            ts_report = ts_backend.export(result.graph, os.path.join(folder, "m.pt"))
            entries[name] = (result.graph, report.bytes, {
                "binary_layers_ratio": report.details["binary_ratio"], "gobin": report.details,
                "onnx_max_rel_error": onnx_report.max_rel_error, "torchscript_max_rel_error": ts_report.max_rel_error,
                "distill": {k: v for k, v in result.records[1].stats.items() if k.startswith("distill")}})
        torch.set_num_threads(args.bench_threads)
        batch = next(iter(fashion_mnist.test_batches(64)))[0]
        one = batch[:1]
        modules = {name: (g.gm if hasattr(g, "gm") else g) for name, (g, _, _) in entries.items()}
        with torch.no_grad():
            lat64 = harness.latency(modules, (batch,), args.repeats, warmup=1, inner=5)
            lat1 = harness.latency(modules, (one,), args.repeats, warmup=1, inner=20)
        torch.set_num_threads(args.threads)
        for name, (g, size, extra) in entries.items():
            acc = harness.accuracy(modules[name], batch_size=500)
            results[name] = {"top1": acc, "bytes": size, "latency_b64_ms": lat64[name],
                             "latency_b1_ms": lat1[name], **(extra or {})}

    # the full binary w+a model with its binary layers run by the XNOR path
    act_graph = variants["binary weights + activations"].graph.clone()
    for layer in HIDDEN:
        act_graph.replace_module(layer, XnorModule(act_graph.gm.get_submodule(layer)))
    act_graph.gm.recompile()
    torch.set_num_threads(args.bench_threads)
    xnor_top1 = harness.accuracy(act_graph.gm, batch_size=500)
    layer_rows = xnor_layer_bench(args.repeats)
    torch.set_num_threads(args.threads)

    print(f"\nFashion-MNIST CNN ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params), test set 10 000; "
          f"latency: {args.bench_threads} thread(s), median of {args.repeats} interleaved runs\n")
    print(table(*_model_rows(results, fp32_bytes)))
    for name in variants:
        r = results[name]
        print(f"  {name}: binarized layers {r['binary_layers_ratio']:.1f}x smaller than fp32; "
              f"ONNX rel. error {r['onnx_max_rel_error']:.2e}, TorchScript {r['torchscript_max_rel_error']:.2e}")
    print(f"  binary weights + activations with conv2/fc1 on the numpy XNOR path: top-1 {xnor_top1 * 100:.2f}%")
    print("\nXNOR-popcount (numpy) vs the fp32 torch layer of the same shape, "
          f"{args.bench_threads} thread(s); >1x means XNOR is faster\n")
    print(table(*_layer_rows(layer_rows)))
    print("\n" + table(["stage", "seconds"], [(k, f"{v:.1f}") for k, v in seconds.items()]))
    harness.write_results(args.out, {"torch": torch.__version__, "numpy": np.__version__,
                                     "machine": platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
                                     "bench_threads": args.bench_threads, "args": vars(args), "models": results,
                                     "fp32_bytes": fp32_bytes, "xnor_model_top1": xnor_top1,
                                     "xnor_layers": layer_rows, "seconds": seconds}, markdown)
    print(f"wrote {args.out}")


def _model_rows(results: dict, fp32_bytes: int) -> tuple[list[str], list[tuple]]:
    fp32 = results["fp32"]
    return (["model", "top-1 %", "vs fp32", "KiB", "smaller", "ms b64", "speed b64", "ms b1", "speed b1"],
            [(name, f"{r['top1'] * 100:.2f}", f"{(r['top1'] - fp32['top1']) * 100:+.2f}", f"{r['bytes'] / 1024:.1f}",
              f"{fp32_bytes / r['bytes']:.1f}x", f"{r['latency_b64_ms']:.2f}",
              f"{fp32['latency_b64_ms'] / r['latency_b64_ms']:.2f}x", f"{r['latency_b1_ms']:.3f}",
              f"{fp32['latency_b1_ms'] / r['latency_b1_ms']:.2f}x") for name, r in results.items()])


def _layer_rows(layer_rows: list[dict]) -> tuple[list[str], list[tuple]]:
    return (["layer", "batch", "fp32 ms", "binary float ms", "xnor ms", "xnor vs fp32", "max |diff|"],
            [(r["layer"], r["batch"], f"{r['fp32_ms']:.3f}", f"{r['binary_float_ms']:.3f}", f"{r['xnor_ms']:.3f}",
              f"{r['speedup_vs_fp32']:.2f}x", f"{r['max_abs_diff']:.1e}") for r in layer_rows])


def markdown(results: dict) -> str:
    """Accuracy, size and latency per variant; the XNOR path against fp32 layers."""
    return (f"Fashion-MNIST CNN, 10 000 test images; latency: {results['bench_threads']} thread(s), interleaved "
            f"medians:\n\n" + markdown_table(*_model_rows(results["models"], results["fp32_bytes"]))
            + f"\n\nBinary weights + activations with conv2/fc1 on the numpy XNOR path: top-1 "
              f"{results['xnor_model_top1'] * 100:.2f}%. XNOR-popcount (numpy) against the fp32 torch layer of the "
              f"same shape (>1x: XNOR is faster):\n\n" + markdown_table(*_layer_rows(results["xnor_layers"])))


if __name__ == "__main__":
    main()
