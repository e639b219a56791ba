"""Structured pruning benchmarks: real speed at half the MACs, and accuracy after distillation.

    python -m benchmarks.bench_prune speed    [--models resnet50,mobilenet_v2,convnext_tiny,vit_b_16]
    python -m benchmarks.bench_prune accuracy [--epochs 3]

speed: each model pruned to 50% of its MACs by graphopt (prune_channels, L2, round_to 32 unless
--round-to says otherwise; a pruned LayerNorm normalises the channels kept, a plain nn.LayerNorm
as Torch-Pruning leaves it: layer_norm_stats="kept") and, as a column, by Torch-Pruning 1.6
(MetaPruner, L2 magnitude, same MACs target found by bisection, the same round_to, halved while
its uniform steps land more than 3% under the target; `pip install --no-deps torch-pruning==1.6.1`). Latency is measured in torch
eager (NCHW, and channels_last: oneDNN's native layout, the usual CPU inference setting) and in
onnxruntime, batch 1 and 16, 2 threads; ratios are dense / pruned (higher is faster). Each runtime
is timed in its own block, its variants interleaved round by round (each timed call preceded
by an untimed one, so it runs hot) and the median taken, so
torch keeps its default OpenMP spin-wait (forcing OMP_WAIT_POLICY=PASSIVE, needed only when torch
and onnxruntime calls alternate, adds a thread wake-up to every torch op: about 8 ms of ResNet-50's
45 ms at batch 1 here, pruned or not, which hides the speed-up).

accuracy: a residual CNN trained on Fashion-MNIST (cached after the first run), pruned to
50% of its MACs (graphopt: Taylor importance, global ranking by default), then one epoch of
distillation from the unpruned model (AdamW, lr 3e-3 annealed to 0 by a cosine schedule);
Torch-Pruning (L2) at the same budget, no rounding, gets the same fine-tuning. Results print as a table and go to bench-results/prune_*.json (and .md).
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import graphopt
from benchmarks import harness
from graphopt.training.distill import DistillConfig, distill
from graphopt.passes import PruneChannels
from graphopt.report import markdown_table, table
from graphopt.tools import fashion_mnist

THREADS = 2


def torch_pruning_to(model: nn.Module, x: torch.Tensor, target: float, ignored: list[nn.Module],
                     round_to: int | None = 8) -> nn.Module:
    """Torch-Pruning at ``target`` x the dense MACs: bisection on its uniform pruning ratio."""
    import torch_pruning as tp

    base, _ = tp.utils.count_ops_and_params(model, x)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(10):
        mid = (lo + hi) / 2
        candidate = copy.deepcopy(model)
        ignored_here = [dict(candidate.named_modules())[n] for n, m in model.named_modules() if m in ignored]
        pruner = tp.pruner.MetaPruner(candidate, x, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=mid, ignored_layers=ignored_here, round_to=round_to)
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(candidate, x)
        if macs / base <= target:
            hi, best = mid, candidate
        else:
            lo = mid
    if best is None:
        raise RuntimeError(f"Torch-Pruning could not reach {target:.0%} of the MACs")
    return best.eval()


def torch_pruning_near(model: nn.Module, x: torch.Tensor, target: float, ignored: list[nn.Module],
                       round_to: int, dense_macs: int, slack: float = 0.03) -> tuple[nn.Module, int, int]:
    """Torch-Pruning as close to ``target`` as its rounding allows: its uniform ratio moves every
    layer by a whole ``round_to`` step at once (ResNet-50 at round_to 32 jumps from above 0.5 of
    the MACs to 0.39), so ``round_to`` is halved until it lands within ``slack`` of the target.
    Returns the pruned model, its MACs and the ``round_to`` used."""
    while True:
        pruned = torch_pruning_to(model, x, target, ignored, round_to=round_to)
        macs = graphopt.trace(pruned, x).analysis("cost").macs
        if round_to <= 1 or macs / dense_macs >= target - slack:
            return pruned, macs, round_to
        round_to //= 2


def output_layer(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


ROUND_TO = 32   # channel counts in multiples of 32: oneDNN's channels-last AVX-512 kernels block output
                # channels by 32-64 (ONEDNN_VERBOSE: Acdb32a/Acdb64a weights) and pad a 16-multiple
RUNTIMES = ("eager", "eager-cl", "ort")
HOT = 1         # an untimed call before each timed one: steady-state latency (see latency.interleaved_latency)


def prune_to_macs(graph: graphopt.Graph, target: float = 0.5, round_to: int = ROUND_TO,
                  layer_norm_stats: str = "kept") -> tuple[graphopt.Graph, int]:
    """graphopt's structured pruning of ``graph`` to ``target`` x its MACs (prune_channels: L2,
    channel counts in multiples of ``round_to``): the pruned graph and its MACs. LayerNorms keep
    statistics over the channels kept (fused plain LayerNorms; the exact "all" is a
    PrunedLayerNorm of a dozen unfused ops: ConvNeXt-T at batch 1 in eager 1.74x instead of 1.86x)."""
    result = graphopt.PassManager([PruneChannels(target_macs=target, round_to=round_to,
                                                 layer_norm_stats=layer_norm_stats)]).run(graph)
    return result.graph, result.records[-1].macs


def speed(models: list[str], rounds: int, out: str, round_to: int = ROUND_TO) -> None:
    torch.set_num_threads(THREADS)
    rows = []
    for name in models:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        x1 = torch.randn(1, 3, 224, 224)
        dense = graphopt.trace(model, x1)
        ours, ours_macs = prune_to_macs(dense, 0.5, round_to)
        variants = {"dense": (dense.gm, dense.analysis("cost").macs),
                    "graphopt": (ours.gm, ours_macs)}
        tp_error = ""
        try:
            tp_model, tp_macs, tp_round_to = torch_pruning_near(model, x1, 0.5, [output_layer(model)], round_to,
                                                                variants["dense"][1])
            variants["torch-pruning"] = (tp_model, tp_macs)
        except Exception as exc:  # reported in the table: a competitor's failure is a result
            tp_error = f"{type(exc).__name__}: {str(exc)[:80]}"
        for batch in (1, 16):
            x = torch.randn(batch, 3, 224, 224)
            n = rounds if batch == 1 else max(3, rounds // 3)
            times = {}
            for runtime in RUNTIMES:  # one interleaved block per runtime (see the module docstring)
                inputs = (x.contiguous(memory_format=torch.channels_last),) if runtime == "eager-cl" else (x,)
                with tempfile.TemporaryDirectory() as folder:
                    runners = {}
                    for variant, (module, _) in variants.items():
                        if runtime == "ort":
                            path = harness.onnx_file(graphopt.trace(module, x), os.path.join(folder, f"{variant}.onnx"))
                            runners[f"ort/{variant}"] = harness.ort_runner(path, THREADS)
                        else:
                            runners[f"{runtime}/{variant}"] = harness.eager_runner(module, runtime == "eager-cl")
                    times.update(harness.latency(runners, inputs, n, hot=HOT))
                    del runners
            for runtime in RUNTIMES:
                dense_t = times[f"{runtime}/dense"]
                row = {"model": name, "batch": batch, "runtime": runtime, "dense_ms": dense_t,
                       "graphopt_macs": variants["graphopt"][1] / variants["dense"][1],
                       "graphopt_speedup": dense_t / times[f"{runtime}/graphopt"]}
                if "torch-pruning" in variants:
                    row["tp_macs"] = variants["torch-pruning"][1] / variants["dense"][1]
                    row["tp_speedup"] = dense_t / times[f"{runtime}/torch-pruning"]
                    row["tp_round_to"] = tp_round_to
                else:
                    row["tp_error"] = tp_error
                rows.append(row)
                print(f"{name} b{batch} {runtime}: graphopt {row['graphopt_speedup']:.2f}x"
                      + (f", torch-pruning {row['tp_speedup']:.2f}x" if "tp_speedup" in row else f" ({tp_error})"),
                      flush=True)
    print(f"\nlatency ratio dense/pruned at 50% MACs, {THREADS} threads, median of interleaved rounds\n")
    print(table(["model", "batch", "runtime", "dense ms", "graphopt MACs", "graphopt x", "TP MACs", "TP round_to",
                 "TP x"],
                [(r["model"], r["batch"], r["runtime"], f"{r['dense_ms']:.1f}", f"{r['graphopt_macs']:.2f}",
                  f"{r['graphopt_speedup']:.2f}", f"{r['tp_macs']:.2f}" if "tp_macs" in r else "-",
                  r.get("tp_round_to", "-"),
                  f"{r['tp_speedup']:.2f}" if "tp_speedup" in r else r.get("tp_error", "-")[:30]) for r in rows]))
    harness.write_results(out, {"threads": THREADS, "rounds": rounds, "round_to": round_to, "rows": rows},
                          speed_markdown)
    print(f"wrote {out}")


def speed_markdown(results: dict) -> str:
    """Speed-up of each pruned model over the dense one, graphopt / Torch-Pruning, per runtime."""
    cells = {}
    for r in results["rows"]:
        tp = f"{r['tp_speedup']:.2f}x" if "tp_speedup" in r else "fails"
        cells.setdefault((r["model"], r["batch"]), {})[r["runtime"]] = f"{r['graphopt_speedup']:.2f}x / {tp}"
    return markdown_table(["model", "batch", "eager graphopt / TP", "eager-cl graphopt / TP",
                           "onnxruntime graphopt / TP"],
                          [(harness.model_name(model), batch, *(runs.get(k, "-") for k in RUNTIMES))
                           for (model, batch), runs in cells.items()])


class ResidualCNN(nn.Module):
    """A small ResNet-style net for 28x28 inputs: two stages of residual blocks."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()

        def block(c):
            return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                 nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block1, self.block2 = block(width), block(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.block3, self.block4 = block(2 * width), block(2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.block1(x))
        x = F.relu(x + self.block2(x))
        x = self.down(F.max_pool2d(x, 2))
        x = F.relu(x + self.block3(x))
        x = F.relu(x + self.block4(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def trained_residual_cnn(epochs: int) -> nn.Module:
    """The dense Fashion-MNIST model, trained once and cached under bench-results/cache."""
    torch.manual_seed(0)
    return fashion_mnist.cached_model(
        os.path.join("bench-results", "cache", f"residual_cnn-e{epochs}.pt"), ResidualCNN,
        lambda m: fashion_mnist.train_classifier(m, epochs, lr=2e-3, weight_decay=1e-4, one_cycle=True))


def distilled_accuracy(epochs: int, finetune_epochs: float, importance: str, scope: str, lr: float, out: str,
                       schedule: str = "cosine") -> None:
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    model = trained_residual_cnn(epochs)
    x = torch.randn(1, 1, 28, 28)
    dense = graphopt.trace(model, x)
    results = {"dense": harness.accuracy(dense)}
    print(f"dense: {results['dense']:.4f} ({time.perf_counter() - start:.0f} s to train)", flush=True)
    data = lambda: fashion_mnist.batches("train", 128, shuffle=True)  # noqa: E731
    config = DistillConfig(epochs=finetune_epochs, lr=lr, temperature=4.0, alpha=0.7, schedule=schedule)
    macs = {}
    pruned = graphopt.PassManager([PruneChannels(target_macs=0.5, importance=importance, scope=scope)],
                                  context=graphopt.PassContext({"train_data": data})).run(dense)
    macs["graphopt"] = pruned.records[-1].macs / pruned.records[0].macs
    results["graphopt pruned"] = harness.accuracy(pruned.graph)
    distill(pruned.graph, dense, data, config)
    results["graphopt pruned + distill"] = harness.accuracy(pruned.graph)
    try:
        tp_model = torch_pruning_to(model, x, 0.5, [model.head], round_to=None)
        tp_graph = graphopt.trace(tp_model, x)
        macs["torch-pruning"] = tp_graph.analysis("cost").macs / dense.analysis("cost").macs
        results["torch-pruning pruned"] = harness.accuracy(tp_graph)
        distill(tp_graph, dense, data, config)
        results["torch-pruning pruned + distill"] = harness.accuracy(tp_graph)
    except ImportError:
        results["torch-pruning"] = "not installed"
    payload = {"epochs": epochs, "finetune_epochs": finetune_epochs, "importance": importance, "scope": scope,
               "lr": lr, "schedule": schedule, "results": results, "macs": macs,
               "seconds": time.perf_counter() - start}
    print(table(*_accuracy_rows(payload)))
    print(f"MACs kept: {', '.join(f'{k} {v:.3f}' for k, v in macs.items())}")
    harness.write_results(out, payload, accuracy_markdown)
    print(f"wrote {out}")


def _accuracy_rows(payload: dict) -> tuple[list[str], list[tuple]]:
    results = payload["results"]
    return (["model", "top-1", "vs dense (points)"],
            [(k, f"{v:.4f}" if isinstance(v, float) else v,
              f"{100 * (v - results['dense']):+.2f}" if isinstance(v, float) else "-") for k, v in results.items()])


def accuracy_markdown(results: dict) -> str:
    """Top-1 of the dense model, each pruned one and each after distillation; MACs kept."""
    return (markdown_table(*_accuracy_rows(results)) + "\n\nMACs kept: "
            + ", ".join(f"{k} {v:.3f}" for k, v in results["macs"].items())
            + f" ({results['importance']} importance, {results['scope']} scope; distillation "
              f"{results['finetune_epochs']:g} epoch at lr {results['lr']:g}, {results['schedule']} schedule)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--models", default="resnet50,mobilenet_v2,convnext_tiny,vit_b_16")
    s.add_argument("--rounds", type=int, default=15)
    s.add_argument("--round-to", type=int, default=ROUND_TO, help="channel counts kept in multiples of this")
    s.add_argument("--out", default="bench-results/prune_speed.json")
    a = sub.add_parser("accuracy")
    a.add_argument("--epochs", type=int, default=3)
    a.add_argument("--finetune-epochs", type=float, default=1.0)
    a.add_argument("--importance", default="taylor", help="graphopt's criterion (l1, l2, bn_scale, taylor, fpgm)")
    a.add_argument("--scope", default="global", help="uniform or global channel ranking")
    a.add_argument("--lr", type=float, default=3e-3, help="distillation learning rate (both pruners)")
    a.add_argument("--schedule", default="cosine", help="distillation lr schedule: constant or cosine")
    a.add_argument("--out", default="bench-results/prune_accuracy.json")
    args = parser.parse_args()
    if args.what == "speed":
        speed(args.models.split(","), args.rounds, args.out, args.round_to)
    else:
        distilled_accuracy(args.epochs, args.finetune_epochs, args.importance, args.scope, args.lr, args.out,
                           args.schedule)


if __name__ == "__main__":
    main()
