"""Where torch eager spends a pruned ResNet-50's time at batch 1: oneDNN's share and the rest.

    python -m benchmarks.prune_eager_breakdown [--targets 0.5,0.35] [--rounds 20]

Eager NCHW at batch 1 is the one runtime where pruning to half the MACs does not give 1.8x.
This tool says why, from measurements: per variant (dense, and graphopt pruned to each MACs
target at round_to 32) it times a whole call (interleaved medians, 2 threads), sums the
time oneDNN reports for its own primitives (ONEDNN_VERBOSE: convolutions and the reorders
around them; median over calls), and calls the difference "outside oneDNN" (op dispatch,
max-pool, BatchNorm, elementwise ops, torch's own conv kernels). It also times, alone, the convs
torch sends to its im2col kernel instead of oneDNN (torch's rule at batch 1: groups 1, kernel
at most 3x3, input of at most 20480 elements) both ways. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
from typing import Callable

import torch
import torch.nn as nn
import torchvision

import graphopt
from benchmarks import harness
from graphopt.passes import PruneChannels
from graphopt.report import markdown_table, table

THREADS = 2
ROUND_TO = 32
IM2COL_LIMIT = 20480  # torch's use_mkldnn(): below this many input elements, batch-1 convs skip oneDNN


def onednn_ms(run: Callable[[], object], calls: int = 5) -> float:
    """Median milliseconds per call that oneDNN's verbose log attributes to its primitives."""
    per_call = []
    for _ in range(calls):
        with tempfile.TemporaryFile(mode="w+") as log:
            saved = os.dup(1)
            os.dup2(log.fileno(), 1)  # oneDNN writes its log from C++ to the process's stdout
            try:
                with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                    run()
            finally:
                os.dup2(saved, 1)
                os.close(saved)
            log.seek(0)
            per_call.append(sum(float(line.rsplit(",", 1)[1]) for line in log
                                if re.match(r"onednn_verbose,(v\d+,)?primitive,exec,", line)))
    return statistics.median(per_call)


def im2col_convs(module: nn.Module, x: torch.Tensor) -> list[tuple[nn.Conv2d, torch.Tensor]]:
    """The convs torch runs with its own im2col kernel at batch 1, with their inputs."""
    found = []

    def hook(conv, inputs, _):
        inp = inputs[0]
        if (inp.shape[0] == 1 and conv.groups == 1 and max(conv.kernel_size) <= 3
                and inp.numel() <= IM2COL_LIMIT):
            found.append((conv, inp.detach().clone()))
    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        module(x)
    for h in handles:
        h.remove()
    return found


def alone_ms(run: Callable[[], object], calls: int = 50) -> float:
    return harness.latency({"run": run}, rounds=calls, warmup=5)["run"]


def im2col_cost(module: nn.Module, x: torch.Tensor) -> tuple[int, float, float]:
    """(count, ms in torch's kernel, ms forced through oneDNN) for the convs that skip oneDNN."""
    native = forced = 0.0
    convs = im2col_convs(module, x)
    with torch.no_grad():
        for conv, inp in convs:
            native += alone_ms(lambda: conv(inp))
            forced += alone_ms(lambda: torch.mkldnn_convolution(inp, conv.weight, conv.bias, conv.padding,
                                                                conv.stride, conv.dilation, conv.groups))
    return len(convs), native, forced


def breakdown(targets: list[float], rounds: int, out: str) -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    dense = graphopt.trace(torchvision.models.resnet50(weights=None).eval(), x)
    variants = {"dense": (dense.gm, 1.0)}
    for target in targets:
        result = graphopt.PassManager([PruneChannels(target_macs=target, round_to=ROUND_TO)]).run(dense)
        variants[f"pruned {target:g}"] = (result.graph.gm, result.records[-1].macs / result.records[0].macs)

    runners = {name: harness.eager_runner(module) for name, (module, _) in variants.items()}
    latency = harness.latency(runners, (x,), rounds, hot=1)
    rows = []
    for name, (module, macs) in variants.items():
        total = latency[name]
        inside = onednn_ms(lambda run=runners[name]: run(x))
        count, native, forced = im2col_cost(module, x)
        rows.append({"variant": name, "macs": macs, "ms": total, "speedup": latency["dense"] / latency[name],
                     "onednn_ms": inside, "outside_ms": total - inside, "im2col_convs": count,
                     "im2col_native_ms": native, "im2col_onednn_ms": forced})
    print(f"\nResNet-50, torch eager NCHW, batch 1, {THREADS} threads, round_to {ROUND_TO}\n")
    print(table(*_rows(rows)))
    harness.write_results(out, {"threads": THREADS, "round_to": ROUND_TO, "rounds": rounds, "rows": rows}, markdown)
    print(f"wrote {out}")


def _rows(rows: list[dict]) -> tuple[list[str], list[tuple]]:
    dense = rows[0]
    return (["variant", "MACs", "ms", "speed-up", "oneDNN ms (x)", "outside oneDNN ms (x)",
             "torch im2col convs: ms there / in oneDNN"],
            [(r["variant"], f"{r['macs']:.2f}", f"{r['ms']:.1f}", f"{r['speedup']:.2f}",
              f"{r['onednn_ms']:.1f} ({dense['onednn_ms'] / r['onednn_ms']:.2f}x)",
              f"{r['outside_ms']:.1f} ({dense['outside_ms'] / r['outside_ms']:.2f}x)",
              f"{r['im2col_convs']}: {r['im2col_native_ms']:.2f} / {r['im2col_onednn_ms']:.2f}"
              if r["im2col_convs"] else "none") for r in rows])


def markdown(results: dict) -> str:
    """Time per call, oneDNN's share and the rest, and the convs torch keeps from oneDNN, per variant."""
    return (f"ResNet-50, torch eager NCHW, batch 1, {results['threads']} threads, round_to {results['round_to']}, "
            f"median of {results['rounds']} interleaved rounds:\n\n" + markdown_table(*_rows(results["rows"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.5,0.35", help="MACs targets to prune to, comma separated")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default="bench-results/prune_eager_breakdown.json")
    args = parser.parse_args()
    breakdown([float(t) for t in args.targets.split(",")], args.rounds, args.out)


if __name__ == "__main__":
    main()
