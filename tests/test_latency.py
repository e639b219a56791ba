"""The interleaved timer every speed benchmark uses."""
import time

from graphopt.latency import interleaved_latency


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
