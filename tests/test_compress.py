"""graphopt.compress: the search answers the goal it was given, on the bundled digits CNN with its
real held-out data, and says clearly when it cannot."""
import json
import os

import pytest
import torch

import graphopt
from graphopt.backends import packed
from graphopt.errors import ConfigError, EvaluationError, PassFailed
from graphopt.app.evaluate import top1_accuracy
from graphopt.search import Goal, compress
from graphopt.search.baselines import ORT_RECIPES
from graphopt.search.frontier import choose, pareto_front
from graphopt.search.goal import make_goal
from graphopt.tools import digits
from graphopt.tools.cli import main

EXAMPLE = os.path.join(os.path.dirname(digits.__file__), "examples", "digits_compress.toml")
PNG = b"\x89PNG\r\n\x1a\n"


def _digits(out_dir, **goal):
    # at most 8 epochs of distillation: budgets here are long so that max_trials ends the runs, and
    # would let the digits CNN's cheap epochs run 32
    return compress(digits.trained_digits_cnn(), torch.randn(1, 1, 8, 8), evaluate="top1",
                    eval_data=digits.test_batches, data=digits.train_batches,
                    goal={"max_drop": 1.0, "max_finetune_epochs": 8, **goal}, out_dir=str(out_dir), progress=False)


@pytest.fixture(scope="module")
def size_run(tmp_path_factory):
    return _digits(tmp_path_factory.mktemp("size"), objective="size", max_trials=10, max_minutes=30)


def test_size_goal_gives_a_smaller_file_within_the_drop(size_run):
    r = size_run
    assert r.chosen is not None and r.chosen.feasible
    assert r.original.metric == pytest.approx(100 * top1_accuracy(digits.trained_digits_cnn(), digits.test_batches()))
    assert r.original.metric - r.chosen.metric <= 1.0 + 1e-9
    # the file on disk, reloaded on its own, is what the search measured
    loaded = packed.load(r.artifact)
    assert 100 * top1_accuracy(loaded, digits.test_batches()) == pytest.approx(r.chosen.metric)
    assert os.path.getsize(r.artifact) == r.chosen.size_bytes
    assert r.fp32_file_bytes / r.chosen.size_bytes >= 5     # 13x measured; structure overhead dominates here
    # the choice is the cheapest feasible candidate, and no complete candidate dominates it
    feasible = [t for t in r.trials if t.feasible]
    assert r.chosen.size_bytes == min(t.size_bytes for t in feasible)
    assert r.chosen in r.front


def test_report_plots_and_json_describe_the_run(size_run):
    r = size_run
    text = open(r.report).read()
    assert f"trial {r.chosen.number}" in text and r.chosen.recipe.label() in text
    for step in r.chosen.steps:
        assert step["name"] in text
    for path in r.plots.values():
        with open(path, "rb") as f:
            assert f.read(8) == PNG
    data = json.load(open(os.path.join(r.out_dir, "compress.json")))
    assert data["chosen"]["number"] == r.chosen.number
    assert len(data["trials"]) == len(r.trials)
    assert data["chosen_factors"]["smaller"] == pytest.approx(r.fp32_file_bytes / r.chosen.size_bytes)
    # the goal's cap on distillation holds, where 30 minutes would have let the digits CNN run 32 epochs
    assert "is 8 epochs (the goal's max_finetune_epochs)" in text
    assert max(t.recipe.finetune for t in r.trials) == 8.0


def test_a_resumed_study_builds_nothing_again(size_run):
    again = _digits(size_run.out_dir, objective="size", max_trials=12, max_minutes=30)
    first = len(size_run.trials)
    # the first run's candidates come back from the study's journal as they were measured, not rebuilt
    assert [t.to_dict() for t in again.trials[:first]] == [t.to_dict() for t in size_run.trials]
    assert len(again.trials) == 12
    assert len({t.recipe for t in again.trials}) == 12                  # nothing built twice
    assert again.chosen.size_bytes <= size_run.chosen.size_bytes


