"""Recovery by fine-tuning with knowledge distillation (Hinton et al.).

The student is trained on ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) *
CE(s, labels)`` (``loss="kd"``, for classifiers) or, for models whose output is an
embedding rather than logits, on ``1 - cos(s, t)`` (``"cosine"``) or ``MSE(s, t)``
(``"mse"``), which need no labels; optional feature matching adds an MSE between named intermediate nodes
of student and teacher that have the same shape. Shared by every pass that needs
recovery (pruning, low-rank splitting, binarization, weight sharing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx
from tqdm.auto import tqdm

from graphopt.calibration import split_batch
from graphopt.errors import ConfigError
from graphopt.ir import Graph


@dataclass
class DistillConfig:
    epochs: float = 1.0            # may be fractional: 0.5 = half an epoch's batches
    lr: float = 1e-3
    weight_decay: float = 0.0
    temperature: float = 4.0
    alpha: float = 0.7             # weight of the distillation term; 1 - alpha on hard labels
    feature_nodes: tuple[str, ...] = ()
    feature_weight: float = 1.0
    max_batches: int | None = None
    loss: str = "kd"
    schedule: str = "cosine"       # lr annealed to 0 over the run (short runs recover far more); or "constant"

    def check(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"distillation schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"distillation loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not self.epochs > 0:
            raise ConfigError(f"distillation epochs must be > 0, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"distillation lr must be > 0, got {self.lr}")
        if not self.temperature > 0:
            raise ConfigError(f"distillation temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"distillation alpha must be in [0, 1], got {self.alpha}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
            temperature: float, alpha: float) -> torch.Tensor:
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    reduction="batchmean", log_target=True) * t * t
    if labels is None or alpha >= 1:
        return soft
    return alpha * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor, labels=None) -> torch.Tensor:
    """Mean ``1 - cos`` over the last axis: embeddings are read by their direction."""
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


def mse_loss(student: torch.Tensor, teacher: torch.Tensor, labels=None) -> torch.Tensor:
    return F.mse_loss(student, teacher)


LOSSES = ("kd", "cosine", "mse")
SCHEDULES = ("constant", "cosine")


def _loss_fn(config: DistillConfig) -> Callable:
    if config.loss == "cosine":
        return cosine_loss
    if config.loss == "mse":
        return mse_loss
    return lambda s, t, y: kd_loss(s, t, y, config.temperature, config.alpha)


class _Tap(fx.Interpreter):
    """Runs a GraphModule with autograd and keeps the values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names, self.taps = names, {}

    def run_node(self, n):
        value = super().run_node(n)
        if n.name in self.names:
            self.taps[n.name] = value
        return value


def _forward(gm: fx.GraphModule, inputs: tuple, names: set[str]):
    if not names:
        return gm(*inputs), {}
    tap = _Tap(gm, names)
    return tap.run(*inputs), tap.taps


def distill(student: Graph, teacher: Graph, data: Callable[[], Iterable] | Iterable, config: DistillConfig,
            progress: bool = True, loss_fn: Callable | None = None) -> dict[str, float]:
    """Fine-tune ``student.gm`` in place against ``teacher``; returns the mean loss of the
    first and last tenth of the steps. ``data`` yields (inputs, labels) or inputs;
    a callable is called once per epoch (so generators restart)."""
    config.check()
    names = set(config.feature_nodes)
    params = [p for p in student.gm.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("distillation: the student has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    teacher.gm.eval()
    losses: list[float] = []
    whole, fraction = int(config.epochs), config.epochs - int(config.epochs)
    epochs = whole + (1 if fraction > 0 else 0)
    student.gm.train()
    scheduler = None
    try:
        for epoch in range(epochs):
            batches = list(data() if callable(data) else data)
            if epoch == whole:  # the fractional last epoch
                batches = batches[:max(1, int(len(batches) * fraction))]
            if config.max_batches:
                batches = batches[:config.max_batches]
            if scheduler is None and config.schedule == "cosine":
                per_epoch = len(batches)
                total = per_epoch * whole + (max(1, int(per_epoch * fraction)) if fraction > 0 else 0)
                if config.max_batches:
                    total = min(per_epoch, config.max_batches) * epochs
                scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total))
            for batch in tqdm(batches, desc=f"distill {epoch + 1}/{epochs}", disable=not progress, leave=False,
                              delay=2):
                inputs, labels = split_batch(batch)
                with torch.no_grad():
                    t_out, t_feats = _forward(teacher.gm, inputs, names)
                s_out, s_feats = _forward(student.gm, inputs, names)
                loss = (loss_fn or _loss_fn(config))(s_out, t_out, labels)
                for name in names:
                    if name in s_feats and name in t_feats and s_feats[name].shape == t_feats[name].shape:
                        loss = loss + config.feature_weight * F.mse_loss(s_feats[name], t_feats[name])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                losses.append(loss.item())
    finally:
        student.gm.eval()
    if not losses:
        raise ConfigError("distillation: the training data yielded no batches")
    k = max(1, len(losses) // 10)
    return {"steps": len(losses), "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k}
