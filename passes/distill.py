"""Recovery pass: fine-tune the graph against the pipeline's input model by distillation."""
from __future__ import annotations

from typing import Literal

from graphopt.training.distill import DistillConfig, distill
from graphopt.ir import Graph
from graphopt.options import Count, Fraction, NonNegative, Positive
from graphopt.pass_base import Contract, Pass, PassContext, PassResult, register_pass


@register_pass("distill")
class Distill(Pass):
    """Fine-tune with knowledge distillation from the unpruned/uncompressed input model.

    Options:
        epochs: passes over the training data (may be fractional: 0.5 is half the batches)
        lr: learning rate (AdamW)
        temperature: softening of both models' logits in the distillation loss
        alpha: weight of the distillation term; 1 - alpha goes to the hard labels
        weight_decay: AdamW weight decay
        max_batches: batches per epoch (default: the whole loader)
        feature_nodes: nodes whose outputs the student also matches to the teacher's (MSE)
        feature_weight: weight of the feature-matching term
        progress: show a progress bar
        amp: mixed precision for the training steps: bf16, or fp16 on CUDA (default: float32)
        loss: kd (classifiers), or cosine / mse for models whose output is an embedding
        schedule: cosine anneals the learning rate to 0 over the run; constant keeps it
        backoff: where the loss of the first 10 steps rises to more than twice the first step's
            (a pretrained network without its BatchNorms can blow up at lr 1e-3), restore the
            weights and start again at a tenth of the learning rate, at most twice
        probe_lr: first run 20 steps at lr, lr/10 and lr/100 from the same weights and train at the
            one whose last steps had the lowest loss (what graphopt compress does)
    """

    contract = Contract.NONE
    requires = frozenset({"train_data"})
    preserves = frozenset({"shapes", "cost", "channel_groups"})  # weights change, structure does not

    def __init__(self, epochs: Positive = 1.0, lr: Positive = 1e-3, temperature: Positive = 4.0,
                 alpha: Fraction = 0.7, weight_decay: NonNegative = 0.0, max_batches: Count | None = None,
                 feature_nodes: list[str] | None = None, feature_weight: NonNegative = 1.0, progress: bool = True,
                 loss: Literal["kd", "cosine", "mse"] = "kd", schedule: Literal["constant", "cosine"] = "cosine",
                 amp: Literal["bf16", "fp16"] | None = None, backoff: bool = True,
                 probe_lr: bool = False):
        self.config = DistillConfig(epochs=float(epochs), lr=lr, weight_decay=weight_decay,
                                    temperature=temperature, alpha=alpha, max_batches=max_batches, loss=loss,
                                    schedule=schedule,
                                    feature_nodes=feature_nodes or (), feature_weight=feature_weight, amp=amp,
                                    backoff=backoff, probe_lr=probe_lr)
        self.config.check()
        self.progress = progress

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        teacher = ctx.data.get("teacher") or ctx.data["input_graph"]
        stats = distill(graph, teacher, ctx.data["train_data"], self.config, progress=self.progress)
        return PassResult(graph, changed=True, stats={k: v if k == "lr" else round(v, 4) for k, v in stats.items()})
