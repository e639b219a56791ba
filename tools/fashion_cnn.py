"""A small CNN trained on Fashion-MNIST, with committed weights: the real-data model of the int8
tests and benchmarks (its accuracy per int8 target: ``python -m benchmarks.quant_accuracy_fashion``).

    python -m graphopt.tools.fashion_cnn train     # 2 epochs, writes tools/examples/fashion_cnn.pt
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn as nn

from graphopt.tools import fashion_mnist

CHECKPOINT = os.path.join(os.path.dirname(__file__), "examples", "fashion_cnn.pt")


class FashionCNN(nn.Module):
    """conv-bn-relu, pool, conv-bn-relu, pool, conv-bn-relu with a residual add, linear."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
                                   nn.ReLU(), nn.MaxPool2d(2))
        self.conv3 = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(2 * width))
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.stem(x))
        x = self.relu(self.conv3(x) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


def trained_fashion_cnn() -> FashionCNN:
    model = FashionCNN()
    model.load_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    return model.eval()


def train(epochs: int = 2, seed: int = 0) -> FashionCNN:
    torch.manual_seed(seed)
    return fashion_mnist.train_classifier(FashionCNN(), epochs, lr=2e-3)


def calibration_batches():
    """1 024 training images (never test images) in batches of 128."""
    return fashion_mnist.batches("train", 128, limit=1024, shuffle=True, seed=123)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train 2 epochs and write tools/examples/fashion_cnn.pt")
    parser.parse_args(argv)
    model = train()
    torch.save(model.state_dict(), CHECKPOINT)
    print(f"wrote {CHECKPOINT}")


if __name__ == "__main__":
    main()
