"""Prune attention heads and FFN channels of all-MiniLM-L6-v2 (real weights) and report.

    python -m benchmarks.prune_minilm [--heads 0.25] [--ffn 0.3] [--lengths 16,128]
                                          [--no-scores] [--out bench-results/prune_minilm.json]

The encoder is captured by torch.export with symbolic batch and length (graphopt.tools.minilm);
``prune_channels`` removes whole heads (q/k/v rows, output-projection columns; the view sizes
stay ``[B, T, -1, 32]``) and FFN hidden channels, and the PassManager checks the pruned graph
against the original with those channels masked. Reported: heads and FFN width kept, MACs
kept at several sequence lengths (batch 1), the oracle error, and the four MiniLM scores
before and after (no fine-tuning; needs requirements-minilm.txt).
"""
from __future__ import annotations

import argparse
import time

import torch

import graphopt
from benchmarks import harness
from graphopt.passes import PruneChannels
from graphopt.report import markdown_table, table
from graphopt.tools import minilm

LAYERS = 6


def macs_at(gm, length: int) -> int:
    inputs = (torch.ones(1, length, dtype=torch.long), torch.ones(1, length, dtype=torch.long))
    return graphopt.Graph(gm, inputs, captured_by="torch.export").analysis("cost").macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=float, default=0.25, help="share of heads removed in every layer")
    parser.add_argument("--ffn", type=float, default=0.3, help="share of FFN hidden channels removed")
    parser.add_argument("--lengths", default="16,128", help="sequence lengths to count MACs at")
    parser.add_argument("--no-scores", action="store_true", help="skip the (about a minute) MiniLM scores")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench-results/prune_minilm.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer, _ = minilm.load()
    graph = minilm.encoder_graph()
    heads = {f"bert.encoder.layer.{i}.attention.self.query": args.heads for i in range(LAYERS)}
    start = time.perf_counter()
    result = graphopt.PassManager([PruneChannels(ratio=args.ffn, overrides=heads)]).run(graph)
    seconds = time.perf_counter() - start
    record, gm = result.records[1], result.graph.gm
    kept_heads = gm.get_submodule("bert.encoder.layer.0.attention.self.query").out_features // 32
    ffn = gm.get_submodule("bert.encoder.layer.0.intermediate.dense").out_features
    lengths = [int(n) for n in args.lengths.split(",")]
    macs = {n: macs_at(gm, n) / macs_at(graph.gm, n) for n in lengths}
    report = {"heads_removed": args.heads, "ffn_removed": args.ffn, "heads_kept": kept_heads, "ffn_kept": ffn,
              "oracle_error": record.contract_error, "macs_kept": macs,
              "params_kept": record.params / result.records[0].params, "prune_seconds": round(seconds, 1)}
    if not args.no_scores:
        report["scores"] = {"dense": minilm.scores(graph.gm, tokenizer), "pruned": minilm.scores(gm, tokenizer)}
    print(table(*_rows(report)))
    harness.write_results(args.out, report, markdown)
    print(f"wrote {args.out}")


def _rows(report: dict) -> tuple[list[str], list[tuple]]:
    rows = [("heads kept per layer", f"{report['heads_kept']}/12"), ("FFN width kept", f"{report['ffn_kept']}/1536"),
            ("params kept", f"{report['params_kept']:.3f}"),
            ("oracle error (max rel)", f"{report['oracle_error']:.1e}")]
    rows += [(f"MACs kept at length {n}", f"{r:.3f}") for n, r in report["macs_kept"].items()]
    if "scores" in report:
        dense, pruned = report["scores"]["dense"], report["scores"]["pruned"]
        rows += [(f"{k} (dense -> pruned)", f"{dense[k]:.3f} -> {pruned[k]:.3f}") for k in dense]
    return ["all-MiniLM-L6-v2, no fine-tuning", "value"], rows


def markdown(results: dict) -> str:
    """Heads and FFN width kept, MACs kept per sequence length, the oracle error, the scores."""
    return markdown_table(*_rows(results))


if __name__ == "__main__":
    main()
