"""The factorizations behind ``split_low_rank``, and what each costs at a given rank.

Three ways to write one layer as a chain of thinner ones, all computed in float64:

* **svd** (Linear, 1x1 conv): ``W = U S Vh`` truncated to rank r; the first factor holds
  ``sqrt(S) Vh``, the second ``U sqrt(S)``, so neither factor carries all the scale.
  Given the layer's input second moment ``C = E[x x^T]`` (data-aware), the truncation is
  of ``C^(1/2) W`` instead and is unwhitened afterwards: it then minimises the error of the
  layer's *outputs* on that data, not of its weights (the idea of ASVD / SVD-LLM), and
  the error it reports is the share of output energy lost.
* **spatial** (k x k conv): the kernel reshaped to a ``(Cin*kh) x (Cout*kw)`` matrix and
  truncated the same way: a ``kh x 1`` conv to r channels, then a ``1 x kw`` conv.
* **tucker2** (k x k conv): HOSVD on the output and input channel modes (optionally
  refined by HOOI), giving 1x1 ``Cin -> r1``, ``kh x kw`` ``r1 -> r2``, 1x1 ``r2 -> Cout``.

Each decomposition answers, for any rank, the relative squared reconstruction error
(the share of ``||W||^2`` dropped), and the MACs and parameters of its factors (the dense
products they run, priced by the shared cost model: ``graphopt.cost.chain_cost``), without
building modules; ``build`` makes the modules for the rank finally chosen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from graphopt.cost import Cost, chain_cost


@dataclass(frozen=True)
class Candidate:
    """One way to split one layer: method, ranks, its MACs and params, and its error
    (relative squared Frobenius error of the reconstructed weight)."""

    method: str
    ranks: tuple[int, ...]
    macs: int
    params: int
    error: float


def rank_grid(full: int, multiple: int) -> np.ndarray:
    """Ranks a layer may take: multiples of ``multiple`` below ``full``, and ``full``."""
    return np.unique(np.append(np.arange(multiple, full, multiple), full)).astype(np.int64)


def round_rank(rank: float, full: int, multiple: int) -> int:
    """``rank`` rounded up to a multiple of ``multiple``, at least 1 and at most ``full``."""
    return int(min(full, max(multiple, math.ceil(math.ceil(rank) / multiple) * multiple)))


def balanced_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma, left, right) with ``matrix = left @ right``, ``left = U sqrt(S)``,
    ``right = sqrt(S) Vh``, sigma descending. Computed from the Gram matrix of the
    smaller side (float64; several times faster than a full SVD on 2 cores); directions
    with sigma below 1e-10 of the largest carry nothing and get zero factors."""
    m, n = matrix.shape
    gram = matrix @ matrix.T if m <= n else matrix.T @ matrix
    energy, vectors = torch.linalg.eigh(gram)
    sigma = energy.flip(0).clamp_min(0).sqrt()
    vectors = vectors.flip(1)
    root = sigma.sqrt()
    live = sigma > 1e-10 * sigma[0] if len(sigma) else sigma > 0
    inverse = torch.where(live, 1 / root.clamp_min(1e-300), torch.zeros_like(root))
    if m <= n:   # vectors = U
        return sigma, vectors * root, (vectors.T @ matrix) * inverse[:, None]
    return sigma, (matrix @ vectors) * inverse, root[:, None] * vectors.T   # vectors = V


def whitened_svd(matrix: torch.Tensor, moment: torch.Tensor, damping: float = 1e-6):
    """``balanced_svd`` of ``S^T matrix`` with ``S S^T = moment`` (+ damping, relative to its mean
    diagonal, so unused input directions stay finite), unwhitened: ``matrix ~ left @ right``
    with ``left = S^-T left_w``, optimal for ``E||x @ matrix - x @ left @ right||^2``."""
    moment = moment.double().to(matrix.device)   # statistics are gathered on the CPU
    ridge = damping * max(moment.diagonal().mean().item(), 1e-30)
    moment = moment + ridge * torch.eye(len(moment), dtype=moment.dtype, device=moment.device)
    energy, basis = torch.linalg.eigh(moment)
    root = energy.clamp_min(1e-300).sqrt()
    sigma, left, right = balanced_svd((basis.T * root[:, None]) @ matrix)
    return sigma, basis @ (left / root[:, None]), right


