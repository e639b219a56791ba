"""Modules that passes put into graphs when no torch.nn module expresses the result.

They are plain, scriptable and exportable (ONNX via torch.onnx, TorchScript via script).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class PrunedMultiheadAttention(nn.Module):
    """nn.MultiheadAttention with some heads removed: ``num_heads * head_dim`` may be
    smaller than ``embed_dim`` (the width of the inputs and output), which
    nn.MultiheadAttention cannot express. Same call signature and outputs."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, batch_first: bool = False,
                 bias: bool = True):
        super().__init__()
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim, self.batch_first = embed_dim, num_heads, head_dim, batch_first
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    @classmethod
    def from_sliced(cls, mha: nn.MultiheadAttention, num_heads: int) -> "PrunedMultiheadAttention":
        """Build from an nn.MultiheadAttention whose in_proj rows / out_proj columns were cut."""
        inner = mha.in_proj_weight.shape[0] // 3
        head_dim = inner // num_heads
        module = cls(mha.embed_dim, num_heads, head_dim, mha.batch_first, bias=mha.in_proj_bias is not None)
        with torch.no_grad():
            for i, proj in enumerate((module.q_proj, module.k_proj, module.v_proj)):
                proj.weight.copy_(mha.in_proj_weight[i * inner:(i + 1) * inner])
                if mha.in_proj_bias is not None:
                    proj.bias.copy_(mha.in_proj_bias[i * inner:(i + 1) * inner])
            module.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                module.out_proj.bias.copy_(mha.out_proj.bias)
        return module

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, lq, s = query.shape[0], query.shape[1], key.shape[1]
        q = self.q_proj(query).view(b, lq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask.view(b, 1, 1, s).to(torch.bool), float("-inf"))
        if is_causal:
            causal = torch.ones(lq, s, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        weights = F.softmax(scores, dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(b, lq, self.num_heads * self.head_dim)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, (weights.mean(dim=1) if average_attn_weights else weights)


class PrunedLayerNorm(nn.Module):
    """LayerNorm over the last axis after some of its ``count`` channels were pruned: the removed
    channels are counted as the zeros they are in the masked original (every producer of them
    zeroed), so the mean and variance are the original LayerNorm's, exactly:
    ``mean = sum(x) / count``, ``var = (sum((x - mean)^2) + (count - kept) * mean^2) / count``.
    nn.LayerNorm would divide by the channels that remain and change every output."""

    def __init__(self, normalized: int, count: int, eps: float = 1e-5, affine: bool = True, bias: bool = True):
        super().__init__()
        if not 0 < normalized <= count:
            raise ValueError(f"PrunedLayerNorm: {normalized} channels kept of {count}")
        self.normalized, self.count, self.eps, self.affine = normalized, count, eps, affine
        self.weight = nn.Parameter(torch.ones(normalized)) if affine else None
        self.bias = nn.Parameter(torch.zeros(normalized)) if affine and bias else None

    @property
    def normalized_shape(self) -> tuple[int]:
        """The channels held, as nn.LayerNorm names them."""
        return (self.normalized,)

    @classmethod
    def from_sliced(cls, norm: nn.Module, kept: int, count: int) -> "PrunedLayerNorm":
        """From an nn.LayerNorm (or a PrunedLayerNorm) whose weight and bias were already cut to
        ``kept`` channels; ``count``: the channels of the LayerNorm the model was traced with."""
        module = cls(kept, count, norm.eps, affine=norm.weight is not None, bias=norm.bias is not None)
        with torch.no_grad():
            if norm.weight is not None:
                module.weight = nn.Parameter(norm.weight.detach().clone(), requires_grad=norm.weight.requires_grad)
            if norm.bias is not None:
                module.bias = nn.Parameter(norm.bias.detach().clone(), requires_grad=norm.bias.requires_grad)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.sum(-1, keepdim=True) / self.count
        centered = x - mean
        removed = float(self.count - self.normalized)
        var = (centered.pow(2).sum(-1, keepdim=True) + removed * mean.pow(2)) / self.count
        y = centered * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y
