import pytest
import torch
import torch.nn as nn

import graphopt.backends  # noqa: F401  (registers built-in backends)
import graphopt.passes  # noqa: F401  (registers built-in passes)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_bn(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics so folding is really exercised, and
    re-draw all-zero weights (ViT's zero-initialised head would make every output 0 and
    every comparison vacuous)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.any():
                nn.init.normal_(m.weight, std=0.02)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model.eval()


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8 * 4 * 4, 6, bias=False)
        self.bn1d = nn.BatchNorm1d(6)

    def forward(self, x):
        x = self.drop(self.relu(self.bn(self.conv(x))))
        return self.bn1d(self.fc(torch.flatten(x, 1)))


@pytest.fixture
def conv_bn_relu():
    return randomize_bn(ConvBnRelu())