def test_latency_goal_times_peers_and_accuracy_control(tmp_path):
    r = _digits(tmp_path, objective="latency", batch_size=64, max_trials=4, max_minutes=3)
    assert [b.name for b in r.baselines] == list(ORT_RECIPES)
    for b in r.baselines:
        assert 90 <= b.metric <= 100 and b.latency_ms > 0 and os.path.isfile(b.artifact)
    assert r.accuracy_control is not None and r.accuracy_control.recipe.quant == "int8"
    plain = r.trials[0]   # the original's fp32 export competes: the answer is never slower than the model given
    assert plain.recipe.label() == "original" and plain.backend == "onnx" and plain.metric == r.original.metric
    assert r.latency["trial 0"] == r.latency["original"]   # one file: one timing, not two noisy ones
    assert r.chosen is not None and r.chosen.feasible
    assert {"original", f"trial {r.chosen.number}"} <= set(r.latency)   # timed side by side at the end
    assert r.artifact.endswith(".onnx") and os.path.isfile(r.artifact)


def test_stopped_early_it_still_answers(tmp_path):
    r = _digits(tmp_path, objective="size", max_trials=50, max_minutes=0.01)
    assert r.stopped_by == "max_minutes"
    assert 1 <= len(r.trials) < 50
    assert r.chosen is not None


def test_a_round_starts_only_while_the_time_left_holds_the_slowest_trial():
    from graphopt.search.compress import _out_of_time
    from graphopt.search.recipe import Recipe
    from graphopt.search.trial import Trial

    done = [Trial(0, Recipe(), "onnx", seconds=1.0), Trial(1, Recipe(prune=0.5, finetune=32), "onnx", seconds=190.0)]
    assert not _out_of_time(done, now=500.0, deadline=810.0)   # 310 s left
    assert _out_of_time(done, now=720.0, deadline=810.0)       # 90 s left: the next could take 190
    failed = [Trial(0, Recipe(prune=0.5), "onnx", seconds=300.0, status="failed")]
    assert not _out_of_time(failed, now=900.0, deadline=810.0)   # nothing measured yet: one more
    assert not _out_of_time([], now=900.0, deadline=810.0)


def test_an_unreachable_goal_reports_the_shortfall(tmp_path):
    # cosine similarity to the original cannot stay at exactly 100 once anything is compressed
    r = compress(digits.trained_digits_cnn(), torch.randn(1, 1, 8, 8), evaluate="cosine",
                 eval_data=digits.test_batches, data=digits.train_batches,
                 goal={"max_drop": 0.0, "objective": "size", "max_trials": 3}, out_dir=str(tmp_path), progress=False)
    assert r.chosen is None and r.artifact is None
    best = min(t.drop for t in r.trials if t.drop is not None)
    assert best > 0
    assert "No candidate met the constraint" in open(r.report).read()
    assert f"{best:.3g}" in r.summary()


def test_evaluate_failures_name_the_trial(tmp_path):
    calls = []

    def flaky(run):
        calls.append(1)
        if len(calls) > 5:   # the original and the four points of the pruning sweep pass
            raise RuntimeError("metric server down")
        return 50.0

    with pytest.raises(EvaluationError, match=r"evaluate failed on trial 0 .*metric server down"):
        compress(digits.trained_digits_cnn(), torch.randn(1, 1, 8, 8), evaluate=flaky, data=digits.train_batches,
                 goal={"objective": "size", "max_trials": 2}, out_dir=str(tmp_path), progress=False)
    with pytest.raises(EvaluationError, match="returned 'good' on the original model; it must return a finite number"):
        compress(digits.trained_digits_cnn(), torch.randn(1, 1, 8, 8), evaluate=lambda run: "good",
                 goal={"objective": "size"}, out_dir=str(tmp_path), progress=False)


