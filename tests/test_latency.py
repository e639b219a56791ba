"""The interleaved timer every speed benchmark uses."""
import time

from graphopt.app.latency import interleaved_latency


def test_interleaved_latency_times_only_the_hot_calls():
    """``hot`` calls run untimed before each timed one: here every hot call is slow and every
    timed call instant, so the medians must stay far below the slow call's time."""
    calls = {"a": 0, "b": 0}

    def runner(name):
        def run():
            calls[name] += 1
            if calls[name] > 2 and calls[name] % 2 == 1:  # after warm-up: odd calls are the hot ones
                time.sleep(0.02)
        return run

    times = interleaved_latency({"a": runner("a"), "b": runner("b")}, rounds=5, warmup=2, hot=1)
    assert calls == {"a": 2 + 5 * 2, "b": 2 + 5 * 2}
    assert max(times.values()) < 0.01


def test_eager_breakdown_sees_which_convs_torch_keeps_from_onednn():
    """torch runs a batch-1 3x3 conv on at most 20480 input elements with its own kernel, and
    larger ones in oneDNN: the breakdown must find the first kind and time only the second in
    oneDNN's log (if torch changes that rule, this says so)."""
    import torch
    import torch.nn as nn

    from benchmarks.prune_eager_breakdown import im2col_convs, onednn_ms

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1).eval()
    small, large = torch.randn(1, 8, 7, 7), torch.randn(1, 8, 64, 64)
    assert [c for c, _ in im2col_convs(conv, small)] == [conv]
    assert im2col_convs(conv, large) == []
    with torch.no_grad():
        assert onednn_ms(lambda: conv(small), calls=1) == 0.0
        assert onednn_ms(lambda: conv(large), calls=1) > 0.0
