"""Fashion-MNIST from Debian's dataset-fashion-mnist package (real 28x28 images, 10 classes).

Install with ``apt-get install -y dataset-fashion-mnist``; nothing is downloaded at run time.
"""
from __future__ import annotations

import gzip
import os
from functools import lru_cache

import numpy as np
import torch

from graphopt.errors import ConfigError

ROOT = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
MEAN, STD = 0.2860, 0.3530


def available() -> bool:
    return all(os.path.exists(os.path.join(ROOT, f)) for pair in _FILES.values() for f in pair)


@lru_cache(maxsize=2)
def load(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images N x 1 x 28 x 28 float, normalised; labels N int64) for 'train' or 'test'."""
    if split not in _FILES:
        raise ConfigError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    images_file, labels_file = (os.path.join(ROOT, f) for f in _FILES[split])
    if not os.path.exists(images_file):
        raise ConfigError(f"Fashion-MNIST not found in {ROOT}: apt-get install -y dataset-fashion-mnist")
    with gzip.open(images_file) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(labels_file) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    x = (torch.from_numpy(images.astype(np.float32)) / 255.0 - MEAN) / STD
    return x, torch.from_numpy(labels.astype(np.int64))


def batches(split: str = "train", batch_size: int = 128, limit: int | None = None, shuffle: bool = False,
            seed: int = 0):
    """(images, labels) batches; ``limit`` keeps the first N samples (after shuffling)."""
    x, y = load(split)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(y))
    if limit:
        order = order[:limit]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


def shuffled_epochs(batch_size: int = 128, limit: int | None = None, seed: int = 0):
    """A training-data callable: each call is one epoch over the training set (or a fixed subset:
    the first ``limit`` samples of one seed-0 shuffle) in a new order (seeds seed+1, seed+2, ...)."""
    x, y = load("train")
    pool = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:limit] if limit \
        else torch.arange(len(y))
    epoch = [seed]

    def one_epoch():
        epoch[0] += 1
        order = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(epoch[0]))]
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]

    return one_epoch


def test_batches(batch_size: int = 256):
    return batches("test", batch_size)


def train_classifier(model: torch.nn.Module, epochs: int, lr: float = 2e-3, weight_decay: float = 0.0,
                     one_cycle: bool = False, data=None) -> torch.nn.Module:
    """Cross-entropy training with AdamW (plain Adam at weight_decay 0), optionally a
    one-cycle schedule. ``data(epoch)`` yields (images, labels); by default the whole
    training set, shuffled with the epoch as seed. Returns the model in eval mode."""
    import torch.nn.functional as F

    data = data or (lambda epoch: batches("train", 128, shuffle=True, seed=epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    epoch_batches = [list(data(0))]
    scheduler = (torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * len(epoch_batches[0]))
                 if one_cycle else None)
    model.train()
    for epoch in range(epochs):
        for x, y in (epoch_batches.pop() if epoch_batches else data(epoch)):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if scheduler:
                scheduler.step()
    return model.eval()


def cached_model(path: str, build, train) -> torch.nn.Module:
    """``build()`` loaded from ``path`` if it exists, else ``train(build())`` saved there."""
    model = build()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = train(model)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()
