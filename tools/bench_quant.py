"""Int8 speed benchmark: graphopt's int8 backends against fp32 and the usual int8 recipes.

    python -m graphopt.tools.bench_quant [--models resnet18,resnet50,mobilenet_v2] [--batches 1,16]
                                         [--threads 2] [--out bench-results/quant.json]

Per model and batch size, every runtime runs in one process, interleaved (A, B, C, ... repeated),
medians reported as ratios over onnxruntime fp32. Thread counts are fixed (torch and
onnxruntime) and onnxruntime's thread spinning is off so it does not slow the torch runs.
torch's OpenMP threads keep spin-waiting between ops, as by default, but stop after about a
millisecond idle (GOMP_SPINCOUNT=20000; the default spins for ~10 ms after each torch run
and slowed the onnxruntime run timed next by a third on MobileNetV2, while
OMP_WAIT_POLICY=PASSIVE makes every torch op pay a thread wake-up: MobileNetV2's eager batch-1
time 2.7x). Each timed run follows an untimed run of the same column (steady state).
Columns: torch eager fp32; onnxruntime fp32; onnxruntime ``quantize_static`` called plainly
(QDQ, per-channel); onnxruntime ``quant_pre_process`` then ``quantize_static`` (QOperator,
U8 activations, S8 weights, per-channel); torch.ao FX int8 (x86); graphopt TorchScript int8;
graphopt ONNX int8. Weights are random (torchvision ``weights=None``): speed does not depend on them.
``minilm`` is all-MiniLM-L6-v2 with its real weights at sequence length 128 (requirements-minilm.txt;
its torch.ao column is torch's dynamic int8, since torch.fx cannot trace BERT).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import sys
import tempfile
import warnings

import onnx
import onnxruntime as ort
import torch
import torchvision

import graphopt
from graphopt import PassContext, PassManager
from graphopt.backends import onnx as onnx_backend
from graphopt.backends import onnx_int8, torchscript_int8
from graphopt.passes import FoldBatchNorm, FoldQDQ, InsertQDQ, RemoveIdentity
from graphopt.latency import interleaved_latency
from graphopt.report import table, write_json

TARGETS = {"resnet50": 3.3, "mobilenet_v2": 2.1}
COLUMNS = ["eager fp32", "ORT fp32", "ORT quantize_static plain", "ORT pre_process+quantize_static",
           "torch.ao FX int8", "graphopt TorchScript int8", "graphopt ONNX int8"]


def ort_runner(path: str, threads: int):
    sess = onnx_backend.ort_session(path, threads)
    return lambda *inputs: onnx_backend.run_onnx(sess, inputs)


def torch_runner(module):
    def run(*inputs):
        with torch.no_grad():
            return module(*inputs)
    return run


class _Reader:
    """onnxruntime CalibrationDataReader over a list of batches (a tensor or a tuple of tensors each)."""

    def __init__(self, names: list[str], batches):
        self.items = iter([{n: t.numpy() for n, t in zip(names, b if isinstance(b, tuple) else (b,))}
                           for b in batches])

    def get_next(self):
        return next(self.items, None)


def ort_quantized(fp32_path: str, folder: str, batches, pre_process: bool) -> str:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    names = [i.name for i in onnx.load(fp32_path, load_external_data=False).graph.input]
    source = fp32_path
    out = os.path.join(folder, "ort_pre.int8.onnx" if pre_process else "ort_plain.int8.onnx")
    with contextlib.chdir(folder):   # onnxruntime's tools leave scratch files in the working directory
        if pre_process:
            source = os.path.join(folder, "pre.onnx")
            try:
                quant_pre_process(fp32_path, source)
            except Exception:   # symbolic shape inference fails on some exports (BERT): ORT's documented way out
                quant_pre_process(fp32_path, source, skip_symbolic_shape=True)
            quantize_static(source, out, _Reader(names, batches), quant_format=QuantFormat.QOperator,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
        else:
            quantize_static(source, out, _Reader(names, batches), quant_format=QuantFormat.QDQ, per_channel=True)
    return out


def torch_ao_fx(model, x, batches):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
    with torch.no_grad():
        for b in batches:
            prepared(b)
    return torch.jit.script(convert_fx(prepared))


def fp32_onnx(model, x, path: str) -> None:
    """torch.onnx (dynamo) with a dynamic batch dimension, not simplified: what a user starts from."""
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(model, (x,), dynamo=True, opset_version=18, external_data=False, verbose=False,
                                    dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=256)}})
    program.save(path)


def build(model_name: str, folder: str, threads: int, calib_batches: int):
    """Every runtime's artifact for one model; returns (runners by column, file sizes)."""
    model = torchvision.models.get_model(model_name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    batches = [torch.randn(8, 3, 224, 224) for _ in range(calib_batches)]
    raw = graphopt.trace(model, x)
    fp32_path = os.path.join(folder, "fp32.onnx")
    fp32_onnx(model, x, fp32_path)
    folded = PassManager([FoldBatchNorm(), RemoveIdentity()]).run(raw).graph
    ao = torch_ao_fx(model, x, batches)
    ao_path = os.path.join(folder, "torch_ao.pt")
    torch.jit.save(ao, ao_path)
    runners, sizes, info = int8_columns(folded, fp32_path, folder, batches, threads, model, ao)
    sizes["torch.ao FX int8"] = os.path.getsize(ao_path)
    return runners, sizes, info


def int8_columns(graph, fp32_path: str, folder: str, batches, threads: int, eager, torch_int8):
    """Every column's runner from the float graph (quantized here by graphopt), its fp32 ONNX file
    (quantized by onnxruntime's two recipes), the eager model and torch's int8 model."""
    int8 = PassManager([InsertQDQ(progress=False), FoldQDQ()], verify=False,
                       context=PassContext({"calibration_data": batches})).run(graph).graph
    paths = {"ORT fp32": fp32_path,
             "ORT quantize_static plain": ort_quantized(fp32_path, folder, batches, False),
             "ORT pre_process+quantize_static": ort_quantized(fp32_path, folder, batches, True),
             "graphopt ONNX int8": os.path.join(folder, "graphopt.int8.onnx"),
             "graphopt TorchScript int8": os.path.join(folder, "graphopt.int8.pt")}
    onnx_report = onnx_int8.export(int8, paths["graphopt ONNX int8"], threads=threads)
    ts_report = torchscript_int8.export(int8, paths["graphopt TorchScript int8"])
    runners = {"eager fp32": torch_runner(eager), "torch.ao FX int8": torch_runner(torch_int8),
               "graphopt TorchScript int8": torch_runner(torch.jit.load(paths["graphopt TorchScript int8"]))}
    for column in ("ORT fp32", "ORT quantize_static plain", "ORT pre_process+quantize_static", "graphopt ONNX int8"):
        runners[column] = ort_runner(paths[column], threads)
    sizes = {c: os.path.getsize(p) for c, p in paths.items()}
    info = {"onnx_int8": onnx_report.details, "torchscript_int8": ts_report.details}
    return {c: runners[c] for c in COLUMNS}, sizes, info


def build_minilm(folder: str, threads: int, calib_batches: int):
    """The same columns for all-MiniLM-L6-v2 (sequence 128). torch.fx cannot trace Hugging Face
    BERT, so the torch.ao column is torch's dynamic int8 (``quantize_dynamic``), the recipe torch
    offers for transformers."""
    from graphopt.tools import minilm

    tokenizer, encoder = minilm.load()
    graph = minilm.encoder_graph()
    batches = [tuple(b[0]) for b in minilm.distill_batches(tokenizer, batch_size=16)[:calib_batches]]
    fp32_path = os.path.join(folder, "fp32.onnx")
    onnx_backend.export(graph, fp32_path, simplify=False, tolerance=1e-3)
    dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(encoder), {torch.nn.Linear}, dtype=torch.qint8)
    runners, sizes, info = int8_columns(graph, fp32_path, folder, batches, threads, encoder, dynamic)
    info["torch.ao column"] = "torch.ao quantize_dynamic (eager): torch.fx cannot trace BERT"
    torch.save(dynamic.state_dict(), os.path.join(folder, "torch_dynamic.pt"))
    sizes["torch.ao FX int8"] = os.path.getsize(os.path.join(folder, "torch_dynamic.pt"))
    inputs = lambda batch: minilm.tokenize(tokenizer, ["word " * 126] * batch, max_length=128)
    return runners, sizes, info, inputs


