"""A small CNN trained on Fashion-MNIST: the real-data accuracy check for int8 PTQ.

    python -m graphopt.tools.fashion_cnn train     # 2 epochs, writes tools/examples/fashion_cnn.pt
    python -m graphopt.tools.fashion_cnn ptq       # fp32 vs int8 (simulated, ONNX, TorchScript) test accuracy
"""
from __future__ import annotations

import os
import sys
import tempfile

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


def ptq_report(observer: str = "mse") -> dict[str, float]:
    """Test accuracy of fp32, the simulated-int8 graph and both int8 artifacts."""
    import graphopt
    from graphopt import PassContext, PassManager
    from graphopt.backends import onnx_int8, torchscript_int8
    from graphopt.evaluate import top1_accuracy
    from graphopt.passes import FoldBatchNorm, FoldQDQ, InsertQDQ

    graph = graphopt.trace(trained_fashion_cnn(), next(calibration_batches())[0][:4])  # real images: the
    # contract is checked on the example inputs, which must look like the calibration data
    result = PassManager([FoldBatchNorm(), InsertQDQ(observer=observer, progress=False), FoldQDQ()],
                         context=PassContext({"calibration_data": calibration_batches})).run(graph)
    int8 = result.graph
    accuracy = {"fp32": top1_accuracy(graph, fashion_mnist.test_batches()),
                "int8 simulated": top1_accuracy(int8, fashion_mnist.test_batches())}
    with tempfile.TemporaryDirectory() as folder:
        onnx = onnx_int8.export(int8, os.path.join(folder, "m.onnx"))
        ts = torchscript_int8.export(int8, os.path.join(folder, "m.pt"))
        accuracy["int8 ONNX (onnxruntime)"] = top1_accuracy(onnx.runner, fashion_mnist.test_batches())
        accuracy["int8 TorchScript"] = top1_accuracy(torch.jit.load(ts.path), fashion_mnist.test_batches())
    return accuracy


if __name__ == "__main__":
    if sys.argv[1:2] == ["train"]:
        model = train()
        torch.save(model.state_dict(), CHECKPOINT)
        print(f"wrote {CHECKPOINT}")
    else:
        for name, value in ptq_report(*(sys.argv[2:3] or ["mse"])).items():
            print(f"{name:28s} {100 * value:.2f}%")