@pytest.mark.parametrize("fields, message", [
    ({"runtime": "tensorrt"}, r"runtime: Input should be 'onnxruntime' or 'torch' \(got 'tensorrt'\)"),
    ({"objective": "speed"}, "objective: Input should be 'latency', 'size' or 'macs'"),
    ({"max_drop": -1}, "max_drop: Input should be greater than or equal to 0"),
    ({"max_drop": 1, "max_relative_drop": 0.01}, "not both"),
    ({"max_trails": 3}, "max_trails: Extra inputs are not permitted"),
    ({"max_finetune_epochs": 0}, "max_finetune_epochs: Input should be greater than 0"),
])
def test_goal_fields_are_checked(fields, message):
    with pytest.raises(ConfigError, match=message):
        make_goal(fields)


def test_allowed_drop():
    assert Goal().allowed_drop(90.0) == 1.0
    assert Goal(max_drop=0.5).allowed_drop(90.0) == 0.5
    assert Goal(max_relative_drop=0.02).allowed_drop(80.0) == pytest.approx(1.6)


def test_pareto_front_and_choice():
    points = [(90, 5), (91, 7), (89, 4), (91, 6), (85, 9), (92, 10)]   # (metric, cost)
    front = pareto_front(points, lambda p: p[0], lambda p: p[1])
    assert front == [(89, 4), (90, 5), (91, 6), (92, 10)]
    assert choose(points, lambda p: p[0], lambda p: p[1], lambda p: p[0] >= 90.5) == (91, 6)
    assert choose(points, lambda p: p[0], lambda p: p[1], lambda p: p[0] > 99) is None


def test_graphopt_exposes_compress_lazily():
    assert graphopt.compress is compress and graphopt.Goal is Goal