def _image(batch: int) -> tuple:
    return (torch.randn(batch, 3, 224, 224),)


def measure(runners: dict, inputs: tuple, rounds: int) -> dict[str, float]:
    """Median ms per run of each column, interleaved, each timed run right after an untimed one
    of the same column (see the module docstring)."""
    times = interleaved_latency({c: (lambda run=run: run(*inputs)) for c, run in runners.items()}, rounds,
                                warmup=1, hot=1)
    return {c: 1e3 * v for c, v in times.items()}


def _short_openmp_spin() -> None:
    """Re-run this process with torch's OpenMP spin-wait cut to about a millisecond (see the
    module docstring); it must be set before torch loads."""
    if os.environ.get("GOMP_SPINCOUNT") is None:
        os.environ["GOMP_SPINCOUNT"] = "20000"
        os.execv(sys.executable, [sys.executable, "-m", "graphopt.tools.bench_quant", *sys.argv[1:]])


def main() -> None:
    _short_openmp_spin()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,minilm")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds at batch 1 (fewer at larger batch)")
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--columns", default=",".join(COLUMNS),
                        help="comma-separated subset of columns to time (ORT fp32 is always timed)")
    parser.add_argument("--out", default="bench-results/quant.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    results = {"threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
               "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
               "torch": torch.__version__, "onnxruntime": ort.__version__,
               "machine": platform.machine(), "cpus": os.cpu_count(), "models": {}}
    rows, size_rows = [], []
    for model_name in args.models.split(","):
        with tempfile.TemporaryDirectory() as folder:
            if model_name == "minilm":
                runners, sizes, info, make_inputs = build_minilm(folder, args.threads, args.calib_batches)
            else:
                runners, sizes, info = build(model_name, folder, args.threads, args.calib_batches)
                make_inputs = _image
            entry = {"sizes": sizes, "export": info, "batches": {}}
            wanted = {"ORT fp32", *args.columns.split(",")}
            unknown = wanted - set(COLUMNS)
            if unknown:
                raise SystemExit(f"unknown columns {sorted(unknown)}; columns: {', '.join(COLUMNS)}")
            runners = {c: r for c, r in runners.items() if c in wanted}
            for batch in (int(b) for b in args.batches.split(",")):
                rounds = max(3, args.rounds // max(1, batch // 4))
                ms = measure(runners, make_inputs(batch), rounds)
                base = ms["ORT fp32"]
                ratios = {c: base / v for c, v in ms.items()}
                entry["batches"][batch] = {"median_ms": ms, "speedup_over_ort_fp32": ratios, "rounds": rounds}
                rows.append([model_name, batch] + [f"{ratios[c]:.2f}x" if c in ratios else "-" for c in COLUMNS]
                            + [f"{base:.1f}"])
            target = TARGETS.get(model_name)
            if target:
                got = entry["batches"][int(args.batches.split(",")[0])]["speedup_over_ort_fp32"]["graphopt ONNX int8"]
                entry["target"] = {"speedup": target, "met": got >= target}
            entry["onnx_int8_size_share"] = sizes["graphopt ONNX int8"] / sizes["ORT fp32"]
            size_rows.append([model_name] + [f"{sizes[c] / 1e6:.1f}" for c in sizes] +
                             [f"{entry['onnx_int8_size_share']:.1%}"])
            results["models"][model_name] = entry
            print(f"{model_name}: graphopt ONNX int8 form={info['onnx_int8']['form']}, int8 MAC share "
                  f"{info['onnx_int8']['int8_mac_share']:.1%}, layerwise within one step "
                  f"{info['onnx_int8']['within_one_step']:.4%}", flush=True)
    print(f"\nspeed-up over onnxruntime fp32 (median, interleaved, {args.threads} threads; higher is faster)\n")
    print(table(["model", "batch"] + COLUMNS + ["ORT fp32 ms"], rows))
    print("\nfile sizes (MB)\n")
    print(table(["model"] + list(sizes) + ["graphopt int8 / fp32"], size_rows))
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
