import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import ConfigError, PassContext, PassManager, RequirementError
from graphopt.training.distill import DistillConfig, cosine_loss, distill, kd_loss
from graphopt.passes import Distill
from graphopt.app.evaluate import top1_accuracy
from graphopt.tools import digits
from graphopt.tools.digits import train_batches, trained_digits_cnn


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(8, 10)
    assert kd_loss(logits, logits, None, 4.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, torch.randn(8, 10), None, 4.0, 1.0).item() > 0
    labels = torch.randint(0, 10, (8,))
    mixed = kd_loss(logits, logits, labels, 4.0, 0.5).item()
    assert mixed == pytest.approx(0.5 * nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


def _damaged_student():
    """The digits CNN as teacher, and a copy with noise added to every weight as student."""
    teacher = graphopt.trace(trained_digits_cnn(), torch.rand(2, 1, 8, 8))
    student = teacher.clone()
    with torch.no_grad():
        for p in student.gm.parameters():
            p.add_(0.3 * torch.randn_like(p) * p.abs().mean())
    return teacher, student


def test_distillation_recovers_a_damaged_student():
    teacher, student = _damaged_student()
    damaged = top1_accuracy(student, digits.test_batches())
    stats = distill(student, teacher, train_batches, DistillConfig(epochs=3, lr=2e-3), progress=False)
    recovered = top1_accuracy(student, digits.test_batches())
    assert stats["loss_last"] < stats["loss_first"]
    assert recovered > damaged
    assert recovered >= 0.95
    assert not student.gm.training


def test_distill_pass_needs_training_data_and_uses_the_input_graph_as_teacher():
    graph = graphopt.trace(trained_digits_cnn(), torch.rand(2, 1, 8, 8))
    with pytest.raises(RequirementError, match="train_data"):
        PassManager([Distill()]).run(graph)
    result = PassManager([Distill(epochs=0.5, progress=False)],
                         context=PassContext({"train_data": train_batches})).run(graph)
    assert result.records[1].contract == "none"
    assert result.records[1].stats["steps"] == 11  # half of 23 batches of 64


@pytest.mark.parametrize("kwargs, message", [({"epochs": 0}, "option 'epochs' must be a finite float > 0, got int 0"),
                                             ({"alpha": 1.5}, "option 'alpha' must be a finite float >= 0 and <= 1"),
                                             ({"temperature": -1.0}, "option 'temperature' must be a finite float > 0"),
                                             ({"epochs": float("inf")}, "option 'epochs' must be a finite float > 0"),
                                             ({"max_batches": 0}, "option 'max_batches' must be an int >= 1 or None"),
                                             ({"feature_weight": float("nan")},
                                              "option 'feature_weight' must be a number, not NaN"),
                                             ({"loss": "hinge"}, "option 'loss' must be one of kd, cosine, mse, got str 'hinge'"),
                                             ({"schedule": "step"}, "option 'schedule' must be one of constant, cosine")])
def test_bad_distillation_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Distill(**kwargs)


def test_embedding_distillation_needs_no_labels_and_pulls_directions_together():
    torch.manual_seed(0)
    teacher_net = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 8))
    inputs = torch.randn(4, 12)
    teacher = graphopt.trace(teacher_net, inputs)
    student = graphopt.trace(nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 8)), inputs)
    data = [((torch.randn(32, 12),), None) for _ in range(40)]
    x = torch.randn(256, 12)
    before = cosine_loss(student.gm(x), teacher.gm(x)).item()
    stats = distill(student, teacher, data, DistillConfig(epochs=5, lr=1e-2, loss="cosine"), progress=False)
    after = cosine_loss(student.gm(x), teacher.gm(x)).item()
    assert cosine_loss(x, 3 * x).item() == pytest.approx(0.0, abs=1e-6)   # scale does not count
    assert stats["loss_last"] < stats["loss_first"]
    assert after < 0.2 * before


def test_cosine_schedule_anneals_the_learning_rate_to_zero_over_the_run(monkeypatch):
    seen = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    net = nn.Sequential(nn.Linear(4, 3))
    teacher, student = graphopt.trace(net, torch.randn(2, 4)), graphopt.trace(nn.Sequential(nn.Linear(4, 3)),
                                                                           torch.randn(2, 4))
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(10)]
    distill(student, teacher, data, DistillConfig(epochs=1.5, lr=0.1, schedule="cosine"), progress=False)
    assert len(seen) == 15
    assert seen[0] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(seen, seen[1:]))
    assert seen[-1] < 0.01                   # the last step runs at nearly zero


