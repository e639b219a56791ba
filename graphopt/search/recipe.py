"""A candidate compression: which passes, with which knobs, lowered by which backend.

A Recipe is plain data (what a trial of the search samples, what the cache keys on, what the
report prints); ``passes()`` turns it into registered passes by name, so the search never
imports a pass module and a user's own registered passes could stand in.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from graphopt.pass_base import Pass, get_pass

from graphopt.search.goal import Goal

# sparsity leaves layers whose filters hold fewer weights dense: depthwise 3x3 and 5x5, an RGB
# stem (MobileNetV2's depthwise filters kept 2-3 of 9 taps at 70%: top-1 fell to 16.9%)
SPARSE_MIN_FAN_IN = 32


@dataclass(frozen=True)
class Recipe:
    prune: float = 0.0            # share of the MACs structured pruning removes (0: none)
    scope: str = "global"         # how pruning spreads over channel groups: global | uniform
    protect: int = 0              # the k most pruning-sensitive layers keep every channel
    round_to: int = 1             # pruned widths kept a multiple of this (kernels run whole channel blocks)
    low_rank: float = 0.0         # energy kept by low-rank splitting (0: none)
    finetune: float = 0.0         # epochs of distillation from the original after structural steps
    sparsity: float = 0.0         # unstructured magnitude sparsity (size goals)
    share_bits: int = 0           # weight sharing: 2**bits shared values per layer (0: none)
    quant: str = "fp32"           # fp32 | int8 (weights and activations) | int8-weights (size goals)
    sensitive_float: int = 0      # with int8: the k most quantization-sensitive layers stay float
    qat: float = 0.0              # with int8: epochs of quantization-aware training (0: post-training only)

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def label(self) -> str:
        """Short, human: 'prune 40% + distill 1 ep + int8 (2 float)'."""
        parts = []
        if self.prune:
            parts.append(f"prune {self.prune:.0%}" + (f" {self.scope}" if self.scope != "global" else "")
                         + (f" to x{self.round_to}" if self.round_to > 1 else "")
                         + (f" (protect {self.protect})" if self.protect else ""))
        if self.low_rank:
            parts.append(f"low-rank {self.low_rank:.2f}")
        if self.finetune and (self.prune or self.low_rank):
            parts.append(f"distill {self.finetune:g} ep")
        if self.sparsity:
            parts.append(f"sparsity {self.sparsity:.0%}")
        if self.share_bits:
            parts.append(f"share {self.share_bits}-bit")
        if self.quant == "int8":
            parts.append("int8" + (f" ({self.sensitive_float} float)" if self.sensitive_float else "")
                         + (f" + QAT {self.qat:g} ep" if self.qat else ""))
        elif self.quant == "int8-weights":
            parts.append("int8 weights")
        return " + ".join(parts) or "original"

    def passes(self, protected_layers: list[str], finetune_batches: int | None, progress: bool = False) -> list[Pass]:
        """The pipeline after BatchNorm folding: structural steps, recovery, weight coding, int8."""
        steps: list[Pass] = []
        structural = bool(self.prune or self.low_rank)
        if self.prune:
            steps.append(get_pass("prune_channels")(target_macs=round(1 - self.prune, 4), scope=self.scope,
                                                    exclude=protected_layers[:self.protect], round_to=self.round_to))
        if self.low_rank:
            steps.append(get_pass("split_low_rank")(energy=self.low_rank, progress=progress))
        if structural and self.finetune:
            steps.append(get_pass("distill")(epochs=self.finetune, max_batches=finetune_batches, probe_lr=True,
                                             progress=progress))
        # fine-tuning probes its lr like the recovery does (1e-3 sends MobileNetV2, BatchNorms folded, to chance)
        tune = {"finetune_epochs": self.finetune, "max_batches": finetune_batches, "probe_lr": True} \
            if self.finetune else {}
        if self.sparsity:
            steps.append(get_pass("prune_magnitude")(sparsity=self.sparsity, min_fan_in=SPARSE_MIN_FAN_IN, **tune))
        if self.share_bits:
            steps.append(get_pass("share_weights")(bits=self.share_bits, **tune))
        if self.quant == "int8":
            steps.append(get_pass("insert_qdq")(sensitive_float=self.sensitive_float, progress=progress))
            if self.qat:
                steps.append(get_pass("qat")(epochs=self.qat, max_batches=finetune_batches, progress=progress))
            steps.append(get_pass("fold_qdq")())
        elif self.quant == "int8-weights":
            steps.append(get_pass("quantize_weights")(bits=8))
        return steps

    def backend(self, goal: Goal) -> str:
        """The artifact the objective is measured on."""
        if goal.objective == "size":
            return "packed"
        if goal.objective == "latency" and goal.runtime == "torch":
            return "torchscript_int8" if self.quant == "int8" else "torchscript"
        return "onnx_int8" if self.quant == "int8" else "onnx"


# the longer recoveries a search may ask for where epochs are cheap (the Fashion-MNIST CNN pruned
# by half to widths of 16: -1.37 points after 8 epochs of distillation, +0.08 after 16, +0.91 after 32)
LONG_RECOVERY = (16.0, 32.0)
RECOVERY_SHARE = 1 / 6   # one candidate's fine-tuning may take this share of the time budget
# a size candidate fine-tunes three times (after pruning, sparsity and sharing) and a size search
# lives on its two compound seeds and a push, so one candidate may take this share (the
# Fashion-MNIST CNN pruned by 60%, sparse 70%, shared 4-bit: -2.17 points with 16 epochs after
# pruning and 8 after each coding step, -0.87 with 16 after each)
SIZE_RECOVERY_SHARE = 0.4


def longest_recovery(goal: Goal, epoch_seconds: float | None) -> float:
    """The longest distillation (in epochs) the search samples: 8, or the longest of
    ``LONG_RECOVERY`` whose fine-tuning fits in its share of ``max_minutes`` at ``epoch_seconds``
    an epoch, so a search over a small model runs the recovery it needs and one over a large
    model still builds its seeds and push steps. (Unpruned students on 2 cores: MobileNetV2 45 s
    an epoch, 8 epochs in 40 minutes for latency and in 50 for size; the Fashion-MNIST CNN
    4.5-7.3 s, 16 or 32 epochs in 15 minutes; the digits CNN 0.7 s, 16 epochs for size in 2.)"""
    if not epoch_seconds:
        return 8.0
    phases, share = (3, SIZE_RECOVERY_SHARE) if goal.objective == "size" else (1, RECOVERY_SHARE)
    fits = [e for e in LONG_RECOVERY if e * epoch_seconds * phases <= share * goal.max_minutes * 60]
    return max(fits, default=8.0)


@dataclass(frozen=True)
class Space:
    """The ranges a search samples from; narrowed by the sensitivity stage."""
    max_prune: float = 0.7
    scopes: tuple[str, ...] = ("global", "uniform")
    max_protect: int = 3
    round_to: tuple[int, ...] = (1,)
    low_rank: tuple[float, ...] = (0.0, 0.98, 0.95, 0.9)
    finetune: tuple[float, ...] = (0.0,)
    sparsity: tuple[float, ...] = (0.0,)
    share_bits: tuple[int, ...] = (0,)
    quant: tuple[str, ...] = ("fp32", "int8")
    max_sensitive_float: int = 3
    qat: tuple[float, ...] = (0.0,)
    notes: list[str] = field(default_factory=list, compare=False)

    @staticmethod
    def for_goal(goal: Goal, has_train_data: bool, longest: float = 8.0) -> "Space":
        # deep cuts need the long recovery: MobileNetV2 at 65% of its MACs pruned, 78.9% after 4
        # epochs of distillation, 83.3% after 8 (84.1% unpruned); 2 epochs bring back a 50% cut;
        # ``longest`` (``longest_recovery``, or the goal's cap) is the last level
        finetune = tuple(e for e in (0.0, 1.0, 2.0, 8.0) if e < longest) + (longest,) if has_train_data else (0.0,)
        if goal.objective == "size":
            return Space(finetune=finetune, sparsity=(0.0, 0.5, 0.7, 0.85), share_bits=(0, 6, 5, 4),
                         quant=("fp32", "int8-weights"), max_sensitive_float=0)
        if goal.objective == "macs":
            return Space(finetune=finetune, quant=("fp32",), max_sensitive_float=0)
        # latency: a width that is not a whole number of kernel blocks runs as slowly as the next
        # whole one, or slower (MobileNetV2 int8 in onnxruntime at 0.5 of the MACs: 0.43 ms at any
        # width, 0.35 at multiples of 8, 0.32 at multiples of 16, unpruned 0.43; the Fashion-MNIST
        # CNN in fp32 with widths 24 instead of 32: 0.113 ms against 0.062, on an AVX-512 CPU)
        return Space(finetune=finetune, round_to=(16, 8, 1), qat=(0.0, 1.0) if has_train_data else (0.0,))
