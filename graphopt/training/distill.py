"""Recovery by fine-tuning with knowledge distillation (Hinton et al.).

The student is trained on ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) *
CE(s, labels)`` (``loss="kd"``, for classifiers) or, for models whose output is an
embedding rather than logits, on ``1 - cos(s, t)`` (``"cosine"``) or ``MSE(s, t)``
(``"mse"``), which need no labels; optional feature matching adds an MSE between named intermediate nodes
of student and teacher that have the same shape. Shared by every pass that needs
recovery (pruning, low-rank splitting, binarization, weight sharing).

Under torchrun the student trains as a DistributedDataParallel module (gloo on CPU, NCCL on
CUDA: torch's choice), the teacher runs on every rank, and each rank reads its share of the
data (``graphopt.distributed.shard``): N ranks over batches of B train as one process over
batches of N*B. ``epochs`` counts passes over all of the data, ``max_batches`` the batches of
all ranks together (each rank takes max_batches/N steps, rounded up); every rank takes the
same steps, the stream ending for all when it ends for one.
"""
from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx
from tqdm.auto import tqdm

from graphopt import devices, distributed
from graphopt.data import check_labels, read_batch
from graphopt.devices import to_device
from graphopt.errors import ConfigError, DataError
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
    amp: str | None = None         # mixed precision for the forward passes: "bf16", or "fp16" on CUDA
    backoff: bool = False          # restart at a tenth of lr where the first steps diverge (at most twice)
    probe_lr: bool = False         # first try lr, lr/10 and lr/100 for a few steps each and keep the best

    def check(self) -> None:
        if isinstance(self.feature_nodes, str) or not all(isinstance(n, str) for n in self.feature_nodes):
            raise ConfigError(f"distillation feature_nodes must be a list of node names, got {self.feature_nodes!r}"
                              + (f" (write [{self.feature_nodes!r}])" if isinstance(self.feature_nodes, str) else ""))
        self.feature_nodes = tuple(self.feature_nodes)
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
        if self.amp is not None and self.amp not in devices.AMP_DTYPES:
            raise ConfigError(f"distillation amp must be one of {', '.join(devices.AMP_DTYPES)} (or unset), "
                              f"got {self.amp!r}")


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


class _Student(torch.nn.Module):
    """The student's forward with its feature taps, as one module DistributedDataParallel can wrap."""

    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__()
        self.gm, self.names = gm, names

    def forward(self, *inputs):
        return _forward(self.gm, inputs, self.names)


def _parallel(student: torch.nn.Module) -> torch.nn.Module:
    """The student wrapped in DistributedDataParallel under several ranks (gradients averaged
    over ranks; ``static_graph``: parameters the graph never uses need no extra pass)."""
    if not distributed.active():
        return student
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(student, static_graph=True)


class _EpochPlan:
    """Batches of each epoch, streamed: ``max_batches`` and a fractional last epoch cut the
    iterator, never a list of the whole loader (a streaming loader may be endless)."""

    def __init__(self, data, config: DistillConfig):
        self.data, self.limit = data, distributed.steps_share(config.max_batches or None)
        self.whole = int(config.epochs)
        self.fraction = config.epochs - self.whole
        self.epochs = self.whole + (1 if self.fraction > 0 else 0)
        self.counted: int | None = None   # batches one full epoch yielded, once seen

    def _source(self):
        return self.data() if callable(self.data) else self.data

    def per_epoch(self) -> int | None:
        """Batches in one full epoch: the loader's length, else ``max_batches``, else counted by
        one pass over a loader that can be read again (nothing kept); None for a one-shot iterator.
        Under several ranks, the smallest of the ranks' counts (None if any rank cannot tell)."""
        return distributed.agree_count(self._per_epoch())

    def _per_epoch(self) -> int | None:
        sized = self._source()
        length = len(sized) if hasattr(sized, "__len__") else self.counted
        if length is None and self.limit is None and (callable(self.data) or iter(sized) is not sized):
            length = self.counted = sum(1 for _ in sized)
        if length is None:
            return self.limit
        return min(length, self.limit) if self.limit else length

    def steps(self, epoch: int) -> int | None:
        full = self.per_epoch()
        if epoch < self.whole or full is None:
            return full
        return max(1, int(full * self.fraction))

    def total_steps(self) -> int:
        counts = [self.steps(e) for e in range(self.epochs)]
        if None in counts:
            raise ConfigError("distillation: a cosine schedule needs the number of steps: give max_batches, or a "
                              "loader that can be read more than once")
        return sum(counts)

    def batches(self, epoch: int):
        steps = self.steps(epoch)
        if epoch >= self.whole and steps is None:
            raise ConfigError("distillation: a fractional epoch needs the epoch's length: give max_batches, or a "
                              "loader that can be read more than once")
        source = self._source()
        distributed.set_epoch(source, epoch)
        return distributed.agree(itertools.islice(iter(source), steps) if steps else iter(source))

    def seen(self, epoch: int, count: int) -> None:
        if epoch < self.whole:
            self.counted = count


