"""``graphopt compress`` on real models and data: what the search finds for a latency goal and a
size goal, against onnxruntime fp32, onnxruntime's int8 recipes and NNCF-style accuracy control,
all measured in the same run.

    python -m benchmarks.bench_compress [--models fashion_cnn,mobilenet_v2] [--objectives latency,size]
                                            [--minutes 15] [--trials 40] [--out bench-results/compress.json]

Models (Debian's dataset-fashion-mnist; MobileNetV2's weights from requirements-bench.txt):
- ``fashion_cnn``: the residual Fashion-MNIST CNN with its committed weights
  (tools/examples/fashion_cnn.pt); top-1 on the 10 000 test images; calibration and distillation
  on the training images.
- ``mobilenet_v2``: torchvision's MobileNetV2 with its real ImageNet weights and a linear head
  (logistic regression on its fp32 features of 5 000 Fashion-MNIST training images, 64 px RGB,
  as in quant_accuracy); top-1 on 2 000 test images; calibration and distillation on 8 000
  other training images.

Goal: at most 1 point of top-1 lost; objective onnxruntime latency at batch 1 (2 threads), or
size on disk. The latency factors are read from the search's final side-by-side timing
(original fp32 ONNX, the chosen artifact, accuracy control, each onnxruntime recipe). "ORT best
int8" is the fastest onnxruntime recipe whose drop is within the goal (the fastest overall if
none is). Results: the JSON file, a Markdown table beside it, and each search's report and plots
under bench-results/compress/.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import torch.nn as nn

from benchmarks import harness
from graphopt.report import markdown_table, table
from graphopt.search import compress
from graphopt.tools import fashion_mnist

TARGET_SPEEDUP_VS_ORT_INT8 = 1.5
TARGET_SMALLER = 20.0
TARGET_MINUTES_CNN = 15.0


def fashion_cnn_task() -> dict:
    from graphopt.tools.fashion_cnn import trained_fashion_cnn

    return {"model": trained_fashion_cnn(), "example": torch.randn(1, 1, 28, 28),
            "eval_data": lambda: fashion_mnist.test_batches(256),
            "data": fashion_mnist.shuffled_epochs(128)}


def mobilenet_task() -> dict:
    from sklearn.linear_model import LogisticRegression

    from benchmarks.quant_accuracy import fashion_rgb, mobilenet_v2

    model = mobilenet_v2()
    backbone = nn.Sequential(model.features, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    _, train_y = fashion_mnist.load("train")
    _, test_y = fashion_mnist.load("test")
    fit_x = fashion_rgb("train", 5000)
    with torch.no_grad():
        features = torch.cat([backbone(p) for p in fit_x.split(250)]).numpy()
    probe = LogisticRegression(max_iter=2000, C=1.0).fit(features, train_y[:5000].numpy())
    head = nn.Linear(features.shape[1], 10)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(probe.coef_).float())
        head.bias.copy_(torch.from_numpy(probe.intercept_).float())
    net = nn.Sequential(model.features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()
    test_x, test_labels = fashion_rgb("test", 2000), test_y[:2000]
    train_x, train_labels = fashion_rgb("train", 8000, offset=10000), train_y[10000:18000]

    def batches(x, y, size):
        return lambda: ((x[i:i + size], y[i:i + size]) for i in range(0, len(y), size))
    return {"model": net, "example": torch.randn(1, 3, 64, 64), "eval_data": batches(test_x, test_labels, 250),
            "data": batches(train_x, train_labels, 64)}


TASKS = {"fashion_cnn": fashion_cnn_task, "mobilenet_v2": mobilenet_task}


def summarise(name: str, objective: str, result, minutes: float) -> dict:
    lat = result.latency
    original_ms = lat.get("original", result.original.latency_ms)
    ort = []
    for b in result.baselines:
        ms = lat.get(b.name, b.latency_ms)
        ort.append({"name": b.name, "metric": b.metric, "drop": result.original.metric - b.metric, "ms": ms,
                    "bytes": b.size_bytes})
    within = [b for b in ort if b["ms"] and b["drop"] <= result.allowed_drop]
    best = min(within or [b for b in ort if b["ms"]], key=lambda b: b["ms"], default=None)
    row = {"model": name, "objective": objective, "original_metric": result.original.metric,
           "original_ms": original_ms, "fp32_file_bytes": result.fp32_file_bytes, "trials": len(result.trials),
           "search_minutes": round(minutes, 2), "stopped_by": result.stopped_by, "ort": ort,
           "ort_best": best, "report": result.report}
    for key, item in (("chosen", result.chosen), ("accuracy_control", result.accuracy_control)):
        if item is None:
            row[key] = None
            continue
        ms = lat.get(f"trial {item.number}", item.latency_ms)
        row[key] = {"recipe": item.recipe.label(), "backend": item.backend, "metric": item.metric,
                    "drop": item.drop, "ms": ms, "bytes": item.size_bytes,
                    "speedup_vs_ort_fp32": original_ms / ms if ms and objective == "latency" else None,
                    # a size goal's candidates run from the packed file in torch: no ratio to onnxruntime
                    "speedup_vs_ort_best_int8": best["ms"] / ms if ms and best and objective == "latency" else None,
                    "smaller_than_fp32_file": result.fp32_file_bytes / item.size_bytes if item.size_bytes else None}
    chosen = row["chosen"]
    if objective == "latency":
        row["target"] = f">= {TARGET_SPEEDUP_VS_ORT_INT8}x ORT best int8 at <= 1 point"
        row["met"] = bool(chosen and chosen["speedup_vs_ort_best_int8"]
                          and chosen["speedup_vs_ort_best_int8"] >= TARGET_SPEEDUP_VS_ORT_INT8)
    else:
        row["target"] = f">= {TARGET_SMALLER}x smaller than the fp32 file at <= 1 point"
        row["met"] = bool(chosen and chosen["smaller_than_fp32_file"] >= TARGET_SMALLER)
    return row


def _f(value, fmt=".2f", suffix="") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def markdown(results: dict) -> str:
    """What the search chose per model and goal against the original and onnxruntime's recipes;
    then accuracy control and onnxruntime's best int8 recipe beside it."""
    chosen, others = [], []
    for r in results["rows"]:
        c, a, b = r["chosen"] or {}, r["accuracy_control"] or {}, r["ort_best"] or {}
        chosen.append((harness.model_name(r["model"]), r["objective"], c.get("recipe", "none within the drop"),
                       _f(-c["drop"] if c else None, "+.2f"), _f(c.get("speedup_vs_ort_fp32"), ".2f", "x"),
                       _f(c.get("speedup_vs_ort_best_int8"), ".2f", "x"),
                       _f(c.get("smaller_than_fp32_file"), ".1f", "x"), r["trials"], f"{r['search_minutes']:.1f}",
                       "met" if r["met"] else "missed"))
        others.append((harness.model_name(r["model"]), r["objective"],
                       f"{_f(-a['drop'] if a else None, '+.2f')} / {_f(a.get('speedup_vs_ort_fp32'), '.2f', 'x')} / "
                       f"{_f(a.get('smaller_than_fp32_file'), '.1f', 'x')}",
                       f"{b.get('name', '-')}: {_f(-b['drop'] if b else None, '+.2f')} / {_f(b.get('ms'), '.3f')}",
                       r["target"]))
    return (markdown_table(["model", "goal", "chosen", "top-1 change", "vs ORT fp32", "vs ORT best int8",
                            "smaller than fp32 file", "trials", "min", "target"], chosen)
            + "\n\n" + markdown_table(["model", "goal", "accuracy control: change / vs ORT fp32 / smaller",
                                         "ORT best int8: change / ms", "target"], others))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="fashion_cnn,mobilenet_v2")
    parser.add_argument("--objectives", default="latency,size")
    parser.add_argument("--minutes", type=float, default=15.0, help="search budget per model and objective")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--finetune-batches", type=int, default=200)
    parser.add_argument("--out", default="bench-results/compress.json")
    parser.add_argument("--resume", action="store_true",
                        help="continue each search's study in its folder (its candidates are not built again)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    folder = os.path.join(os.path.dirname(args.out) or ".", "compress")
    rows = []
    for name in args.models.split(","):
        task = TASKS[name]()
        for objective in args.objectives.split(","):
            started = time.perf_counter()
            result = compress(task["model"], task["example"], evaluate="top1", eval_data=task["eval_data"],
                              data=task["data"], out_dir=os.path.join(folder, f"{name}-{objective}"),
                              goal={"max_drop": 1.0, "objective": objective, "runtime": "onnxruntime",
                                    "batch_size": 1, "threads": 2, "max_minutes": args.minutes,
                                    "max_trials": args.trials},
                              finetune_batches=args.finetune_batches, resume=args.resume)
            rows.append(summarise(name, objective, result, (time.perf_counter() - started) / 60))
            print(result.summary(), flush=True)
            text = harness.write_results(args.out, {"threads": 2, "batch_size": 1, "max_drop": 1.0, "rows": rows},
                                         markdown)
    print(text)
    print(table(["model", "objective", "target", "met"], [(r["model"], r["objective"], r["target"], r["met"])
                                                         for r in rows]))


if __name__ == "__main__":
    main()
