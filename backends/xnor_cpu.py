"""XNOR-popcount execution of binary layers on the CPU, in numpy (no compiled extension).

For ±1 vectors ``a``, ``w`` of length K packed one bit per value (1 = +1),
``dot(a, w) = K - 2 * popcount(a XOR w)``. A frozen binary layer with binary inputs is then
``alpha[o] * beta[n] * dot + bias[o]``: the weights are packed once into uint64 words and
each call packs the input's signs (for convs: im2col over the zero-padded input, so
padded positions get the same sign, sign(0 - shift), as in the float graph).
``np.bitwise_count`` (numpy >= 2) is the popcount.
"""
from __future__ import annotations

import numpy as np
import torch

from graphopt.quant.binary import BinaryConv2d, BinaryLinear
from graphopt.backends._bitpack import pack_words
from graphopt.errors import ConfigError

CHUNK_BYTES = 1 << 22  # bound on the (rows, out, words) XOR temporary


def xnor_dot(a_words: np.ndarray, w_words: np.ndarray, k: int) -> np.ndarray:
    """(M, W) x (O, W) packed sign vectors -> (M, O) int32 dot products of the ±1 vectors.

    Many rows (conv patches): one XOR + popcount pass per word, accumulated in place, which
    keeps every temporary (M, O) and contiguous. Few rows (a linear layer on a small batch):
    one broadcast (M, O, W) pass, chunked to bound memory."""
    m, o, words = a_words.shape[0], w_words.shape[0], w_words.shape[1]
    if m >= 64:
        acc = np.zeros((m, o), dtype=np.uint16 if words * 64 < 2 ** 16 else np.int32)
        for j in range(words):
            acc += np.bitwise_count(np.bitwise_xor.outer(a_words[:, j], w_words[:, j]))
        return k - 2 * acc.astype(np.int32)
    out = np.empty((m, o), dtype=np.int32)
    step = max(1, CHUNK_BYTES // max(1, o * words * 8))
    for start in range(0, m, step):
        x = np.bitwise_xor(a_words[start:start + step, None, :], w_words[None, :, :])
        out[start:start + step] = np.bitwise_count(x).sum(axis=-1, dtype=np.int32)
    return k - 2 * out


def _check(layer, kind: type) -> None:
    if not isinstance(layer, kind):
        raise ConfigError(f"XNOR path needs a {kind.__name__}, got {type(layer).__name__}")
    if not (layer.frozen and layer.binary_activations):
        raise ConfigError("XNOR path needs a frozen binary layer with binary activations "
                          "(Binarize(activations=True, freeze=True))")


class XnorLinear:
    """A frozen BinaryLinear with binary inputs, run with XOR + popcount."""

    def __init__(self, layer: BinaryLinear):
        _check(layer, BinaryLinear)
        w = layer.weight.detach().float()
        self.k = w.shape[1]
        self.w_words = pack_words((w >= 0).numpy())
        self.alpha = w.abs().amax(dim=1).numpy()
        self.bias = None if layer.bias is None else layer.bias.detach().float().numpy()
        self.shift = layer.shift.detach().float().numpy()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        centred = x - self.shift
        beta = np.abs(centred).mean(axis=-1, keepdims=True)
        dot = xnor_dot(pack_words(centred >= 0), self.w_words, self.k)
        out = dot * self.alpha * beta
        return out + self.bias if self.bias is not None else out


class XnorConv2d:
    """A frozen BinaryConv2d (groups = 1) with binary inputs, as im2col + XOR + popcount."""

    def __init__(self, layer: BinaryConv2d):
        _check(layer, BinaryConv2d)
        if layer.groups != 1:
            raise ConfigError(f"XNOR conv supports groups = 1, got {layer.groups}")
        w = layer.weight.detach().float()
        self.out_channels, self.k = w.shape[0], int(np.prod(w.shape[1:]))
        self.kernel, self.stride = layer.kernel_size, layer.stride
        self.padding, self.dilation = layer.padding, layer.dilation
        self.w_words = pack_words((w >= 0).reshape(w.shape[0], -1).numpy())   # (C, kh, kw) order
        self.alpha = w.abs().amax(dim=(1, 2, 3)).numpy()
        self.bias = None if layer.bias is None else layer.bias.detach().float().numpy()
        self.shift = layer.shift.detach().float().numpy().reshape(1, -1, 1, 1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        beta = np.abs(x - self.shift).mean(axis=(1, 2, 3))
        (ph, pw), (kh, kw), (sh, sw), (dh, dw) = self.padding, self.kernel, self.stride, self.dilation
        # pad x (not x - shift) with zeros, as the float layer does: padding gives sign(-shift)
        bits = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) - self.shift >= 0
        windows = np.lib.stride_tricks.sliding_window_view(bits, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), (2, 3))
        windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]                      # N, C, Ho, Wo, kh, kw
        ho, wo = windows.shape[2], windows.shape[3]
        cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, self.k)
        dot = xnor_dot(pack_words(cols), self.w_words, self.k).reshape(n, ho, wo, self.out_channels)
        out = dot * self.alpha * beta[:, None, None, None]
        if self.bias is not None:
            out = out + self.bias
        return np.ascontiguousarray(out.transpose(0, 3, 1, 2), dtype=np.float32)


def compile_layer(layer) -> XnorConv2d | XnorLinear:
    """The XNOR runner for a frozen binary-activation layer."""
    return XnorConv2d(layer) if isinstance(layer, BinaryConv2d) else XnorLinear(layer)


def run_layer(layer, x: torch.Tensor) -> torch.Tensor:
    """Convenience: run ``layer`` through the XNOR path on a torch tensor."""
    return torch.from_numpy(np.asarray(compile_layer(layer)(x.detach().float().numpy()), dtype=np.float32))
