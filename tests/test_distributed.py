"""graphopt under torch.distributed: two gloo ranks (torch.multiprocessing.spawn, and torchrun for
the command line) against one process reading all of the data.

One spawn runs every two-rank scenario (starting processes is the slow part on 2 cores); each rank
saves what it computed and the test process compares it with the same steps run in one process.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

import graphopt
from graphopt import PassContext, PassManager, distributed
from graphopt.passes import BiasCorrection, Distill, FoldBatchNorm, InsertQDQ, PruneChannels
from graphopt.quant.calibration import (ChannelMeanObserver, InputMomentObserver, calibrate, make_observer)
from graphopt.search import sensitivity
from graphopt.training.distill import DistillConfig, distill

OBSERVERS = ("minmax", "percentile", "mse", "moving_average")
WORLD = 2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


def batches(n: int = 8, size: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches whose scales differ, so histograms grow in a different order on each rank."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 6, 6, generator=gen) * (1 + (i * 5) % 7), torch.randint(0, 5, (size,), generator=gen))
            for i in range(n)]


def graph():
    return graphopt.trace(model(), (torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(9)),))


def halves(data: list, rank: int) -> list:
    """The contiguous half of ``data`` a rank owns (rank 0 the first half): a different order than one process."""
    half = len(data) // WORLD
    return data[rank * half:(rank + 1) * half]


def doubled(data: list) -> list:
    """One process's batches for two ranks' step k: rank 0's batch k and rank 1's batch k together."""
    first, second = halves(data, 0), halves(data, 1)
    return [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(first, second)]


# -- the steps, run alike in one process and on each rank --------------------------------------------
def observe(data) -> dict:
    g = graph()
    node = next(n.name for n in g.nodes if n.name.startswith("relu"))
    observers = {f"{name}": make_observer(name) for name in OBSERVERS}
    out = {}
    for name, observer in observers.items():
        calibrate(g, {node: observer}, data, progress=False)
        out[name] = {"range": observer.range(), "batches": observer.batches}
        if hasattr(observer, "hist"):
            out[name].update(hist=observer.hist.clone(), level=observer.level)
    mean, moment = ChannelMeanObserver(1), InputMomentObserver(-1)
    fc_input = next(n.name for n in g.nodes if n.name.startswith("mean"))
    calibrate(g, {node: mean, fc_input: moment}, data, progress=False)
    out["channel_mean"], out["moment"] = mean.mean(), moment.moment()
    return out


def quantize(data) -> dict:
    passes = [FoldBatchNorm(), InsertQDQ(observer="percentile", progress=False, sensitive_float=1),
              BiasCorrection(progress=False)]
    result = PassManager(passes, context=PassContext({"calibration_data": data})).run(graph())
    return {k: v.clone() for k, v in result.graph.gm.state_dict().items()} | {
        "sensitivity": result.records[2].stats.get("sensitivity"), "float": result.records[2].stats.get("float_layers")}


def train(data) -> dict:
    teacher = PassManager([FoldBatchNorm()]).run(graph()).graph   # no BatchNorm: its batch statistics differ
    student = PassManager([FoldBatchNorm()]).run(graphopt.trace(model(seed=3), teacher.example_inputs)).graph
    config = DistillConfig(epochs=2, lr=1e-2, alpha=0.5, temperature=2.0)
    stats = distill(student, teacher, data, config, progress=False)
    return {"stats": stats, "state": {k: v.clone() for k, v in student.gm.state_dict().items()}}


def taylor(data) -> dict:
    step = PruneChannels(ratio=0.5, importance="taylor")
    result = PassManager([FoldBatchNorm(), step], context=PassContext({"train_data": data})).run(graph())
    return {k: v.clone() for k, v in result.graph.gm.state_dict().items()}


def loader(data: list, batch: int):
    dataset = torch.utils.data.TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False)


class _Bench:
    """Builds a candidate by saying which rank built it (graphopt's own rank reads 0 inside a trial)."""

    def build(self, recipe, number):
        from graphopt.search.trial import Trial

        return Trial(number, recipe, "onnx", metric=float(torch.distributed.get_rank()))


def search_rounds(rank: int) -> list | None:
    """Two rounds of the search's shared building: rank 0 sends jobs, the other rank serves."""
    from graphopt.search.compress import _serve, build_shared
    from graphopt.search.recipe import Recipe

    jobs = [(Recipe(prune=0.1 * i), i) for i in range(3)]
    if rank:
        _serve(_Bench())
        return None
    built = build_shared(_Bench(), jobs) + build_shared(_Bench(), jobs[:1])
    distributed.broadcast_object(None)
    return [(t.number, t.recipe.prune, t.metric) for t in built]


def _worker(rank: int, path: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    data = batches()
    results = {}
    results["observe"] = observe(distributed.sharded(halves(data, rank)))
    results["observe_strided"] = observe(data[:6])                     # a plain list: every 2nd batch
    results["quantize"] = quantize(distributed.sharded(halves(data, rank)))
    results["train"] = train(distributed.sharded(halves(data, rank)))
    results["train_loader"] = train(loader(data, 8))                   # DataLoader: a DistributedSampler is added
    results["taylor"] = taylor(lambda: iter(data))                      # a callable returning a one-shot iterator
    results["sensitivity"] = sensitivity.prune_layer_sensitivity(graph())
    results["search"] = search_rounds(rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distributed.shard(iter(data), "test data")
    results["warned"] = [str(w.message) for w in caught if issubclass(w.category, distributed.ShardingWarning)]
    g = graph()
    if rank == 1:
        with torch.no_grad():
            g.gm.fc.bias[0] += 1e-7
    try:
        distributed.check_same(g.gm, "test step")
        results["mismatch"] = None
    except distributed.DistributedError as exc:
        results["mismatch"] = str(exc)
    results["rank"], results["world"] = distributed.rank(), distributed.world_size()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    distributed.finish()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(folder / "rendezvous"), str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_spawned_ranks_know_who_they_are(ranks):
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    assert distributed.world_size() == 1 and distributed.is_main()   # this process: no group, nothing changes


def test_calibration_over_halves_equals_one_process_over_all(ranks):
    whole = observe(batches())
    per_rank = [observe(halves(batches(), r))["moving_average"]["range"] for r in range(WORLD)]
    for result in ranks:
        got = result["observe"]
        for name in ("minmax", "percentile", "mse"):               # bit-identical
            assert got[name]["range"] == whole[name]["range"], name
            assert got[name]["batches"] == whole[name]["batches"] == 8
        for name in ("percentile", "mse"):
            assert got[name]["level"] == whole[name]["level"]
            assert torch.equal(got[name]["hist"], whole[name]["hist"])
        torch.testing.assert_close(got["channel_mean"], whole["channel_mean"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["moment"], whole["moment"], rtol=1e-12, atol=1e-12)
        # moving averages: each rank's, weighted by its batch count (an EMA depends on the order of the batches)
        assert got["moving_average"]["range"] == pytest.approx(tuple(sum(v) / 2 for v in zip(*per_rank)), rel=1e-12)
    assert ranks[0]["observe"]["moving_average"] == ranks[1]["observe"]["moving_average"]


def test_unsharded_list_is_shared_by_batches_and_said_once(ranks):
    first_six = observe(batches()[:6])
    for result in ranks:
        assert result["observe_strided"]["percentile"]["range"] == first_six["percentile"]["range"]
        assert torch.equal(result["observe_strided"]["mse"]["hist"], first_six["mse"]["hist"])
    assert len(ranks[0]["warned"]) == 1 and "each rank takes 1 batch in 2" in ranks[0]["warned"][0]
    assert "list_iterator is not sharded across 2 ranks" in ranks[0]["warned"][0]
    assert "graphopt.distributed.sharded" in ranks[0]["warned"][0]
    assert ranks[1]["warned"] == []                                   # said by rank 0 only


def test_quantization_and_bias_correction_match_one_process(ranks):
    whole = quantize(batches())
    zero, one = ranks[0]["quantize"], ranks[1]["quantize"]
    assert zero["sensitivity"] == one["sensitivity"] and zero["float"] == one["float"] == whole["float"]
    assert zero["sensitivity"] == pytest.approx(whole["sensitivity"], rel=1e-5)
    for key, value in whole.items():
        if not isinstance(value, torch.Tensor):
            continue
        assert torch.equal(zero[key], one[key]), key                   # every rank the same graph
        if "bias" in key and value.dtype.is_floating_point:            # channel means: float64 sums in another order
            torch.testing.assert_close(zero[key], value, rtol=1e-6, atol=1e-7)
        else:                                                          # weights, scales, zero points: bit-identical
            assert torch.equal(zero[key], value), key


def test_distillation_on_two_ranks_matches_one_process_with_doubled_batches(ranks):
    references = {"train": train(doubled(batches())),
                  "train_loader": train(loader(batches(), 16))}    # ranks' samples 0, 2, 4, ... and 1, 3, 5, ...
    for name, whole in references.items():
        zero, one = ranks[0][name], ranks[1][name]
        assert zero["stats"] == one["stats"] and zero["stats"]["steps"] == whole["stats"]["steps"] == 8
        for key, value in whole["state"].items():
            assert torch.equal(zero["state"][key], one["state"][key]), key   # identical weights on both ranks
            torch.testing.assert_close(zero["state"][key], value, rtol=1e-4, atol=2e-5)
        assert zero["stats"]["loss_last"] == pytest.approx(whole["stats"]["loss_last"], rel=1e-4)


def test_taylor_importance_sums_gradients_over_ranks(ranks):
    whole = taylor(lambda: iter(batches()))
    assert ranks[0]["taylor"].keys() == whole.keys()
    for key, value in whole.items():
        assert ranks[0]["taylor"][key].shape == value.shape, key      # the same channels kept
        assert torch.equal(ranks[0]["taylor"][key], ranks[1]["taylor"][key])
        torch.testing.assert_close(ranks[0]["taylor"][key], value)


def test_sensitivity_trials_are_shared_and_gathered(ranks):
    whole = sensitivity.prune_layer_sensitivity(graph())
    assert ranks[0]["sensitivity"] == ranks[1]["sensitivity"] == whole


def test_search_rounds_build_one_candidate_per_rank(ranks):
    assert ranks[0]["search"] == [(0, 0.0, 0.0), (1, 0.1, 1.0), (2, 0.2, 0.0), (0, 0.0, 0.0)]
    assert ranks[1]["search"] is None


def test_a_rank_with_another_graph_is_named_on_every_rank(ranks):
    for result in ranks:
        assert "test step: the graph differs between ranks" in result["mismatch"]
        assert "rank 1 differ" in result["mismatch"]


# -- the command line under torchrun ------------------------------------------------------------------
PIPELINE = """
[model]
factory = "graphopt.tools.digits:DigitsCNN"
checkpoint = "{checkpoint}"
input_shape = [4, 1, 8, 8]

[data]
calibration_data = "graphopt.tools.digits:train_batches"
train_data = "graphopt.tools.digits:train_batches"

[[passes]]
name = "fold_batchnorm"

[[passes]]
name = "distill"
epochs = 1
max_batches = 4
progress = false

[[passes]]
name = "insert_qdq"
observer = "percentile"
max_batches = 4
progress = false
bound = 5.0                  # the contract is checked on random example inputs, which calibrated ranges clip

[[passes]]
name = "bias_correction"
max_batches = 4
progress = false

[[passes]]
name = "fold_qdq"

[[backends]]
name = "onnx_int8"
path = "out/model.int8.onnx"

[report]
json = "out/report.json"
"""


def test_graphopt_run_under_torchrun_writes_one_set_of_files(tmp_path):
    from graphopt.tools import digits

    checkpoint = os.path.join(os.path.dirname(digits.__file__), "examples", "digits_cnn.pt")
    pipeline = tmp_path / "pipeline.toml"
    pipeline.write_text(PIPELINE.format(checkpoint=checkpoint))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "graphopt.tools.cli", "run", str(pipeline), "--quiet"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("report written to") == 1                  # rank 0 prints the report, once
    assert run.stdout.count("\ndistill ") == 1 and run.stdout.count("pipeline ") == 1
    assert sorted(os.listdir(tmp_path / "out")) == ["model.int8.onnx", "report.json"]   # no second copy, no temp file
    import json

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["input", "fold_batchnorm", "distill", "insert_qdq",
                                                     "bias_correction", "fold_qdq"]
    assert report["passes"][2]["stats"]["steps"] == 2                  # 4 batches over 2 ranks
    assert report["distributed"] == {"world_size": 2}