def distill(student: Graph, teacher: Graph, data: Callable[[], Iterable] | Iterable, config: DistillConfig,
            progress: bool = True, loss_fn: Callable | None = None,
            penalty: Callable[[float], torch.Tensor] | None = None) -> dict[str, float]:
    """Fine-tune ``student.gm`` in place against ``teacher``; returns the mean loss of the
    first and last tenth of the steps. ``data`` yields (inputs, labels) or inputs;
    a callable is called once per epoch (so generators restart). ``penalty(progress)``, where
    progress runs from 0 to 1 over the steps, is added to every step's loss (a regulariser on the
    student's weights, such as the group lasso of ``sparsify_channels``)."""
    config.check()
    data = distributed.shard(data, "distillation: train_data")
    start = copy.deepcopy(student.gm.state_dict()) if config.backoff or config.probe_lr else None
    lr = config.lr
    if config.probe_lr:
        lr = _probe(student, teacher, data, config, loss_fn, penalty, start)
    for restart in range(BACKOFFS + 1):
        try:
            stats = _train(student, teacher, data, config, lr, progress, loss_fn, penalty,
                           watch=config.backoff and restart < BACKOFFS)
            return {**stats, "lr": lr, "restarts": restart}
        except _Diverged:   # a pretrained net without its BatchNorms can blow up at lr 1e-3 in a few steps
            student.gm.load_state_dict(start)
            lr /= 10
    raise AssertionError("unreachable: the last attempt does not watch for divergence")


def epoch_seconds(student: Graph, teacher: Graph, data: Callable[[], Iterable] | Iterable, config: DistillConfig,
                  steps: int = 6) -> float | None:
    """What one epoch of ``distill`` with ``config`` costs on this machine: a run of ``steps``
    more steps than a short one, the difference (so the set-up both share, such as counting a
    loader's batches, is left out) times the batches of an epoch; the student's weights are left
    as they were. None where the epoch's length cannot be told (a one-shot iterator, no ``max_batches``)."""
    config.check()
    per_epoch = _EpochPlan(data, config).per_epoch()
    if not per_epoch:
        return None
    start = copy.deepcopy(student.gm.state_dict())
    took = []
    try:
        for limit in (1, 1, 1 + steps):   # the first run warms up
            began = time.perf_counter()
            done = _train(student, teacher, data, config, config.lr, False, None, None, watch=False, limit=limit)
            took.append((time.perf_counter() - began, done["steps"]))
    finally:
        student.gm.load_state_dict(start)
    (short, short_steps), (long, long_steps) = took[1], took[2]
    if long_steps <= short_steps:   # the epoch is one step long
        return long * per_epoch / long_steps
    return max(long - short, 0.0) / (long_steps - short_steps) * per_epoch


BACKOFFS = 2          # restarts at a tenth of the learning rate
PROBE_STEPS = 20      # steps each learning rate is tried for by ``probe_lr``


def _probe(student: Graph, teacher: Graph, data, config: DistillConfig, loss_fn, penalty, start: dict) -> float:
    """The learning rate among lr, lr/10 and lr/100 whose last steps of ``PROBE_STEPS`` from the
    same weights have the lowest loss: a rate that suits a small net trained from scratch (1e-3)
    wrecks a pretrained one without its BatchNorms in a way its loss only shows slowly
    (MobileNetV2 pruned by 10%: 23% -> 9.85% after 250 steps at 1e-3, 84% at 1e-4)."""
    tried = {}
    for lr in (config.lr, config.lr / 10, config.lr / 100):
        try:
            tried[lr] = _train(student, teacher, data, config, lr, False, loss_fn, penalty, watch=False,
                               limit=PROBE_STEPS)["loss_last"]
        finally:
            student.gm.load_state_dict(start)
    return min(tried, key=lambda lr: (tried[lr], -lr))