def _kept_share(sigma: torch.Tensor) -> np.ndarray:
    """kept[r - 1] = share of sum(sigma^2) in the first r singular values."""
    energy = np.cumsum(sigma.double().cpu().numpy() ** 2)
    return energy / energy[-1] if energy[-1] > 0 else np.ones_like(energy)


class MatrixSVD:
    """Truncated SVD of a Linear (``svd``), a 1x1 conv (``svd``) or a k x k conv (``spatial``).

    ``calls`` lists, per call site, ``(tokens, in_width)``: for a Linear the rows it
    multiplies; for a conv ``(N*Hout*Wout, N*Hout*Win)``, the positions the second and
    the first factor run at. At rank r the first factor maps ``n_in * kh`` inputs to r
    features, the second ``r * kw`` to ``n_out``."""

    def __init__(self, module: nn.Module, calls: list[tuple[int, int]], input_moment: torch.Tensor | None = None):
        self.module = module
        self.calls = calls
        self.second, self.first = (sum(c) for c in zip(*calls)) if calls else (0, 0)
        self.data_aware = input_moment is not None
        weight = module.weight.detach().double().cpu()
        if isinstance(module, nn.Linear):
            self.method, self.kh, self.kw = "svd", 1, 1
            self.n_in, self.n_out = module.in_features, module.out_features
            matrix = weight.T  # (in, out): rows feed the first factor
        else:
            self.kh, self.kw = module.kernel_size
            self.method = "svd" if (self.kh, self.kw) == (1, 1) else "spatial"
            self.n_in, self.n_out = module.in_channels, module.out_channels
            matrix = weight.permute(1, 2, 0, 3).reshape(self.n_in * self.kh, self.n_out * self.kw)
        self.bias = self.n_out if module.bias is not None else 0
        if input_moment is None:
            self.sigma, self.left, self.right = balanced_svd(matrix)
        else:
            if self.method != "svd":
                raise ValueError("data-aware splitting applies to Linear and 1x1 conv layers only")
            self.sigma, self.left, self.right = whitened_svd(matrix, input_moment)
        self.full_ranks = (len(self.sigma),)
        self.kept = _kept_share(self.sigma)

    def error(self, rank: int) -> float:
        return float(max(0.0, 1.0 - self.kept[rank - 1]))

    def cost(self, rank) -> Cost:
        return chain_cost([(self.first, self.n_in * self.kh, rank), (self.second, rank * self.kw, self.n_out)],
                          self.bias)

    def candidate(self, ranks: tuple[int, ...]) -> Candidate:
        (r,) = ranks
        return Candidate(self.method, (r,), *self.cost(r), self.error(r))

    def candidates(self, multiple: int) -> list[Candidate]:
        return [self.candidate((int(r),)) for r in rank_grid(self.full_ranks[0], multiple)]

    def ratio_ranks(self, ratio: float, multiple: int) -> tuple[int, ...]:
        return (round_rank(ratio * self.full_ranks[0], self.full_ranks[0], multiple),)

    def check_ranks(self, ranks: tuple[int, ...]) -> str | None:
        """Why ``ranks`` do not fit this decomposition (None if they do)."""
        if len(ranks) != 1:
            return f"method {self.method!r} takes one rank, got {list(ranks)}"
        if ranks[0] > self.full_ranks[0]:
            return f"rank {ranks[0]} exceeds the largest possible rank {self.full_ranks[0]} for method {self.method!r}"
        return None

    def build(self, ranks: tuple[int, ...], hooi_iters: int = 0) -> list[nn.Module]:
        (r,) = ranks
        first = self.left[:, :r].T                   # (r, n_in*kh)
        second = self.right[:r]                      # (r, n_out*kw)
        m = self.module
        if isinstance(m, nn.Linear):
            a, b = nn.Linear(self.n_in, r, bias=False), nn.Linear(r, self.n_out, bias=m.bias is not None)
            weights = (first, second.T)
        else:
            pad_a, pad_b = (m.padding, m.padding) if isinstance(m.padding, str) else \
                ((m.padding[0], 0), (0, m.padding[1]))
            a = nn.Conv2d(self.n_in, r, (self.kh, 1), stride=(m.stride[0], 1), padding=pad_a,
                          dilation=(m.dilation[0], 1), bias=False, padding_mode=m.padding_mode)
            b = nn.Conv2d(r, self.n_out, (1, self.kw), stride=(1, m.stride[1]), padding=pad_b,
                          dilation=(1, m.dilation[1]), bias=m.bias is not None, padding_mode=m.padding_mode)
            weights = (first.reshape(r, self.n_in, self.kh, 1),
                       second.reshape(r, self.n_out, self.kw).permute(1, 0, 2).unsqueeze(2))
        return _load([a, b], weights, m)


