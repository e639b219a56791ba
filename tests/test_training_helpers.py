"""The shared training helpers that the benchmarks build their baselines with."""
import torch

from graphopt.app.evaluate import top1_accuracy
from graphopt.tools import digits, fashion_mnist
from graphopt.trace import trace


def test_train_classifier_learns_and_cached_model_reloads(tmp_path):
    torch.manual_seed(0)
    train = lambda m: fashion_mnist.train_classifier(  # noqa: E731
        m, 3, lr=3e-3, weight_decay=1e-4, one_cycle=True, data=lambda epoch: digits.train_batches())
    path = str(tmp_path / "cache" / "digits.pt")
    model = fashion_mnist.cached_model(path, digits.DigitsCNN, train)
    assert not model.training
    accuracy = top1_accuracy(trace(model, torch.rand(1, 1, 8, 8)), digits.test_batches())
    assert accuracy >= 0.9
    again = fashion_mnist.cached_model(path, digits.DigitsCNN, lambda m: 1 / 0)  # must not retrain
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

