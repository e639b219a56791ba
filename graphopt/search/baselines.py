"""What a user would get from the usual int8 tool instead: onnxruntime's ``quantize_static``,
plainly and as its documentation recommends (``quant_pre_process`` first). The search shows these
beside its own front, measured the same way on the same data, so its gain is a measurement.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable

import onnx
import torch

ORT_RECIPES = {   # name -> (pre_process, reduce_range)
    "onnxruntime quantize_static": (False, False),
    "onnxruntime quant_pre_process + quantize_static": (True, False),
    "onnxruntime quant_pre_process + quantize_static reduce_range": (True, True),
}


class _Reader:
    """onnxruntime's CalibrationDataReader over batches (a tensor or a tuple of tensors each)."""

    def __init__(self, names: list[str], batches: Iterable):
        self.items = iter([{n: t.cpu().numpy() for n, t in zip(names, b if isinstance(b, tuple) else (b,))}
                           for b in batches])

    def get_next(self):
        return next(self.items, None)


def ort_quantized(fp32_path: str, folder: str, batches, pre_process: bool, reduce_range: bool = False) -> str:
    """onnxruntime's ``quantize_static``: plainly (QDQ, per-channel), or after ``quant_pre_process``
    (QOperator, U8 activations, S8 per-channel weights), then optionally with ``reduce_range``
    (7-bit weights, onnxruntime's setting for CPUs without VNNI). Returns the written file."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folder = os.path.abspath(folder)
    names = [i.name for i in onnx.load(fp32_path, load_external_data=False).graph.input]
    source = fp32_path
    out = os.path.join(folder, ("ort_pre" if pre_process else "ort_plain") + ("_rr" if reduce_range else "")
                       + ".int8.onnx")
    with contextlib.chdir(folder):   # onnxruntime's tools leave scratch files in the working directory
        if pre_process:
            source = os.path.join(folder, "pre.onnx")
            if not os.path.exists(source):   # one pre-processed model for both pre_process recipes
                try:
                    quant_pre_process(fp32_path, source)
                except Exception:   # symbolic shape inference fails on some exports (BERT): ORT's documented way out
                    quant_pre_process(fp32_path, source, skip_symbolic_shape=True)
            quantize_static(source, out, _Reader(names, batches), quant_format=QuantFormat.QOperator,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            reduce_range=reduce_range)
        else:
            quantize_static(source, out, _Reader(names, batches), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=reduce_range)
    return out


def ort_runner(path: str, threads: int):
    """A CPU onnxruntime session on ``path`` returning torch tensors (one, or a tuple)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*inputs):
        outs = session.run(None, {n: x.detach().cpu().numpy() for n, x in zip(names, inputs)})
        outs = tuple(torch.from_numpy(o) for o in outs)
        return outs[0] if len(outs) == 1 else outs
    return run
