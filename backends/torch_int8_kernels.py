"""The one adapter over torch's int8 kernels (``torch.ao.nn.quantized``, ``torch.ops.quantized``).

These APIs are deprecated upstream; nothing else in graphopt touches them, so a torch upgrade
that moves or drops them changes this file only. Activations are quint8 (what torch's x86
conv/linear kernels take), weights qint8 per output channel.
"""
from __future__ import annotations

import warnings
from typing import List

import torch
import torch.nn as nn

ENGINE = "x86"


def use_engine() -> str:
    """Select the x86 engine (fbgemm + onednn, VNNI kernels) when this torch build has it."""
    engines = torch.backends.quantized.supported_engines
    engine = ENGINE if ENGINE in engines else ("fbgemm" if "fbgemm" in engines else engines[-1])
    torch.backends.quantized.engine = engine
    return engine


def quantize(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)


def dequantize(x: torch.Tensor) -> torch.Tensor:
    return x.dequantize()


def add(a: torch.Tensor, b: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return torch.ops.quantized.add(a, b, scale, zero_point)


def cat(tensors: List[torch.Tensor], dim: int, scale: float, zero_point: int) -> torch.Tensor:
    return torch.ops.quantized.cat(tensors, dim, scale, zero_point)


def _qweight(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    zeros = torch.zeros(len(scales), dtype=torch.int64)
    return torch._make_per_channel_quantized_tensor(q, scales.double(), zeros, 0)


def conv(q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, groups: int,
         scale: float, zero_point: int) -> nn.Module:
    """A quantized Conv1d/Conv2d module (int8 weight ``q`` with per-channel ``scales``, float bias)."""
    import torch.ao.nn.quantized as nnq

    cls = {3: nnq.Conv1d, 4: nnq.Conv2d}[q.dim()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = cls(q.shape[1] * groups, q.shape[0], tuple(q.shape[2:]), stride=stride, padding=padding,
                     dilation=dilation, groups=groups, bias=bias is not None)
        module.set_weight_bias(_qweight(q, scales), None if bias is None else bias.detach().float())
    module.scale, module.zero_point = float(scale), int(zero_point)
    return module


def linear(q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, scale: float,
           zero_point: int) -> nn.Module:
    import torch.ao.nn.quantized as nnq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = nnq.Linear(q.shape[1], q.shape[0], bias_=bias is not None)
        module.set_weight_bias(_qweight(q, scales), None if bias is None else bias.detach().float())
    module.scale, module.zero_point = float(scale), int(zero_point)
    return module


class LinearFloatOutput(nn.Module):
    """int8 input (quantized here with fixed parameters), int8 per-channel weight, float output:
    FBGEMM's fused kernel, for Linears whose output the IR leaves unquantized (transformers)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, scale: float,
                 zero_point: int):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.packed = torch.ops.quantized.linear_prepack(
                _qweight(q, scales), None if bias is None else bias.detach().float())
        self.scale, self.zero_point = float(scale), int(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x, self.scale, self.zero_point, self.packed)


def linear_float_output(q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, scale: float,
                        zero_point: int) -> nn.Module:
    return LinearFloatOutput(q, scales, bias, scale, zero_point)
