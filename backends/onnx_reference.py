"""Exact integer evaluation of int8 ONNX models, independent of the CPU that runs graphopt.

onnxruntime computes an int8 model with this CPU's kernels; a model built for another target
(full-range weights checked on a CPU whose kernels saturate them) cannot be checked that way.
onnx's reference evaluator follows the ONNX specification in numpy (int32 sums, no saturation):
with the four onnxruntime contrib ops the QOperator form uses, it runs every model the int8
backend writes.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun


def _deq(x, scale, zero_point):
    return (x.astype(np.float64) - np.asarray(zero_point, np.float64)) * np.asarray(scale, np.float64)


def _q(y, scale, zero_point):
    info = np.iinfo(np.asarray(zero_point).dtype)
    codes = np.rint(y / np.float64(np.asarray(scale, np.float32))) + np.asarray(zero_point, np.float64)
    return np.clip(codes, info.min, info.max).astype(np.asarray(zero_point).dtype)


class QLinearAdd(OpRun):
    op_domain = "com.microsoft"

    def _run(self, a, a_scale, a_zp, b, b_scale, b_zp, c_scale, c_zp):
        return (_q(_deq(a, a_scale, a_zp) + _deq(b, b_scale, b_zp), c_scale, c_zp),)


class QGemm(OpRun):
    op_domain = "com.microsoft"

    def _run(self, a, a_scale, a_zp, b, b_scale, b_zp, c=None, y_scale=None, y_zp=None, alpha=1.0, transA=0,
             transB=0):
        a = a.astype(np.int64) - np.asarray(a_zp, np.int64)
        b_zp = np.asarray(b_zp, np.int64)
        if b_zp.ndim:   # per output channel: rows of B when it is transposed, columns otherwise
            b_zp = b_zp.reshape(-1, 1) if transB else b_zp.reshape(1, -1)
        b = b.astype(np.int64) - b_zp
        acc = (a.T if transA else a) @ (b.T if transB else b)
        if c is not None:
            acc = acc + c.astype(np.int64)
        y = acc.astype(np.float64) * np.float64(alpha) * np.asarray(a_scale, np.float64) * \
            np.asarray(b_scale, np.float64)
        return (y.astype(np.float32) if y_scale is None else _q(y, y_scale, y_zp),)


class QLinearGlobalAveragePool(OpRun):
    op_domain = "com.microsoft"

    def _run(self, x, x_scale, x_zp, y_scale, y_zp, channels_last=0):
        axes = tuple(range(1, x.ndim - 1)) if channels_last else tuple(range(2, x.ndim))
        return (_q(_deq(x, x_scale, x_zp).mean(axis=axes, keepdims=True), y_scale, y_zp),)


class QLinearConcat(OpRun):
    op_domain = "com.microsoft"

    def _run(self, y_scale, y_zp, *triples, axis=0):
        parts = [_deq(*triples[i:i + 3]) for i in range(0, len(triples), 3)]
        return (_q(np.concatenate(parts, axis=axis), y_scale, y_zp),)


CONTRIB_OPS = [QLinearAdd, QGemm, QLinearGlobalAveragePool, QLinearConcat]


# -- x86 without VNNI, emulated: u8 x s8 products added in pairs in a saturating int16 ----------
def _pairwise_int16_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for u8 ``a`` [..., K] and s8 ``b`` [K, M] as ``vpmaddubsw`` + ``vpmaddwd`` compute
    it: products of neighbouring k added in pairs and clipped to int16, then summed in int32."""
    k = a.shape[-1]
    if k % 2:
        a = np.concatenate([a, np.zeros((*a.shape[:-1], 1), a.dtype)], axis=-1)
        b = np.concatenate([b, np.zeros((1, b.shape[1]), b.dtype)], axis=0)
    a, b = a.astype(np.int32), b.astype(np.int32)
    pairs = a[..., 0::2, None] * b[0::2] + a[..., 1::2, None] * b[1::2]
    return np.clip(pairs, -32768, 32767).sum(axis=-2)