def test_cli_compress_refuses_a_bad_spec(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(open(EXAMPLE).read().replace('objective = "size"', 'objective = "speed"')
                    .replace('"digits_cnn.pt"', repr(os.path.join(os.path.dirname(EXAMPLE), "digits_cnn.pt"))))
    assert main(["compress", str(spec)]) == 2
    assert "[goal]: objective: Input should be 'latency', 'size' or 'macs' (got 'speed')" in capsys.readouterr().err
    checkpoint = os.path.join(os.path.dirname(EXAMPLE), "digits_cnn.pt")
    assert main(["compress", EXAMPLE, "--out", checkpoint]) == 2
    assert "is a file; give a directory" in capsys.readouterr().err


def test_sampled_knobs_round_trip_through_the_study_parameters():
    """What the search enqueues (a seed, accuracy control) is what the sampler rebuilds from it:
    round_to is asked only for a pruned candidate, so an unpruned one keeps every width."""
    from dataclasses import replace
    from types import SimpleNamespace

    from optuna.trial import FixedTrial

    from graphopt.search.compress import _Search, _params, _seeds
    from graphopt.search.recipe import Recipe, Space

    space = Space.for_goal(Goal(objective="latency"), has_train_data=True)
    assert space.round_to[0] > 1
    seeds = _seeds(space)
    assert [s.prune for s in seeds] == [0.35, 0.7]   # the Space's own range, before the sensitivity stage
    assert all(s.round_to == space.round_to[0] and s.quant == "int8" and s.finetune for s in seeds)
    size = Space.for_goal(Goal(objective="size"), has_train_data=True)
    size_seeds = _seeds(size)
    assert size_seeds[0].sparsity and size_seeds[0].share_bits == 4   # Deep Compression's compound first
    # at half the range, then a grid step short of its end
    assert [(s.prune, s.sparsity, s.share_bits) for s in size_seeds] == [(0.35, 0.7, 4), (0.65, 0.7, 4),
                                                                        (0.35, 0.0, 5), (0.7, 0.0, 5)]
    assert [s.prune for s in _seeds(replace(size, max_prune=0.05))] == [0.0, 0.05]   # sparse and shared, unpruned
    assert [s.prune for s in _seeds(replace(size, max_prune=0.0))] == [0.0]
    for where, recipe in [(space, r) for r in (*seeds, Recipe(), Recipe(quant="int8", sensitive_float=2),
                                               Recipe(prune=0.3, scope="uniform", protect=1, round_to=8,
                                                      finetune=1.0, quant="int8", qat=1.0))] \
            + [(size, r) for r in size_seeds]:
        params = _params(where, recipe)
        search = SimpleNamespace(space=where, bench=SimpleNamespace(reach=lambda round_to, protect: 1.0))
        assert _Search.sample(search, FixedTrial(params)) == recipe
    # a share deeper than the pass reaches with the sampled widths is asked as the deepest it reaches
    shallow = SimpleNamespace(space=space, bench=SimpleNamespace(reach=lambda round_to, protect: 0.45))
    assert _Search.sample(shallow, FixedTrial(_params(space, seeds[1]))) == replace(seeds[1], prune=0.45)
    none_left = SimpleNamespace(space=space, bench=SimpleNamespace(reach=lambda round_to, protect: 0.0))
    assert _Search.sample(none_left, FixedTrial(_params(space, seeds[1]))) == replace(seeds[1], prune=0.0, round_to=1)
    assert "round_to" not in _params(space, Recipe(quant="int8"))


def test_a_candidate_with_drop_to_spare_is_pushed_one_step_harder():
    from graphopt.search.compress import _harder
    from graphopt.search.recipe import Recipe, Space

    space = Space(max_prune=0.65, sparsity=(0.0, 0.5, 0.7, 0.85))
    seed = Recipe(prune=0.3, finetune=8.0, sparsity=0.7, share_bits=4)

    def anywhere(round_to, protect):   # the pass reaches every share
        return 1.0
    assert _harder(space, seed, anywhere) == [Recipe(prune=0.4, finetune=8.0, sparsity=0.7, share_bits=4),
                                              Recipe(prune=0.3, finetune=8.0, sparsity=0.85, share_bits=4)]
    assert _harder(space, Recipe(prune=0.6, quant="int8"), anywhere) == [Recipe(prune=0.65, quant="int8")]
    assert _harder(space, Recipe(prune=0.65, sparsity=0.85), anywhere) == []
    assert _harder(space, Recipe(quant="int8", sensitive_float=1), anywhere) == []   # nothing to turn further
    # no deeper than the pass reaches with the recipe's widths and protection
    reach = {(16, 0): 0.5, (1, 0): 0.9}.get
    assert _harder(space, Recipe(prune=0.45, round_to=16), lambda *key: reach(key)) == [Recipe(prune=0.5, round_to=16)]
    assert _harder(space, Recipe(prune=0.5, round_to=16), lambda *key: reach(key)) == []
    # no deeper than a grid step short of a built recipe that lost too much and differs only in pruning
    lost = [Recipe(prune=0.6, finetune=8.0, sparsity=0.7, share_bits=4), Recipe(prune=0.45, share_bits=4)]
    assert _harder(space, Recipe(prune=0.5, finetune=8.0, sparsity=0.7, share_bits=4), anywhere, lost)[0].prune == 0.55
    assert _harder(space, Recipe(prune=0.55, finetune=8.0, sparsity=0.7, share_bits=4), anywhere, lost) \
        == [Recipe(prune=0.55, finetune=8.0, sparsity=0.85, share_bits=4)]
    assert _harder(space, Recipe(prune=0.3, finetune=8.0, sparsity=0.7, share_bits=4), anywhere, lost)[0].prune == 0.4


def test_the_search_pushes_its_best_seed_while_it_keeps_the_drop(size_run):
    from dataclasses import replace

    trials = size_run.trials
    half, deep = trials[0].recipe, trials[1].recipe   # Deep Compression's compound, at half the range and near its end
    assert half.sparsity and half.share_bits and deep == replace(half, prune=deep.prune) and deep.prune > half.prune
    assert trials[0].drop <= size_run.allowed_drop / 2   # the digits CNN keeps its accuracy

    def one_step(before, after):
        return (after == replace(before, prune=after.prune) and 0 < after.prune - before.prune <= 0.1 + 1e-9) \
            or after == replace(before, sparsity=0.85)
    spare = [t for t in trials[:4] if t.feasible and t.drop <= size_run.allowed_drop / 2]
    assert spare and any(one_step(s.recipe, t.recipe) for s in spare for t in trials[4:])


def test_a_rounded_recipe_prunes_to_whole_blocks():
    from graphopt import trace
    from graphopt.pass_manager import PassManager
    from graphopt.search.recipe import Recipe

    graph = trace(digits.trained_digits_cnn(), (torch.randn(1, 1, 8, 8),))
    widths = {}
    for round_to in (1, 8):
        step, = Recipe(prune=0.4, round_to=round_to).passes([], None)
        pruned = PassManager([step], verify=False).run(graph).graph
        widths[round_to] = [m.out_channels for m in pruned.gm.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths[8]) and widths[8] != [16, 32]
    assert any(w % 8 for w in widths[1])


def test_distillation_keeps_what_its_epochs_recover_in_the_pruning_range():
    """MobileNetV2 on the Fashion-MNIST probe: chance at 20% before fine-tuning, -0.1 points at
    50% after 2 epochs of distillation, -0.85 at 65% after 8; the range reaches that far."""
    from graphopt.search.sensitivity import Sensitivity

    sweep = Sensitivity(sweep={0.2: 15.55, 0.4: 9.75, 0.6: 9.75})
    assert sweep.max_prune(84.1, 1.0, epochs=2, ceiling=0.7) == pytest.approx(0.5)
    assert sweep.max_prune(84.1, 1.0, epochs=8, ceiling=0.7) == pytest.approx(0.65)
    assert sweep.max_prune(84.1, 1.0, epochs=8, ceiling=0.6) == pytest.approx(0.6)
    assert sweep.max_prune(84.1, 1.0, epochs=0, ceiling=0.7) == pytest.approx(0.3)
    gentle = Sensitivity(sweep={0.2: 84.0, 0.4: 83.5, 0.6: 80.0})
    assert gentle.max_prune(84.1, 1.0, epochs=0, ceiling=0.7) == pytest.approx(0.5)
    assert gentle.max_prune(84.1, 1.0, epochs=2, ceiling=0.7) == pytest.approx(0.6)


def test_the_longest_recovery_follows_the_cost_of_an_epoch_and_the_budget():
    """Unpruned students on 2 cores: the Fashion-MNIST CNN, 7.3 s an epoch, gets 16 epochs in a
    15-minute latency search (+0.08 points at half its MACs, -1.37 after 8); MobileNetV2, 45 s,
    keeps 8 in 40 minutes; a size candidate fine-tunes three times and may take 0.4 of the budget
    (a size search lives on its two seeds and a push): 16 epochs at 7.3 s, 8 at 8 s."""
    from graphopt.search.recipe import Space, longest_recovery

    latency, size = Goal(objective="latency", max_minutes=15), Goal(objective="size", max_minutes=15)
    assert longest_recovery(latency, 7.3) == 16.0
    assert longest_recovery(latency, 1.0) == 32.0
    assert longest_recovery(Goal(objective="latency", max_minutes=40), 45.0) == 8.0
    assert longest_recovery(size, 7.3) == 16.0 and longest_recovery(size, 8.0) == 8.0
    assert longest_recovery(size, 2.0) == 32.0
    assert longest_recovery(Goal(objective="size", max_minutes=50), 45.0) == 8.0   # MobileNetV2
    assert longest_recovery(latency, None) == 8.0
    assert Space.for_goal(latency, has_train_data=True, longest=16.0).finetune == (0.0, 1.0, 2.0, 8.0, 16.0)
    assert Space.for_goal(latency, has_train_data=True).finetune == (0.0, 1.0, 2.0, 8.0)
    assert Space.for_goal(latency, has_train_data=False, longest=32.0).finetune == (0.0,)
    assert Space.for_goal(latency, has_train_data=True, longest=4.0).finetune == (0.0, 1.0, 2.0, 4.0)   # a cap


def test_a_resumed_run_keeps_the_recovery_it_measured_first(tmp_path, monkeypatch):
    """The longest recovery hangs on a timing: a resumed run must not land on the other side of a
    threshold (another search space, another study); a file that says something else is ignored."""
    import importlib

    from graphopt.search import sensitivity as sens

    search = importlib.import_module("graphopt.search.compress")   # the package's name is the function
    base = graphopt.trace(digits.trained_digits_cnn(), torch.randn(1, 1, 8, 8))
    goal, context = Goal(objective="latency", max_minutes=15), {"train_data": digits.train_batches}
    timings = iter([1.0, 100.0, 100.0])
    monkeypatch.setattr(sens, "distill_epoch_seconds", lambda *args: next(timings))

    def recovery(resume):
        return search._recovery(base, context, goal, 97.5, 200, str(tmp_path), resume)
    assert recovery(resume=True) == (1.0, 32.0)
    assert recovery(resume=True) == (1.0, 32.0)       # read back, not measured again
    assert recovery(resume=False) == (100.0, 8.0)     # a fresh run measures
    path = tmp_path / "recovery.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "longest_recovery": 1e9}))
    assert recovery(resume=True) == (100.0, 8.0)      # not a level the search has: measured again
    assert next(timings, None) is None


def test_latency_seeds_prune_in_fp32_where_int8_runs_slower_than_the_original():
    """The Fashion-MNIST CNN in onnxruntime at batch 1: its fp32 file 0.061 ms, all-int8 0.075."""
    from graphopt.search.compress import _int8_pays, _seeds
    from graphopt.search.recipe import Recipe, Space
    from graphopt.search.trial import Trial

    latency, size = Goal(objective="latency"), Goal(objective="size")
    space = Space.for_goal(latency, has_train_data=True)

    def timed(fp32_ms, int8_ms):
        return [Trial(0, Recipe(), "onnx", latency_ms=fp32_ms),
                Trial(1, Recipe(quant="int8", sensitive_float=1), "onnx_int8", latency_ms=int8_ms),
                Trial(2, Recipe(prune=0.3, quant="int8"), "onnx_int8", latency_ms=0.01)]   # not int8 alone
    assert not _int8_pays(timed(0.061, 0.075), latency)
    assert _int8_pays(timed(0.061, 0.050), latency)
    assert _int8_pays(timed(0.061, 0.075), size)          # sizes do not time
    assert _int8_pays(timed(0.061, 0.075)[:1], latency)   # nothing to compare: int8 kept
    assert {s.quant for s in _seeds(space, int8=False)} == {"fp32"}
    assert [s.prune for s in _seeds(space, int8=False)] == [s.prune for s in _seeds(space)]


def test_the_pruning_range_stops_where_the_pass_can_reach():
    """The share sampled never exceeds what pruning every group by max_ratio removes (floored to
    the sampling grid), and that reach is what the pruned graph really measures."""
    from graphopt import trace
    from graphopt.pass_manager import PassManager
    from graphopt.search.sensitivity import Sensitivity, prune_reach

    graph = trace(digits.trained_digits_cnn(), (torch.randn(1, 1, 8, 8),))
    macs = graph.analysis("cost").macs
    reaches = {}
    for round_to, exclude in ((1, []), (8, ["features.3"]), (16, [])):
        reaches[round_to] = reach = prune_reach(graph, exclude, round_to)
        options = {"round_to": round_to, "exclude": exclude}
        step = graphopt.get_pass("prune_channels")(target_macs=round(1 - reach + 1e-3, 4), **options)
        pruned = PassManager([step], verify=False).run(graph).graph
        assert 1 - pruned.analysis("cost").macs / macs == pytest.approx(reach, abs=2e-3)
        with pytest.raises(PassFailed, match="cannot reach"):
            deeper = graphopt.get_pass("prune_channels")(target_macs=round(1 - reach - 0.02, 4), **options)
            PassManager([deeper], verify=False).run(graph)
    assert reaches[1] > reaches[8] > reaches[16] > 0   # coarser widths, a protected layer: less to remove
    assert prune_reach(graph, ["features.0", "features.3"]) == 0.0
    capped = Sensitivity(sweep={0.2: 15.55, 0.4: 9.75}, reach=0.538)
    assert capped.max_prune(84.1, 1.0, epochs=8, ceiling=0.7) == pytest.approx(0.5)
    assert capped.max_prune(84.1, 1.0, epochs=0, ceiling=0.7) == pytest.approx(0.3)
