"""The bundled example: a small CNN for scikit-learn's 8x8 digits, and its data splits.

The split is fixed (stratified, seed 0, 20% held out) so the committed checkpoint's
held-out accuracy is reproducible anywhere. The model and its checkpoint need only torch; the
data needs scikit-learn, graphopt's ``examples`` extra (``pip install 'graphopt[examples]'``;
``requirements.txt`` pins it).
"""
from __future__ import annotations

import os
from typing import Iterator

import torch
import torch.nn as nn

from graphopt.errors import ConfigError

EXTRA_HINT = "pip install 'graphopt[examples]' (or pip install -r requirements.txt)"
EXAMPLES = os.path.join(os.path.dirname(__file__), "examples")
CHECKPOINT = os.path.join(EXAMPLES, "digits_cnn.pt")


class DigitsCNN(nn.Module):
    """conv-bn-relu x2, pool, dropout, linear: the shapes every foundation pass touches."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * width * 16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def trained_digits_cnn() -> DigitsCNN:
    """The committed, trained example model."""
    model = DigitsCNN()
    model.load_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    return model.eval()


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels); images N x 1 x 8 x 8 in [0, 1]."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ConfigError(f"the digits example's data needs scikit-learn ({exc}): "
                          f"{EXTRA_HINT}") from exc

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(range(len(labels)), test_size=0.2, random_state=0,
                                           stratify=digits.target)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def _batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> Iterator[tuple]:
    for start in range(0, len(labels), batch_size):
        yield images[start:start + batch_size], labels[start:start + batch_size]


def test_batches(batch_size: int = 64) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Held-out digits as (images, labels) batches."""
    _, _, images, labels = digits_split()
    return _batches(images, labels, batch_size)


def train_batches(batch_size: int = 64) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    images, labels, _, _ = digits_split()
    return _batches(images, labels, batch_size)
