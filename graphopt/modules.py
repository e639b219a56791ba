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
