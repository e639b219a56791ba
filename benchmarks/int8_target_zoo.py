"""int8 exports of torchvision models per target, checked as a VNNI CPU and as a non-VNNI x86 CPU
would check them, on any machine.

    python -m benchmarks.int8_target_zoo [--models squeezenet1_0,alexnet,...] [--targets x86-vnni,x86-avx2]
                                             [--size 112] [--prune 0] [--out bench-results/int8_target_zoo.json]

Per model and target: fold BatchNorm, (optionally) prune channels to ``--prune`` of the MACs,
calibrate and insert Q/DQ for the target, fold, lower to QOperator ONNX, and evaluate that file in
onnx's reference evaluator twice: in exact int32 arithmetic (what VNNI and ARM kernels compute)
and with u8 x s8 products added in pairs in a saturating int16 (``vpmaddubsw``, what AVX2 kernels
compute). The column is the share of quantized values within one step of the simulated-quant
graph, layer by layer; the export's own check refuses below 99%. Random informative weights
(tools/random_init): saturation depends on the ranges, which calibration sets either way.
"""
from __future__ import annotations

import argparse
import time

import torch

DEFAULT_MODELS = "mobilenet_v2,mobilenet_v3_large,efficientnet_b0,shufflenet_v2_x1_0,squeezenet1_0,alexnet,resnet18"


def int8_graph(name: str, target: str, size: int, prune: float):
    import torchvision

    import graphopt
    from graphopt import PassContext, PassManager
    from graphopt.passes import FoldBatchNorm, FoldQDQ, InsertQDQ, PruneChannels, RemoveIdentity
    from graphopt.tools.random_init import informative_init

    torch.manual_seed(0)
    model = informative_init(torchvision.models.get_model(name, weights=None))
    graph = graphopt.trace(model, torch.randn(1, 3, size, size))
    data = [torch.randn(4, 3, size, size) for _ in range(4)]
    passes = [FoldBatchNorm(), RemoveIdentity()]
    if prune:
        passes.append(PruneChannels(target_macs=prune))
    passes += [InsertQDQ(progress=False, target=target, max_batches=4), FoldQDQ()]
    return PassManager(passes, verify=False, context=PassContext({"calibration_data": data})).run(graph).graph


def main() -> None:
    from benchmarks import harness
    from graphopt.backends import onnx_int8
    from graphopt.report import table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    harness.add_targets_option(parser, "each model exported once per target")
    parser.add_argument("--size", type=int, default=112, help="input height and width")
    parser.add_argument("--prune", type=float, default=0.0, help="prune to this share of the MACs first (0: no)")
    parser.add_argument("--out", default="bench-results/int8_target_zoo.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name in args.models.split(","):
        for target in args.targets:
            started = time.perf_counter()
            row = {"model": name, "target": target}
            try:
                graph = int8_graph(name, target, args.size, args.prune)
                row["exact"] = round(onnx_int8.reference_check(graph)[0], 4)
                share, worst = onnx_int8.reference_check(graph, pairwise_int16=True)
                row["non-VNNI x86"] = round(share, 4)
                row["passes on non-VNNI x86"] = "yes" if share >= 0.99 else f"no (worst at {worst})"
            except Exception as exc:   # a sweep reports every model; the message says what failed
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            row["s"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            print(row, flush=True)
    headers = ["model", "target", "exact", "non-VNNI x86", "passes on non-VNNI x86", "error", "s"]
    print(table(headers, [[row.get(h, "") for h in headers] for row in rows]))
    harness.write_results(args.out, {"size": args.size, "prune": args.prune, "rows": rows}, markdown)
    print(f"wrote {args.out}")


def _share(value: float) -> str:
    text = "100%" if value == 1 else f"{value:.2%}"
    return text if value >= 0.99 else f"{text} (refused)"


def markdown(results: dict) -> str:
    """Per model and target: share of quantized values within one step, in exact int32 arithmetic
    and as a non-VNNI x86 CPU computes; the models the sweep could not check, with why."""
    from benchmarks import harness
    from graphopt.report import markdown_table

    targets = list(dict.fromkeys(r["target"] for r in results["rows"]))
    cells, failed = {}, {}
    for r in results["rows"]:
        if "error" in r:
            failed.setdefault(r["model"], r["error"])
        else:
            cells.setdefault(r["model"], {})[r["target"]] = (_share(r["exact"]), _share(r["non-VNNI x86"]))
    text = markdown_table(["model"] + [f"`{t}` {how}" for t in targets for how in ("exact", "on non-VNNI x86")],
                          [[harness.model_name(m)] + [c for t in targets for c in got.get(t, ("-", "-"))]
                           for m, got in cells.items() if m not in failed])
    if failed:
        text += "\n\nNot checked: " + "; ".join(f"{harness.model_name(m)} ({e})" for m, e in failed.items()) + "."
    return text


if __name__ == "__main__":
    main()