def test_a_two_input_model_is_distilled_on_both_inputs_not_on_one_input_and_labels():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x1, x2):
            return self.a(x1) + self.b(x2)

    example = (torch.randn(2, 4), torch.randn(2, 4))
    teacher, student = graphopt.trace(Pair(), example), graphopt.trace(Pair(), example)
    data = [(torch.randn(8, 4), torch.randn(8, 4)) for _ in range(20)]
    gap = lambda: nn.functional.mse_loss(student.gm(*data[0]), teacher.gm(*data[0])).item()  # noqa: E731
    before = gap()
    distill(student, teacher, data, DistillConfig(epochs=10, lr=3e-2, loss="mse"), progress=False)
    assert gap() < 0.05 * before


def _endless(batch):
    """A streaming loader with no length that never ends (as a user's infinite generator)."""
    def stream():
        while True:
            yield batch
    return stream


def test_a_streaming_loader_is_read_only_up_to_max_batches():
    teacher = graphopt.trace(trained_digits_cnn(), torch.rand(2, 1, 8, 8))
    student = teacher.clone()
    batch = (torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    stats = distill(student, teacher, _endless(batch), DistillConfig(epochs=2.5, max_batches=3, lr=1e-3,
                                                                     schedule="cosine"), progress=False)
    assert stats["steps"] == 3 + 3 + 1   # two full epochs of 3, then half of one (rounded down, at least 1)
    with pytest.raises(ConfigError, match="cosine schedule needs the number of steps: give max_batches"):
        distill(student, teacher, _endless(batch)(), DistillConfig(epochs=1, schedule="cosine"), progress=False)


def test_a_nan_batch_is_named_and_leaves_the_weights_finite():
    teacher = graphopt.trace(trained_digits_cnn(), torch.rand(2, 1, 8, 8))
    student = teacher.clone()
    good = (torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    bad = (torch.full((16, 1, 8, 8), float("nan")), torch.randint(0, 10, (16,)))
    with pytest.raises(graphopt.DataError, match="batch 2 of epoch 1: input 0 holds NaN or Inf"):
        distill(student, teacher, [good, good, bad, good], DistillConfig(epochs=1, lr=1e-3), progress=False)
    assert all(torch.isfinite(p).all() for p in student.gm.parameters())
    assert not student.gm.training


def test_a_run_whose_first_steps_blow_up_restarts_from_the_same_weights_at_a_tenth_of_the_lr():
    teacher, student = _damaged_student()
    runs = {}
    for backoff in (False, True):
        graph = student.clone()
        torch.manual_seed(0)
        result = PassManager([Distill(epochs=1, lr=1.0, backoff=backoff, progress=False)],
                             context=PassContext({"train_data": train_batches, "teacher": teacher})).run(graph)
        runs[backoff] = (result.records[1].stats, top1_accuracy(result.graph, digits.test_batches()))
    (plain, plain_top1), (backed, backed_top1) = runs[False], runs[True]
    assert plain["restarts"] == 0 and plain["lr"] == 1.0
    assert backed["restarts"] >= 1 and backed["lr"] == pytest.approx(10.0 ** -backed["restarts"])
    assert backed["steps"] == plain["steps"] == 23         # the restarted run is a whole run
    assert backed_top1 > plain_top1 + 0.2 and backed_top1 >= 0.9


def test_a_healthy_run_keeps_its_learning_rate():
    teacher = graphopt.trace(trained_digits_cnn(), torch.rand(2, 1, 8, 8))
    result = PassManager([Distill(epochs=1, lr=2e-3, progress=False)],
                         context=PassContext({"train_data": train_batches})).run(teacher)
    assert result.records[1].stats["restarts"] == 0 and result.records[1].stats["lr"] == 2e-3


def test_probing_the_learning_rate_trains_at_the_one_whose_first_steps_do_best():
    teacher, student = _damaged_student()
    torch.manual_seed(0)
    stats = distill(student, teacher, train_batches, DistillConfig(epochs=1, lr=1.0, probe_lr=True), progress=False)
    assert stats["lr"] in (0.1, 0.01) and stats["restarts"] == 0 and stats["steps"] == 23
    assert top1_accuracy(student, digits.test_batches()) >= 0.9


def test_epoch_seconds_times_the_steps_not_the_set_up_and_leaves_the_weights():
    """Each batch costs 20 ms to read, and counting the epoch (10 batches, no length) reads them all
    again on every run: the estimate is the epoch's 10 steps (~0.2 s), not the counting pass."""
    import time

    from graphopt.training.distill import epoch_seconds

    teacher, student = _damaged_student()
    images, labels = next(iter(train_batches()))

    def slow():
        for _ in range(10):
            time.sleep(0.02)
            yield images, labels
    before = {k: v.clone() for k, v in student.gm.state_dict().items()}
    seconds = epoch_seconds(student, teacher, slow, DistillConfig(epochs=1.0))
    assert 0.18 <= seconds <= 0.6
    assert all(torch.equal(before[k], v) for k, v in student.gm.state_dict().items())
    assert epoch_seconds(student, teacher, iter([(images, labels)] * 3), DistillConfig(epochs=1.0)) is None