_WATCHED = 10         # steps after which a run is checked for divergence


class _Diverged(Exception):
    """The loss of a run's first steps rose to more than twice the first step's, on average."""


def _diverged(losses: list[float]) -> bool:
    """Whether steps 1-9 average more than twice step 0 (on every rank together when distributed):
    MobileNetV2 with its BatchNorms folded, pruned by 10%, at lr 1e-3 goes 17 -> 181, 50, 92, ...
    and ends at chance; at 1e-4 it falls steadily, 17 -> 4, and recovers (23% -> 84%)."""
    rising = torch.tensor([sum(losses[1:_WATCHED]) / (_WATCHED - 1) - 2 * losses[0]], dtype=torch.float64)
    if distributed.active():
        rising = distributed.all_reduce(rising)
    return bool(rising.item() > 0)


def _train(student: Graph, teacher: Graph, data, config: DistillConfig, lr: float, progress: bool,
           loss_fn: Callable | None, penalty: Callable[[float], torch.Tensor] | None, watch: bool,
           limit: int | None = None) -> dict[str, float]:
    """One run of ``distill`` at ``lr`` (its first ``limit`` steps only, where given); raises
    ``_Diverged`` (when ``watch``) if its first steps blow up."""
    names = set(config.feature_nodes)
    missing = sorted(names - {n.name for n in student.nodes})
    if missing:
        raise ConfigError(f"distillation: feature_nodes names {missing[0]!r}, which is not a node of the student "
                          f"graph (graphopt inspect lists them)")
    params = [p for p in student.gm.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("distillation: the student has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    teacher.gm.eval()
    losses: list[float] = []
    plan = _EpochPlan(data, config)
    total = plan.total_steps() if penalty is not None or config.schedule == "cosine" else None
    scheduler = None
    if config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total))
    model = _parallel(_Student(student.gm, names))
    device = student.device
    scaler = devices.grad_scaler(device, config.amp)
    student.gm.train()
    try:
        for epoch in range(plan.epochs):
            bar = tqdm(plan.batches(epoch), desc=f"distill {epoch + 1}/{plan.epochs}", total=plan.steps(epoch),
                       disable=not progress or not distributed.is_main(), leave=False, delay=2)
            for step, batch in enumerate(bar):
                where = f"distillation: batch {step} of epoch {epoch + 1}"
                inputs, labels = read_batch(student, batch, where)
                with torch.no_grad(), devices.autocast(teacher.device, config.amp):
                    t_out, t_feats = to_device(_forward(teacher.gm, to_device(inputs, teacher.device), names), device)
                with devices.autocast(device, config.amp):
                    s_out, s_feats = model(*inputs)
                    if loss_fn is None and config.loss == "kd" and config.alpha < 1:   # the loss reads the labels
                        check_labels(labels, s_out, where)
                    loss = (loss_fn or _loss_fn(config))(s_out, t_out, labels)
                    for name in names:
                        if name in s_feats and name in t_feats and s_feats[name].shape == t_feats[name].shape:
                            loss = loss + config.feature_weight * F.mse_loss(s_feats[name], t_feats[name])
                loss = loss.float()
                if penalty is not None:
                    loss = loss + penalty(len(losses) / max(1, total))
                if not torch.isfinite(loss):
                    raise DataError(f"{where}: the loss is {loss.item()} (weights left as before this step)")
                optimizer.zero_grad()
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:   # fp16: the loss scaled so small gradients survive, steps with inf gradients skipped
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                if scheduler is not None:
                    scheduler.step()
                losses.append(loss.item())
                plan.seen(epoch, step + 1)
                if watch and len(losses) == _WATCHED and _diverged(losses):
                    raise _Diverged()
                if len(losses) == limit:
                    break
            if len(losses) == limit:
                break
    finally:
        student.gm.eval()
    if not losses:
        raise ConfigError("distillation: the training data yielded no batches")
    k = max(1, len(losses) // (4 if limit else 10))   # a probe's 20 steps: the last 5
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    if distributed.active():   # every rank took the same steps; the report holds the mean over ranks
        distributed.broadcast_buffers(student.gm)   # BatchNorm statistics: rank 0's, as DDP keeps them
        first, last = (distributed.all_reduce(torch.tensor([first, last], dtype=torch.float64))
                       / distributed.world_size()).tolist()
    return {"steps": len(losses), "loss_first": first, "loss_last": last}
