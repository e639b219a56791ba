import pytest
import torch
import torch.nn as nn

import graphopt.backends  # noqa: F401  (registers built-in backends)
import graphopt.passes  # noqa: F401  (registers built-in passes)
from graphopt.tools.random_init import informative_init


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_bn(model: nn.Module) -> nn.Module:
    """Weights that make comparisons meaningful (see graphopt.tools.random_init)."""
    return informative_init(model)


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
