"""Train the bundled digits CNN and write tools/examples/digits_cnn.pt.

    python -m graphopt.tools.train_digits [--epochs 30] [--out PATH]

Deterministic (seed 0, one thread): a rerun writes the same weights on the same torch build.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from graphopt.tools.digits import CHECKPOINT, DigitsCNN, digits_split


def train(epochs: int = 30, seed: int = 0) -> tuple[DigitsCNN, float]:
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = digits_split()
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    for _ in tqdm(range(epochs), desc="train"):
        model.train()
        order = torch.randperm(len(y_train))
        for start in range(0, len(order), 64):
            idx = order[start:start + 64]
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            optimizer.step()
        scheduler.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return model, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default=CHECKPOINT)
    args = parser.parse_args()
    model, accuracy = train(args.epochs)
    torch.save(model.state_dict(), args.out)
    print(f"held-out accuracy {accuracy:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
