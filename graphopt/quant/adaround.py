"""Learned rounding (AdaRound, Nagel et al. 2020): for one layer, choose per weight whether to
round down or up so the layer's *outputs* on calibration inputs stay closest to the float
layer's, instead of rounding each weight to its nearest grid point on its own.

Each weight gets a continuous variable ``v``; ``h(v)``, a rectified sigmoid in [0, 1], is the
amount added to ``floor(w / scale)``. The loss is the layer's output error (relative to the float
output's energy, so one regularisation weight serves every layer) plus a term that pushes every
``h`` to 0 or 1, annealed from soft (beta 20) to sharp (beta 2) after a warm-up. The result is
integer codes on the same grid (same scales, same clamp) as round-to-nearest would give.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

ZETA, GAMMA = 1.1, -0.1   # the rectified sigmoid's stretch (from the paper)


@dataclass
class RoundingResult:
    codes: torch.Tensor      # integer-valued float tensor, same shape as the weight
    error_nearest: float     # output error of round-to-nearest on the calibration inputs (relative)
    error_learned: float     # output error of the learned rounding (relative)
    flipped: float           # share of weights rounded the other way than nearest


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _relative_error(apply: Callable, inputs: list[torch.Tensor], targets: list[torch.Tensor],
                    weight: torch.Tensor) -> float:
    with torch.no_grad():
        num = sum(float((apply(x, weight) - y).pow(2).sum()) for x, y in zip(inputs, targets))
        den = sum(float(y.pow(2).sum()) for y in targets)
    return num / max(den, 1e-30)


def learn_rounding(weight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | float, qmin: int,
                   qmax: int, apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   inputs: list[torch.Tensor], iterations: int = 300, lr: float = 1e-2, reg_weight: float = 0.01,
                   warmup: float = 0.2, keep_extremes: bool = False) -> RoundingResult:
    """Codes ``q`` (``dequantized = (q - zero_point) * scale``) for ``weight`` (scales and zero points
    broadcast to its shape) that keep ``apply(x, dequantized)`` close to ``apply(x, weight)`` on
    ``inputs``. ``keep_extremes`` keeps each output channel's largest-magnitude weight at its
    nearest code, so a scale recomputed from the result (max|w| / qmax) stays the same."""
    w = weight.detach()
    scaled = w / scales + zero_points
    floor = torch.floor(scaled)
    nearest = torch.clamp(torch.round(scaled), qmin, qmax)
    dequant = lambda q: (q - zero_points) * scales  # noqa: E731
    with torch.no_grad():
        targets = [apply(x, w) for x in inputs]
    rest = (scaled - floor).clamp(1e-4, 1 - 1e-4)
    v = torch.logit((rest - GAMMA) / (ZETA - GAMMA)).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=lr)
    energy = [float(y.pow(2).mean()) or 1.0 for y in targets]
    start = int(warmup * iterations)
    for step in range(iterations):
        i = step % len(inputs)
        soft = dequant(torch.clamp(floor + _h(v), qmin, qmax))
        loss = (apply(inputs[i], soft) - targets[i]).pow(2).mean() / energy[i]
        if step >= start:
            beta = 20 + (2 - 20) * (step - start) / max(1, iterations - start)
            loss = loss + reg_weight * (1 - (2 * _h(v) - 1).abs().pow(beta)).sum() / v.numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        codes = torch.clamp(floor + (_h(v) >= 0.5).float(), qmin, qmax)
        if keep_extremes:
            rows = w.reshape(w.shape[0], -1)
            at = rows.abs().argmax(1)
            flat = codes.reshape(w.shape[0], -1)
            channel = torch.arange(w.shape[0], device=w.device)
            flat[channel, at] = nearest.reshape(w.shape[0], -1)[channel, at]
            codes = flat.reshape(w.shape)
    return RoundingResult(codes + 0.0, _relative_error(apply, inputs, targets, dequant(nearest)),
                          _relative_error(apply, inputs, targets, dequant(codes)),
                          float((codes != nearest).float().mean()))
