"""A representative torchvision subset at 30% channels, each structure covered once:
residual adds, concat (DenseNet, Inception), depthwise + squeeze-excite (MobileNetV3,
EfficientNet), channels-last MLP with LayerNorm and layer scale (ConvNeXt), grouped conv
(ResNeXt), channel shuffle (ShuffleNet), attention heads + FFN (ViT).
The full 80-model sweep is `python -m benchmarks.prune_zoo`."""
import pytest
import torch
import torchvision

import graphopt
from graphopt.passes import PruneChannels

from conftest import randomize_bn

CASES = {
    "resnet18": (64, 0.55),
    "densenet121": (64, 0.60),
    "mobilenet_v3_small": (64, 0.65),
    "efficientnet_b0": (64, 0.75),
    "googlenet": (64, 0.60),
    "resnext50_32x4d": (64, 0.80),
    "shufflenet_v2_x0_5": (64, 0.95),
    "convnext_tiny": (64, 0.80),
    "vit_b_16": (224, 0.75),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_zoo_model_prunes_and_matches_the_masked_original(name):
    size, max_macs = CASES[name]
    model = randomize_bn(torchvision.models.get_model(name, weights=None))
    graph = graphopt.trace(model, torch.randn(1, 3, size, size))
    result = graphopt.PassManager([PruneChannels(ratio=0.3)]).run(graph)
    before, after = result.records
    assert after.stats["channels_removed"] > 0
    assert after.contract_error <= 1e-5
    assert after.max_error > 1e-4  # pruning did change the outputs, so the oracle compared something real
    assert after.macs / before.macs <= max_macs
    x = torch.randn(2, 3, size, size)
    assert result.graph.run(x).shape == (2, 1000)
