"""Benchmark of the packed format: Deep Compression on Fashion-MNIST over seeds, ResNet-50 load
time, and the entropy coders compared on the files' streams.

    python -m benchmarks.bench_packed [--seeds 3] [--threads 2] [--repeats 5]

1. A small CNN and a VGG-style net (conv blocks + large fully connected layers) are
   trained on Fashion-MNIST (a 20 000-image subset, cached under bench-results/cache), then
   pruned (gradual, distillation between steps), weight-shared (centroids fine-tuned by
   distillation) and packed, once per seed (the seed sets initialisation, data order and
   fine-tuning). Reported per seed and as mean and spread: test accuracy before/after (and
   of the reloaded file, which must equal the compressed graph's outputs bit for bit), file
   size and ratio against the fp32 state_dict. Targets, decided on the means: CNN >= 10x,
   VGG >= 40x, each at <= 1 point accuracy loss.
2. ResNet-50 (random weights; nothing is downloaded; pruned 50% + int8): time to a runnable
   model from packed files (format version 2, zstandard; and the same model re-coded as
   version 1, canonical Huffman) against torch.load of the fp32 state_dict, alone and
   followed by building the model and load_state_dict. Also measured: time until
   ``open_module`` returns a callable module (tensors still decoding), and to a first output
   that way or after a full load. Interleaved rounds, medians. Target: the packed int8 load
   <= torch.load + build + load_state_dict, at a file no larger than version 1's.
3. Coders (``bench_packed_coders``) on the integer streams of the ResNet-50 file and of
   seed 0's Fashion-MNIST files.
Writes bench-results/packed.json and bench-results/packed.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn as nn

import graphopt
import graphopt.backends  # noqa: F401  (registers backends)
import graphopt.passes  # noqa: F401  (registers passes)
from benchmarks import bench_packed_coders, harness
from benchmarks.packed_v1 import write_version_1
from graphopt import PassContext, PassManager
from graphopt.backends import packed
from graphopt.backends.packed_tensors import Reader
from graphopt.app.latency import interleaved_latency
from graphopt.passes import FoldBatchNorm, PruneMagnitude, QuantizeWeights, RemoveIdentity, ShareWeights
from graphopt.report import markdown_table, pass_table, table
from graphopt.tools import fashion_mnist

OUT = "bench-results"
TRAIN_LIMIT = 20_000
MAX_LOSS_POINTS = 1.0


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


def finetune(epochs: float) -> dict:
    return {"finetune_epochs": epochs, "lr": 5e-4}


#: name -> (factory, compression recipe (fresh passes each call), target ratio)
RECIPES = {
    "fashion_cnn": (fashion_cnn, lambda: [
        PruneMagnitude(sparsity=0.5, layers=["0", "3", "9"]),
        PruneMagnitude(sparsity=0.8, layers=["7"], steps=2, **finetune(0.5)),
        ShareWeights(bits=5, **finetune(0.5))], 10),
    # the convs stay dense: pruning them by half cost 8 points before fine-tuning and 1.1 after
    # (3 seeds); the two 512-wide FC layers hold 93% of the weights
    "fashion_vgg": (fashion_vgg, lambda: [
        FoldBatchNorm(), RemoveIdentity(),
        PruneMagnitude(sparsity=0.95, layers=["19", "22"], steps=3, **finetune(0.5)),
        ShareWeights(bits=4, **finetune(0.5))], 40),
}
#: name -> (what the table calls the model, what its recipe does)
LABELS = {"fashion_cnn": ("CNN", "prune 50% / FC 80%, 5-bit sharing"),
          "fashion_vgg": ("VGG-style", "FC 95% (convs dense), 4-bit sharing")}


def train_data(limit: int = TRAIN_LIMIT, seed: int = 0):
    """A callable yielding shuffled (images, labels) batches of the training subset."""
    return fashion_mnist.shuffled_epochs(128, limit, seed)


def trained(name: str, factory, epochs: int, limit: int, seed: int) -> nn.Module:
    """The model trained with Adam (cached in bench-results/cache by name, settings and seed)."""
    torch.manual_seed(seed)
    data = train_data(limit, seed=100 + seed)
    return fashion_mnist.cached_model(os.path.join(OUT, "cache", f"{name}-e{epochs}-n{limit}-s{seed}.pt"), factory,
                                      lambda m: fashion_mnist.train_classifier(m, epochs, lr=1e-3,
                                                                               data=lambda _: data()))


def compress(name: str, model: nn.Module, passes: list, seed: int) -> dict:
    graph = graphopt.trace(model, torch.randn(1, 1, 28, 28))
    base = 100 * harness.accuracy(graph, batch_size=1000)
    torch.manual_seed(seed)
    started = time.perf_counter()
    result = PassManager(passes, context=PassContext({"train_data": train_data(seed=seed)})).run(graph)
    seconds = time.perf_counter() - started
    print(pass_table(result.records))
    path = os.path.join(OUT, f"{name}-s{seed}.gpk")
    report = packed.export(result.graph, path)  # reloads and checks outputs bit for bit
    size = report.details["size"]
    print(packed.size_table({"layers": report.details["layers"], "totals": size}, min_params=1000))
    loaded = packed.load(path)
    after = 100 * harness.accuracy(result.graph, batch_size=1000)
    x = next(fashion_mnist.batches("test", 256))[0]
    return {"seed": seed, "path": path, "accuracy_fp32": round(base, 2), "accuracy_packed": round(after, 2),
            "accuracy_loaded": round(100 * harness.accuracy(loaded, batch_size=1000), 2), "loss_points": round(base - after, 2),
            "bit_exact_reload": bool(torch.equal(loaded.run(x), result.graph.run(x))),
            "file_bytes": size["file_bytes"], "fp32_state_dict_bytes": size["fp32_state_dict_bytes"],
            "ratio_vs_fp32": size["ratio_vs_fp32"], "ratio_vs_fp32_zip": size["ratio_vs_fp32_zip"],
            "bits_per_weight": size["bits_per_weight"], "compress_seconds": round(seconds, 1),
            "params": size["params"], "layers": report.details["layers"]}


def summarise(name: str, runs: list[dict], target_ratio: float) -> dict:
    """Mean and spread over seeds; the targets are decided on the means."""
    def stats(key: str) -> dict:
        values = [r[key] for r in runs]
        return {"mean": round(statistics.mean(values), 2), "std": round(statistics.stdev(values), 2)
                if len(values) > 1 else 0.0, "min": min(values), "max": max(values)}

    loss, ratio = stats("loss_points"), stats("ratio_vs_fp32")
    return {"model": name, "params": runs[0]["params"], "seeds": [r["seed"] for r in runs],
            "accuracy_fp32": stats("accuracy_fp32"), "accuracy_packed": stats("accuracy_packed"),
            "loss_points": loss, "ratio_vs_fp32": ratio, "file_bytes": stats("file_bytes"),
            "bits_per_weight": stats("bits_per_weight"), "target_ratio": target_ratio,
            "max_loss_points": MAX_LOSS_POINTS, "all_bit_exact": all(r["bit_exact_reload"] for r in runs),
            "meets_target": bool(ratio["mean"] >= target_ratio and loss["mean"] <= MAX_LOSS_POINTS), "runs": runs}


def fashion_tables(models: list[dict]) -> tuple[tuple, tuple]:
    per_seed = (["model", "seed", "acc fp32", "acc packed", "loss pt", "bytes", "x fp32", "bits/w", "exact"],
                [(m["model"], r["seed"], f"{r['accuracy_fp32']:.2f}", f"{r['accuracy_packed']:.2f}",
                  f"{r['loss_points']:.2f}", r["file_bytes"], f"{r['ratio_vs_fp32']:.1f}",
                  f"{r['bits_per_weight']:.2f}", r["bit_exact_reload"]) for m in models for r in m["runs"]])
    summary = (["model", "seeds", "loss pt mean ± std [min, max]", "x fp32 mean [min, max]", "target", "result"],
               [(m["model"], len(m["seeds"]),
                 f"{m['loss_points']['mean']:.2f} ± {m['loss_points']['std']:.2f} "
                 f"[{m['loss_points']['min']:.2f}, {m['loss_points']['max']:.2f}]",
                 f"{m['ratio_vs_fp32']['mean']:.1f} [{m['ratio_vs_fp32']['min']:.1f}, {m['ratio_vs_fp32']['max']:.1f}]",
                 f">= {m['target_ratio']}x at <= {MAX_LOSS_POINTS:g} pt mean loss",
                 "met" if m["meets_target"] else "MISSED") for m in models])
    return per_seed, summary


# -- ResNet-50 load time ----------------------------------------------------------------------
def _decode_only(path: str) -> None:
    """Read, verify and decode every tensor on this thread; no module is built."""
    manifest, blob, version = packed._read_checked(path)
    reader = Reader(blob, version)
    builders = [reader.plan(entry) for entry in manifest["tensors"]]
    reader.run()
    for build in builders:
        build()


def resnet50_load_times(repeats: int) -> dict:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    state_path = os.path.join(OUT, "resnet50.fp32.pt")
    torch.save(model.state_dict(), state_path)
    graph = graphopt.trace(model, torch.randn(1, 3, 224, 224))
    paths = {"fp32": os.path.join(OUT, "resnet50.fp32.gpk"), "v2": os.path.join(OUT, "resnet50.int8.gpk"),
             "v1": os.path.join(OUT, "resnet50.int8.v1.gpk")}
    packed.save(graph, paths["fp32"])
    small = PassManager([FoldBatchNorm(), PruneMagnitude(sparsity=0.5), QuantizeWeights(bits=8)],
                        verify=False).run(graph).graph
    packed.save(small, paths["v2"])
    write_version_1(paths["v2"], paths["v1"])
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        reference = small.run(x)
        for key in ("v1", "v2"):
            assert torch.equal(packed.load_module(paths[key])(x), reference), key
        assert torch.equal(packed.open_module(paths["v2"]).module(x), reference)

    def torch_model():
        m = torchvision.models.resnet50(weights=None)
        m.load_state_dict(torch.load(state_path, weights_only=True))
        return m.eval()

    def first_output(make):
        with torch.no_grad():
            return make()(x)

    cases = {
        "torch.load(fp32 state_dict)": lambda: torch.load(state_path, weights_only=True),
        "torch.load + resnet50() + load_state_dict": torch_model,
        "packed fp32 -> GraphModule": lambda: packed.load_module(paths["fp32"]),
        "packed int8 v1 (Huffman) -> GraphModule": lambda: packed.load_module(paths["v1"]),
        "packed int8 v2 (zstd) -> GraphModule, all decoded": lambda: packed.load_module(paths["v2"]),
        "packed int8 v2 -> open_module returns (decoding)": lambda: packed.open_module(paths["v2"]),
        "packed int8 v2 decode only, 1 thread, no module": lambda: _decode_only(paths["v2"]),
        "packed int8 v1 decode only, 1 thread, no module": lambda: _decode_only(paths["v1"]),
        "first output: torch.load + build + load_state_dict": lambda: first_output(torch_model),
        "first output: packed int8 v2 load_module": lambda: first_output(lambda: packed.load_module(paths["v2"])),
        "first output: packed int8 v2 open_module": lambda: first_output(lambda: packed.open_module(paths["v2"]).module),
    }
    times = interleaved_latency(cases, rounds=repeats, warmup=1)
    base = times["torch.load(fp32 state_dict)"]
    decoded_mb = sum(t.numel() * 4 for t in small.gm.state_dict().values()) / 1e6  # the weights as fp32
    rows = []
    for case, seconds in times.items():
        row = {"case": case, "median_s": round(seconds, 4), "ratio_vs_torch_load": round(seconds / base, 2)}
        if "int8" in case and "open_module returns" not in case and not case.startswith("first"):
            row["decoded_mb_per_s"] = round(decoded_mb / seconds, 1)
        rows.append(row)
    sizes = {"fp32_state_dict": os.path.getsize(state_path), "packed_fp32": os.path.getsize(paths["fp32"]),
             "packed_int8_v1_huffman": os.path.getsize(paths["v1"]),
             "packed_int8_v2_zstd": os.path.getsize(paths["v2"])}
    load, torch_build = times["packed int8 v2 (zstd) -> GraphModule, all decoded"], \
        times["torch.load + resnet50() + load_state_dict"]
    target = {"packed_int8_load_s": round(load, 4), "torch_load_build_load_state_dict_s": round(torch_build, 4),
              "v2_bytes": sizes["packed_int8_v2_zstd"], "v1_bytes": sizes["packed_int8_v1_huffman"],
              "met": bool(load <= torch_build and sizes["packed_int8_v2_zstd"] <= sizes["packed_int8_v1_huffman"])}
    return {"repeats": repeats, "decoded_fp32_mb": round(decoded_mb, 1), "rows": rows, "bytes": sizes,
            "target": target, "paths": paths}


def load_table(load: dict) -> tuple:
    return (["case", "median s", "x torch.load", "decoded MB/s"],
            [(r["case"], f"{r['median_s']:.3f}", f"{r['ratio_vs_torch_load']:.2f}",
              f"{r['decoded_mb_per_s']:.0f}" if "decoded_mb_per_s" in r else "-") for r in load["rows"]])


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="baseline training epochs")
    parser.add_argument("--seeds", type=int, default=3, help="training + compression runs per model")
    parser.add_argument("--repeats", type=int, default=5, help="ResNet-50 load rounds")
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--skip-fashion", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(OUT, exist_ok=True)
    started = time.perf_counter()
    results: dict = {"threads": args.threads, "train_images": TRAIN_LIMIT, "epochs": args.epochs, "models": []}
    if not args.skip_fashion:
        for name, (factory, recipe, target) in RECIPES.items():
            runs = [compress(name, trained(name, factory, args.epochs, TRAIN_LIMIT, seed), recipe(), seed)
                    for seed in range(args.seeds)]
            results["models"].append(summarise(name, runs, target))
        per_seed, summary = fashion_tables(results["models"])
        print("\n" + table(*per_seed) + "\n\n" + table(*summary))
    coder_files = []
    if not args.skip_resnet:
        load = results["resnet50_load"] = resnet50_load_times(args.repeats)
        print(f"\nResNet-50 load ({args.threads} threads, median of {args.repeats}, interleaved); bytes: "
              f"{load['bytes']}; target {'met' if load['target']['met'] else 'MISSED'}: {load['target']}\n")
        print(table(*load_table(load)))
        coder_files.append(("resnet50 int8", load["paths"]["v2"]))
    coder_files += [(m["model"], m["runs"][0]["path"]) for m in results["models"]]
    results["coders"] = [bench_packed_coders.compare(label, path) for label, path in coder_files]
    if results["coders"]:
        print()
        bench_packed_coders.print_table(results["coders"])
    results["seconds"] = round(time.perf_counter() - started, 1)
    harness.write_results(os.path.join(OUT, "packed.json"), results, markdown)
    print(f"wrote {os.path.join(OUT, 'packed.json')} and packed.md ({results['seconds']:.0f} s)")


def _bytes(n: int | None) -> str:
    return "" if n is None else f"{n:,}".replace(",", " ")


#: load case -> (row label, which file's size the row reads)
LOAD_ROWS = {
    "torch.load(fp32 state_dict)": ("`torch.load` of the fp32 state_dict", "fp32_state_dict"),
    "torch.load + resnet50() + load_state_dict": ("`torch.load` + `resnet50()` + `load_state_dict`",
                                                  "fp32_state_dict"),
    "packed fp32 -> GraphModule": ("packed fp32", "packed_fp32"),
    "packed int8 v1 (Huffman) -> GraphModule": ("packed int8, version 1 (Huffman, numpy decoder)",
                                                "packed_int8_v1_huffman"),
    "packed int8 v2 (zstd) -> GraphModule, all decoded": ("packed int8, version 2 (zstandard), all weights decoded",
                                                          "packed_int8_v2_zstd"),
    "packed int8 v2 -> open_module returns (decoding)": (
        "packed int8, version 2, `open_module` returns (weights still decoding)", None),
    "packed int8 v2 decode only, 1 thread, no module": ("packed int8, version 2, decoding only (one thread, no module)",
                                                        None),
    "packed int8 v1 decode only, 1 thread, no module": ("packed int8, version 1, decoding only (one thread, no module)",
                                                        None),
    "first output: torch.load + build + load_state_dict": (
        "first output, 1x3x224x224: `torch.load` + build + `load_state_dict`", None),
    "first output: packed int8 v2 load_module": ("first output: `load_module`, then run", None),
    "first output: packed int8 v2 open_module": ("first output: `open_module`, run while decoding", None),
}


def markdown(results: dict) -> str:
    """Fashion-MNIST compression over seeds, ResNet-50 load times and the coders, as Markdown tables."""
    out = []
    if results["models"]:
        per_seed, _ = fashion_tables(results["models"])
        out.append("Compression over seeds (seed: initialisation, data order, fine-tuning), Fashion-MNIST test set, "
                   "targets decided on the means:\n\n" + markdown_table(
                       ["model", "recipe", "loss (points) mean ± std [min, max]", "x fp32 state_dict mean [min, max]",
                        "target"],
                       [(f"{LABELS.get(m['model'], (m['model'],))[0]} ({m['params'] / 1e3:.0f}k params)",
                         LABELS.get(m["model"], ("", "-"))[1],
                         f"{m['loss_points']['mean']:.2f} ± {m['loss_points']['std']:.2f} "
                         f"[{m['loss_points']['min']:.2f}, {m['loss_points']['max']:.2f}]",
                         f"{m['ratio_vs_fp32']['mean']:.1f} [{m['ratio_vs_fp32']['min']:.1f}, "
                         f"{m['ratio_vs_fp32']['max']:.1f}]",
                         f">= {m['target_ratio']}x, <= {m['max_loss_points']:g} pt: "
                         + ("met" if m["meets_target"] else "missed")) for m in results["models"]])
                   + "\n\nPer seed:\n\n" + markdown_table(*per_seed))
    load = results.get("resnet50_load")
    if load:
        rows = []
        for r in load["rows"]:
            label, size = LOAD_ROWS.get(r["case"], (r["case"], None))
            rows.append((label, f"{r['median_s']:.3f}", _bytes(load["bytes"].get(size)),
                         f"{r['decoded_mb_per_s']:.0f}" if "decoded_mb_per_s" in r else "-"))
        out.append(f"ResNet-50 (random weights) pruned 50% and int8, to a runnable module ({load['decoded_fp32_mb']:.0f} "
                   f"MB of fp32 weights decoded; {results['threads']} threads, median of {load['repeats']} interleaved "
                   "rounds):\n\n" + markdown_table(["case", "median s", "file bytes", "decoded MB/s"], rows))
    out += [bench_packed_coders.coder_markdown(r) for r in results.get("coders", [])]
    return "\n\n".join(out)


if __name__ == "__main__":
    main()
