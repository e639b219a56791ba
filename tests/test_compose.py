"""Passes compose in one pipeline: pruning then low-rank splitting, and the reverse."""
import pytest
import torch
import torchvision

import graphopt
from graphopt import PassManager
from graphopt.passes import FoldBatchNorm, PruneChannels, SplitLowRank

from conftest import randomize_bn


@pytest.mark.parametrize("order", ["prune_then_split", "split_then_prune"])
def test_prune_and_split_compose(order):
    model = randomize_bn(torchvision.models.resnet18(weights=None))
    x = torch.randn(1, 3, 64, 64)
    prune, split = PruneChannels(target_macs=0.7), SplitLowRank(target_macs=0.7)
    passes = [FoldBatchNorm()] + ([prune, split] if order == "prune_then_split" else [split, prune])
    result = PassManager(passes).run(graphopt.trace(model, x))
    records = {r.name: r for r in result.records}
    assert records["prune_channels"].contract_error <= 1e-5
    assert result.records[-1].macs <= 0.7 * 0.7 * result.records[0].macs * 1.02
    assert result.graph.run(x).shape == (1, 1000)
