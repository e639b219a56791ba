"""Channel importance criteria for structured pruning: small, swappable objects.

A criterion maps a channel group to one score per channel (higher = more important).
Scores sum over every weight slice the group's channels own (producer rows, consumer
columns, depthwise filters), so a channel that feeds many layers counts all of them.
Users pass their own by subclassing ``Importance`` (or any callable with that signature).
"""
from __future__ import annotations

from typing import Annotated, Callable, Iterable

import torch
import torch.nn.functional as F
from pydantic import AfterValidator

from graphopt import distributed
from graphopt.data import check_labels, read_batch
from graphopt.pruning.channels import DEPTHWISE, EMBED, HEADS, IN, NORM, OUT, ChannelGroup, Member
from graphopt.errors import ConfigError
from graphopt.ir import Graph
from graphopt.options import Expect
from graphopt.registry import Registry

WEIGHT_ROLES = (OUT, IN, DEPTHWISE, EMBED, HEADS)


def member_rows(tensor: torch.Tensor, member: Member, size: int) -> torch.Tensor:
    """The ``size`` x k matrix of ``tensor``'s entries that belong to each channel of the group."""
    moved = tensor.detach().movedim(member.axis, 0)
    block = moved[member.offset:member.offset + size * member.inner]
    return block.reshape(size, -1)


class Importance:
    """Base criterion: ``scores(graph, group) -> Tensor[group.size]``."""

    name = ""
    needs_data = False

    def tensor(self, graph: Graph, qualname: str) -> torch.Tensor:
        return graph.attr(qualname)

    def rows(self, graph: Graph, group: ChannelGroup, roles: Iterable[str]) -> list[torch.Tensor]:
        return [member_rows(self.tensor(graph, f"{m.target}.{name}"), m, group.size)
                for m in group.members if m.role in roles
                for name in (m.tensors or ("in_proj_weight" if m.role == HEADS else "weight",))]

    def scores(self, graph: Graph, group: ChannelGroup) -> torch.Tensor:
        raise NotImplementedError


CRITERIA: Registry[type[Importance]] = Registry("importance criterion", "importance criteria")


def register_importance(name: str) -> Callable[[type[Importance]], type[Importance]]:
    """Class decorator: make an Importance subclass available by ``name`` (``importance = "name"``)."""
    def decorate(cls: type[Importance]) -> type[Importance]:
        CRITERIA.add(name, cls)
        cls.name = name
        return cls
    return decorate


@register_importance("l1")
class L1(Importance):
    """Sum of |w| over the group's slices."""

    def scores(self, graph, group):
        return sum(r.abs().sum(1) for r in self.rows(graph, group, WEIGHT_ROLES))


@register_importance("l2")
class L2(Importance):
    """Euclidean norm of the group's slices taken together."""

    def scores(self, graph, group):
        return sum(r.pow(2).sum(1) for r in self.rows(graph, group, WEIGHT_ROLES)).sqrt()


@register_importance("bn_scale")
class BNScale(Importance):
    """|gamma| of the group's BatchNorms (network slimming); L2 where a group has none."""

    def scores(self, graph, group):
        gammas = [member_rows(graph.attr(f"{m.target}.weight"), m, group.size).abs().sum(1)
                  for m in group.members if m.role == NORM and getattr(graph.gm.get_submodule(m.target),
                                                                        "weight", None) is not None]
        return sum(gammas) if gammas else L2().scores(graph, group)


@register_importance("fpgm")
class FPGM(Importance):
    """Distance to the other filters of the same layer (He et al. 2019): filters near the
    geometric median are the most replaceable."""

    def scores(self, graph, group):
        rows = self.rows(graph, group, (OUT, EMBED, HEADS))
        if not rows:
            return L2().scores(graph, group)
        return sum(torch.cdist(r.unsqueeze(0).float(), r.unsqueeze(0).float())[0].sum(1) for r in rows)


@register_importance("taylor")
class Taylor(Importance):
    """First-order Taylor |w * dL/dw| summed over the group's slices, on a few batches of
    training data (the gradient criterion; Molchanov et al. 2019)."""

    needs_data = True

    def __init__(self, batches: int = 4):
        self.batches = batches
        self.saliency: dict[str, torch.Tensor] = {}

    def prepare(self, graph: Graph, data: Callable | Iterable) -> None:
        """Average the gradients over ``batches`` training batches; under torchrun each rank reads
        its share of them and the sums are all-reduced, so every rank scores alike."""
        gm = graph.gm
        grads = {n: torch.zeros_like(p) for n, p in gm.named_parameters()}
        seen = 0
        data = distributed.shard(data, "taylor importance: train_data")
        limit = distributed.rank_share(self.batches)
        for batch in (data() if callable(data) else data):
            if seen >= limit:
                break
            where = f"taylor importance: training batch {seen}"
            inputs, labels = read_batch(graph, batch, where)
            gm.zero_grad()
            with torch.enable_grad():
                out = gm(*inputs)
                check_labels(labels, out, where)
                loss = F.cross_entropy(out, labels) if labels is not None else out.pow(2).mean()
                loss.backward()
            for n, p in gm.named_parameters():
                if p.grad is not None:
                    grads[n] += p.grad.detach()
            seen += 1
        gm.zero_grad()
        if distributed.active():
            names = list(grads)
            grads = dict(zip(names, distributed.all_reduce_many([grads[n] for n in names])))
            seen = int(distributed.all_reduce(torch.tensor([seen], dtype=torch.int64)).item())
        if not seen:
            raise ConfigError("taylor importance: the training data yielded no batches")
        self.saliency = {n: (p.detach() * grads[n] / seen).abs() for n, p in gm.named_parameters()}

    def tensor(self, graph, qualname):
        if qualname not in self.saliency:
            raise ConfigError("taylor importance used before prepare(); it needs train_data")
        return self.saliency[qualname]

    def scores(self, graph, group):
        return sum(r.sum(1) for r in self.rows(graph, group, WEIGHT_ROLES))


def make_importance(spec: str | Importance) -> Importance:
    if isinstance(spec, Importance):
        return spec
    return CRITERIA.get(spec)()


def _known(spec: str | Importance) -> str | Importance:
    if not isinstance(spec, Importance) and spec not in CRITERIA:
        raise ValueError(_listing())
    return spec


def _listing() -> str:
    return f"one of {', '.join(CRITERIA)} or an Importance object"


# the type of an ``importance`` option: a registered criterion's name or a criterion object
ImportanceSpec = Annotated[str | Importance, Expect(_listing), AfterValidator(_known)]