class Tucker2:
    """Tucker-2 of a k x k conv kernel on its output (mode 0) and input (mode 1) channels.

    Candidate errors come from the HOSVD core, whose leading sub-blocks are the cores of
    every truncation, so the whole ``(r1, r2)`` grid costs one pass of cumulative sums.
    ``calls`` lists, per call site, ``(N*Hout*Wout, N*Hin*Win)``: the positions of the
    core and last factor, and of the first."""

    method = "tucker2"

    def __init__(self, module: nn.Conv2d, calls: list[tuple[int, int]]):
        self.module = module
        self.calls = calls
        self.second, self.first = (sum(c) for c in zip(*calls)) if calls else (0, 0)
        self.bias = module.out_channels if module.bias is not None else 0
        self.weight = module.weight.detach().double().cpu()
        self.n_out, self.n_in, self.kh, self.kw = self.weight.shape
        self.u_out = _leading_vectors(self.weight.reshape(self.n_out, -1))
        self.u_in = _leading_vectors(self.weight.transpose(0, 1).reshape(self.n_in, -1))
        self.full_ranks = (self.u_in.shape[1], self.u_out.shape[1])  # (r1, r2)
        core = torch.einsum("oikl,oa,ib->abkl", self.weight, self.u_out, self.u_in)
        block = (core ** 2).sum((2, 3)).cpu().numpy()                     # (r2_full, r1_full)
        self.total = float((self.weight ** 2).sum())
        self.kept = block.cumsum(0).cumsum(1) / self.total if self.total > 0 else np.ones_like(block)

    def error(self, r1: int, r2: int) -> float:
        return float(max(0.0, 1.0 - self.kept[r2 - 1, r1 - 1]))

    def cost(self, r1, r2) -> Cost:
        """1x1 ``n_in -> r1``, ``kh x kw`` ``r1 -> r2``, 1x1 ``r2 -> n_out`` (ints or grids of them)."""
        k = self.kh * self.kw
        return chain_cost([(self.first, self.n_in, r1), (self.second, r1 * k, r2), (self.second, r2, self.n_out)],
                          self.bias)

    def candidate(self, ranks: tuple[int, ...]) -> Candidate:
        r1, r2 = ranks
        return Candidate(self.method, (r1, r2), *self.cost(r1, r2), self.error(r1, r2))

    def candidates(self, multiple: int) -> list[Candidate]:
        """The Pareto-optimal (MACs, error) points of the whole rank grid."""
        r1 = rank_grid(self.full_ranks[0], multiple)
        r2 = rank_grid(self.full_ranks[1], multiple)
        g1, g2 = np.meshgrid(r1, r2, indexing="xy")                  # (len(r2), len(r1))
        macs = self.cost(g1, g2).macs
        errors = np.maximum(0.0, 1.0 - self.kept[np.ix_(r2 - 1, r1 - 1)])
        keep = pareto(macs.ravel(), errors.ravel())
        return [self.candidate((int(g1.ravel()[i]), int(g2.ravel()[i]))) for i in keep]

    def ratio_ranks(self, ratio: float, multiple: int) -> tuple[int, ...]:
        return tuple(round_rank(ratio * self.n_in if i == 0 else ratio * self.n_out, full, multiple)
                     for i, full in enumerate(self.full_ranks))

    def check_ranks(self, ranks: tuple[int, ...]) -> str | None:
        """Why ``ranks`` do not fit this decomposition (None if they do)."""
        if len(ranks) != 2:
            return f"method 'tucker2' takes two ranks [r1, r2], got {list(ranks)}"
        if ranks[0] > self.full_ranks[0] or ranks[1] > self.full_ranks[1]:
            return f"ranks {list(ranks)} exceed the largest possible ranks {list(self.full_ranks)} for method 'tucker2'"
        return None

    def factors(self, ranks: tuple[int, ...], hooi_iters: int) -> tuple[torch.Tensor, ...]:
        """(u_in (Cin x r1), core (r2 x r1 x kh x kw), u_out (Cout x r2)): HOSVD, then
        ``hooi_iters`` rounds of alternating refinement (each never worse)."""
        r1, r2 = ranks
        u_in, u_out = self.u_in[:, :r1], self.u_out[:, :r2]
        w = self.weight
        for _ in range(hooi_iters):
            u_in = _leading_vectors(torch.einsum("oikl,oa->iakl", w, u_out).reshape(self.n_in, -1), r1)
            u_out = _leading_vectors(torch.einsum("oikl,ib->obkl", w, u_in).reshape(self.n_out, -1), r2)
        core = torch.einsum("oikl,oa,ib->abkl", w, u_out, u_in)
        return u_in, core, u_out

    def build(self, ranks: tuple[int, ...], hooi_iters: int = 0) -> list[nn.Module]:
        r1, r2 = ranks
        u_in, core, u_out = self.factors(ranks, hooi_iters)
        m = self.module
        a = nn.Conv2d(self.n_in, r1, 1, bias=False)
        b = nn.Conv2d(r1, r2, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                      bias=False, padding_mode=m.padding_mode)
        c = nn.Conv2d(r2, self.n_out, 1, bias=m.bias is not None)
        return _load([a, b, c], (u_in.T[:, :, None, None], core, u_out[:, :, None, None]), m)


