"""Random weights that make numeric checks meaningful on architectures with weights=None.

Some torchvision inits make comparisons vacuous: ViT's head starts at zero (every output
is 0) and ConvNeXt's layer scale at 1e-6 (residual branches barely count), and fresh
BatchNorms are identities. This re-draws those so an oracle has something to compare.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def informative_init(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, no all-zero weights, no near-zero scales; eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.any():
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
        for p in model.parameters():
            if p.numel() and 0 < p.abs().max() < 1e-4:  # e.g. layer scale initialised at 1e-6
                p.uniform_(0.5, 1.5)
    return model.eval()
