"""Prune every torchvision classification model at a channel ratio and check the oracle.

    python -m benchmarks.prune_zoo [--ratio 0.3] [--models a,b] [--out bench-results/prune_zoo.json]

Per model: trace, prune_channels (uniform ratio) under the PassManager (which checks the
pruned graph against the original with the removed channels masked), then report
pruned / blocked (with the reason) / failed. Weights are random (weights=None).
"""
from __future__ import annotations

import argparse
import time
import traceback

import torch
import torchvision
from tqdm.auto import tqdm

import graphopt
from benchmarks import harness
from graphopt.passes import PruneChannels
from graphopt.passes.prune_channels import NothingToPrune
from graphopt.report import markdown_table, table, write_json
from graphopt.tools.random_init import informative_init

# models whose default input is larger than 224 or needs a specific size
INPUT_SIZE = {"inception_v3": 299, "vit_h_14": 224}


def sweep_one(name: str, ratio: float) -> dict:
    torch.manual_seed(0)
    model = informative_init(torchvision.models.get_model(name, weights=None))
    size = INPUT_SIZE.get(name, 224)
    x = torch.randn(1, 3, size, size)
    row = {"model": name}
    start = time.perf_counter()
    try:
        graph = graphopt.trace(model, x)
        result = graphopt.PassManager([PruneChannels(ratio=ratio)]).run(graph)
        rec = result.records[1]
        row.update(status="pruned", groups=rec.stats["groups"], prunable=rec.stats["prunable"],
                   blocked=rec.stats["blocked"], channels_removed=rec.stats["channels_removed"],
                   macs_ratio=rec.macs / result.records[0].macs, params_ratio=rec.params / result.records[0].params,
                   oracle_error=rec.contract_error)
        if rec.stats["channels_removed"] == 0:
            row["status"] = "blocked"
            row["reason"] = "no group large enough to remove a channel"
    except NothingToPrune as exc:
        row.update(status="blocked", reason=str(exc)[:300])
    except Exception as exc:  # a failure is a result of the sweep, recorded with its cause
        row.update(status="failed", reason=f"{type(exc).__name__}: {str(exc)[:300]}",
                   where=traceback.format_exc().splitlines()[-3:])
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--models", help="comma-separated subset (default: all classification models)")
    parser.add_argument("--out", default="bench-results/prune_zoo.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models.split(",") if args.models else torchvision.models.list_models(module=torchvision.models)
    rows = []
    for name in tqdm(names, desc="zoo"):
        rows.append(sweep_one(name, args.ratio))
        write_json(args.out, {"ratio": args.ratio, "rows": rows})  # partial results survive a crash
    print(table(*_rows(rows)))
    pruned = sum(r["status"] == "pruned" for r in rows)
    print(f"\npruned with the oracle passing: {pruned}/{len(rows)} ({pruned / len(rows):.1%})")
    harness.write_results(args.out, {"ratio": args.ratio, "pruned": pruned, "total": len(rows), "rows": rows},
                          markdown)
    print(f"wrote {args.out}")


def _rows(rows: list[dict]) -> tuple[list[str], list[tuple]]:
    return (["model", "status", "groups", "prunable", "MACs kept", "params kept", "oracle err", "s", "reason"],
            [(r["model"], r["status"], r.get("groups", "-"), r.get("prunable", "-"),
              f"{r['macs_ratio']:.2f}" if "macs_ratio" in r else "-",
              f"{r['params_ratio']:.2f}" if "params_ratio" in r else "-",
              f"{r['oracle_error']:.1e}" if "oracle_error" in r else "-", r["seconds"],
              r.get("reason", "")[:70]) for r in rows])


def markdown(results: dict) -> str:
    """The sweep's totals (models pruned with the oracle passing, groups prunable, oracle error
    range), then every model."""
    rows = results["rows"]
    pruned = [r for r in rows if r["status"] == "pruned"]
    errors = [r["oracle_error"] for r in pruned]
    summary = (f"{len(pruned)}/{len(rows)} models pruned at a {results['ratio']:g} channel ratio with the oracle "
               f"passing; {sum(r['prunable'] for r in pruned)} of {sum(r['groups'] for r in pruned)} channel groups "
               "prunable" + (f"; masked-original error {min(errors):.1e} to {max(errors):.1e}" if errors else "")
               + ".")
    return summary + "\n\n" + markdown_table(*_rows(rows))


if __name__ == "__main__":
    main()