class SaturatingQLinearConv(OpRun):
    """QLinearConv (2-D, uint8 input, int8 weight with zero point 0) on non-VNNI x86 arithmetic."""

    op_domain = ""

    def _run(self, x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias=None, auto_pad=None, dilations=None,
             group=None, kernel_shape=None, pads=None, strides=None):
        n, c, h, wd = x.shape
        m, cg, kh, kw = w.shape
        groups, (sh, sw), (dh, dw) = group or 1, strides or (1, 1), dilations or (1, 1)
        pt, pl, pb, pr = pads or (0, 0, 0, 0)
        padded = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=np.asarray(x_zp).item())
        oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
        ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
        cols = np.stack([padded[:, :, i * dh:i * dh + sh * oh:sh, j * dw:j * dw + sw * ow:sw]
                         for i in range(kh) for j in range(kw)], axis=2)         # N, C, kh*kw, oh, ow
        out = np.empty((n, m, oh, ow), np.int64)
        per = m // groups
        for g in range(groups):
            a = cols[:, g * cg:(g + 1) * cg].reshape(n, cg * kh * kw, oh * ow).transpose(0, 2, 1)
            wg = w[g * per:(g + 1) * per].reshape(per, -1).T
            acc = _pairwise_int16_dot(a, wg).astype(np.int64) - np.int64(np.asarray(x_zp)) * wg.sum(0, dtype=np.int64)
            out[:, g * per:(g + 1) * per] = acc.transpose(0, 2, 1).reshape(n, per, oh, ow)
        if bias is not None:
            out = out + bias.astype(np.int64).reshape(1, -1, 1, 1)
        y = out * (np.float64(np.asarray(x_scale)) * np.asarray(w_scale, np.float64).reshape(1, -1, 1, 1))
        return (_q(y, y_scale, y_zp),)


class SaturatingQGemm(QGemm):
    """QGemm (A uint8, B int8 transposed, zero point 0) on non-VNNI x86 arithmetic."""

    def _run(self, a, a_scale, a_zp, b, b_scale, b_zp, c=None, y_scale=None, y_zp=None, alpha=1.0, transA=0,
             transB=0):
        bt = b.T if transB else b
        acc = _pairwise_int16_dot(a, bt).astype(np.int64) - np.int64(np.asarray(a_zp)) * bt.sum(0, dtype=np.int64)
        if c is not None:
            acc = acc + c.astype(np.int64)
        y = acc * np.float64(alpha) * np.float64(np.asarray(a_scale)) * np.asarray(b_scale, np.float64)
        return (y.astype(np.float32) if y_scale is None else _q(y, y_scale, y_zp),)


REFERENCE_OPSET = 21   # the evaluator implements QuantizeLinear/DequantizeLinear from opset 19 on only


def evaluate(model: onnx.ModelProto, feeds: dict[str, np.ndarray], pairwise_int16: bool = False) -> list[np.ndarray]:
    """Every graph output of ``model`` on ``feeds``, computed by the specification (or, with
    ``pairwise_int16``, its QLinearConv and QGemm as x86 CPUs without VNNI compute them). Read at
    opset 21 where the model says less: the ops graphopt writes mean the same there for int8."""
    if any(o.domain in ("", "ai.onnx") and o.version < REFERENCE_OPSET for o in model.opset_import):
        model = onnx.ModelProto.FromString(model.SerializeToString())
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = max(o.version, REFERENCE_OPSET)
    ops = [op for op in CONTRIB_OPS if not (pairwise_int16 and op is QGemm)]
    if pairwise_int16:   # the evaluator finds an op's class by its name
        ops += [type("QLinearConv", (SaturatingQLinearConv,), {}), type("QGemm", (SaturatingQGemm,), {})]
    return ReferenceEvaluator(model, new_ops=ops).run(None, feeds)