def _leading_vectors(matrix: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Orthonormal leading left singular vectors (eigenvectors of ``matrix @ matrix.T``):
    all ``min(m, n)`` of them, or the first ``count``."""
    _, vectors = torch.linalg.eigh(matrix @ matrix.T)
    vectors = vectors.flip(1)
    return vectors[:, :min(matrix.shape)] if count is None else vectors[:, :count]


def _load(modules: list[nn.Module], weights, original: nn.Module) -> list[nn.Module]:
    """Give the factor modules their weights (in the original's dtype and device) and the
    original's bias on the last one; match its training flag and requires_grad."""
    ref = original.weight
    with torch.no_grad():
        for module, weight in zip(modules, weights):
            module.weight = nn.Parameter(weight.contiguous().to(ref.dtype).to(ref.device),
                                         requires_grad=ref.requires_grad)
        if original.bias is not None:
            modules[-1].bias = nn.Parameter(original.bias.detach().clone(), requires_grad=original.bias.requires_grad)
    for module in modules:
        module.train(original.training)
    return modules


def pareto(cost: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both cost and error (cheapest first)."""
    order = np.lexsort((error, cost))
    best = np.minimum.accumulate(error[order])
    keep = np.ones(len(order), bool)
    keep[1:] = error[order][1:] < best[:-1]
    return order[keep]


def reconstruction_error(original: nn.Module, factors: list[nn.Module]) -> float:
    """Relative Frobenius error ``||W - W_hat|| / ||W||`` of the weight the factors rebuild."""
    w = original.weight.detach().double()
    ws = [f.weight.detach().double() for f in factors]
    if isinstance(original, nn.Linear):
        rebuilt = ws[1] @ ws[0]
    elif len(ws) == 2:   # kh x 1 then 1 x kw
        rebuilt = torch.einsum("orj,rci->ocij", ws[1][:, :, 0, :], ws[0][:, :, :, 0])
    else:                # 1x1, core, 1x1
        rebuilt = torch.einsum("ob,ba...,ai->oi...", ws[2][:, :, 0, 0], ws[1], ws[0][:, :, 0, 0])
    norm = w.norm().item()
    return (w - rebuilt).norm().item() / norm if norm > 0 else 0.0
