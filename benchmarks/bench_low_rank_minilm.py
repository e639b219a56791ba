"""Low-rank splitting of all-MiniLM-L6-v2 (real weights): similarity scores and latency.

    python -m benchmarks.bench_low_rank_minilm [--targets 0.8 0.6] [--distill-epochs 1]
                                                   [--threads 2] [--rounds 20]
                                                   [--out bench-results/low_rank_minilm.json]

The encoder is traced with symbolic batch and sequence axes; ``split_low_rank`` cuts the
attention projections and FFN Linears to each share of the encoder's MACs (greedy on
reconstruction error per MAC saved), once on the weights alone (plain SVD) and once
data-aware (SVD of the weights whitened by each layer's input statistics on 256
background sentences). For each budget and both variants: WordSim-353, SimLex-999, Lee-50 and
polarity against fp32, as split and after a short distillation (teacher = the fp32
graph, loss 1 - cos on the embeddings, one pass over ~2 000 sentences of gensim's Lee
background corpus, which shares no document with the scored Lee-50); then the
onnxruntime and eager latency of the split encoder over the unsplit one (sequence 128,
batch 1 and 16, medians). Each runtime is timed in its own block, split and unsplit interleaved
round by round, so torch keeps its default OpenMP spin-wait without the spinning threads slowing
an onnxruntime run timed next (OMP_WAIT_POLICY=PASSIVE instead makes every eager op pay a thread
wake-up: the split encoder, with more ops, 1.20x at batch 1 instead of 1.41x).
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile

import torch

from benchmarks import harness
from graphopt import PassContext, PassManager
from graphopt.passes import Distill, SplitLowRank
from graphopt.report import markdown_table, table
from graphopt.tools import minilm

SCORES = minilm.SCORES
SEQ = 128


def _inputs(tokenizer, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = minilm.tokenize(tokenizer, ["word " * (SEQ - 2)] * batch, max_length=SEQ)
    return ids, mask


def split_latency(base, split, tokenizer, threads: int, rounds: int, folder: str) -> dict:
    graphs = {"base": base, "split": split}
    runners = {f"ort {tag}": harness.ort_runner(harness.onnx_file(graph, os.path.join(folder, f"minilm.{tag}.onnx")),
                                                threads) for tag, graph in graphs.items()}
    runners.update({f"eager {tag}": graph.gm for tag, graph in graphs.items()})
    result = {}
    for batch in (1, 16):
        ms = {}
        with torch.inference_mode():   # each runtime in its own block (see the module docstring)
            for runtime in ("ort", "eager"):
                ms.update(harness.latency({k: v for k, v in runners.items() if k.startswith(runtime)},
                                          _inputs(tokenizer, batch), rounds=rounds))
        result[f"b{batch}"] = {"ms": ms, "ort_speedup": ms["ort base"] / ms["ort split"],
                               "eager_speedup": ms["eager base"] / ms["eager split"]}
    return result


VARIANTS = {"svd": {}, "data-aware": {"data_aware": True}}


def split_and_score(base, tokenizer, target: float, variant: str, options: dict, args) -> dict:
    """Split ``base`` to ``target`` of its MACs, score it, distil it, score it again."""
    calibration = minilm.distill_batches(tokenizer)[:8]        # 256 sentences
    split = PassManager([SplitLowRank(target_macs=target, progress=False, **options)],
                        context=PassContext({"calibration_data": calibration})).run(base)
    record = split.records[-1]
    context = PassContext({"train_data": minilm.distill_batches(tokenizer), "teacher": base})
    distilled = PassManager([Distill(epochs=args.distill_epochs, lr=args.lr, loss="cosine", schedule="constant",
                                     progress=False)],
                            context=context).run(split.graph)
    return {"target_macs": target, "variant": variant, "macs_ratio": record.macs / split.records[0].macs,
            "params_ratio": record.params / split.records[0].params, "layers_split": record.stats["split"],
            "ranks": {k: v["rank"] for k, v in record.stats["layers"].items()},
            "scores_split": minilm.scores(split.graph.gm, tokenizer),
            "scores_distilled": minilm.scores(distilled.graph.gm, tokenizer),
            "distill": distilled.records[-1].stats, "graph": distilled.graph}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="*", type=float, default=[0.8, 0.6])
    parser.add_argument("--distill-epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default="bench-results/low_rank_minilm.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer, _ = minilm.load()
    base = minilm.encoder_graph()
    fp32 = minilm.scores(base.gm, tokenizer)
    rows, runs = [("fp32", "1.000", *(f"{fp32[k]:.3f}" for k in SCORES), "", "")], []
    with tempfile.TemporaryDirectory() as folder:
        for target in args.targets:
            for variant, options in VARIANTS.items():
                run = split_and_score(base, tokenizer, target, variant, options, args)
                if variant == "data-aware":
                    run["latency"] = split_latency(base, run.pop("graph"), tokenizer, args.threads, args.rounds, folder)
                    speed = run["latency"]
                    timing = (f"{speed['b1']['ort_speedup']:.2f} / {speed['b16']['ort_speedup']:.2f}",
                              f"{speed['b1']['eager_speedup']:.2f} / {speed['b16']['eager_speedup']:.2f}")
                else:
                    run.pop("graph")
                    timing = ("", "")
                runs.append(run)
                for tag, key in (("", "scores_split"), (" + distill", "scores_distilled")):
                    rows.append((f"{target:g} MACs, {variant}{tag}", f"{run['macs_ratio']:.3f}",
                                 *(f"{run[key][k]:.3f}" for k in SCORES), *(timing if tag else ("", ""))))
    print(f"all-MiniLM-L6-v2, split_low_rank; latency: sequence {SEQ}, {args.threads} threads, "
          f"speed-up over unsplit (batch 1 / 16), median of {args.rounds} interleaved rounds\n")
    print(table(["model", "MACs", "WordSim-353", "SimLex-999", "Lee-50", "polarity", "ORT speed-up",
                 "eager speed-up"], rows))
    harness.write_results(args.out, {"threads": args.threads, "rounds": args.rounds, "seq": SEQ,
                                     "torch": torch.__version__, "machine": platform.machine(),
                                     "cpus": os.cpu_count(), "fp32": fp32, "runs": runs}, markdown)
    print(f"wrote {args.out}")


VARIANT_NAMES = {"svd": "SVD of weights", "data-aware": "data-aware"}


def markdown(results: dict) -> str:
    """The four scores per budget and variant, as split and distilled; the split encoder's speed."""
    fp32 = results["fp32"]
    rows = [("fp32", "1.000", *(f"{fp32[k]:.3f}" for k in SCORES))]
    speed = []
    for run in results["runs"]:
        for tag, key in (("", "scores_split"), (" + distill", "scores_distilled")):
            rows.append((f"{run['target_macs']:g}, {VARIANT_NAMES.get(run['variant'], run['variant'])}{tag}",
                         f"{run['macs_ratio']:.3f}", *(f"{run[key][k]:.3f}" for k in SCORES)))
        if "latency" in run:
            lat = run["latency"]
            speed.append(f"{lat['b1']['ort_speedup']:.2f}x / {lat['b16']['ort_speedup']:.2f}x and "
                         f"{lat['b1']['eager_speedup']:.2f}x / {lat['b16']['eager_speedup']:.2f}x at "
                         f"{run['target_macs']:g} of the MACs ({run['variant']})")
    text = markdown_table(["variant", "MACs", "WordSim-353", "SimLex-999", "Lee-50", "polarity"], rows)
    if speed:
        text += (f"\n\nThe split encoder in onnxruntime and eager torch (sequence {results['seq']}, "
                 f"{results['threads']} threads, speed-up over the unsplit encoder, batch 1 / 16): "
                 + "; ".join(speed) + ".")
    return text


if __name__ == "__main__":
    main()
