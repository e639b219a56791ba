"""Calibration, bias correction and one epoch of distillation (QAT) of the Fashion-MNIST CNN with
1 and 2 processes under torchrun: the time of each step and whether the results agree.

    python benchmarks/bench_distributed.py [--configs 1x1,1x2,2x1] [--repeats 2] [--out bench-results/distributed.json]

Each configuration (processes x threads per process) is launched with
``python -m torch.distributed.run --standalone --nproc_per_node=P`` on this script, which then
runs one PassManager pipeline per process: fold_batchnorm, insert_qdq (percentile observer, 16
calibration batches of 128), bias_correction (16 batches), then qat for one epoch over the 60 000
training images, global batch 256 (one process: batches of 256; two: 128 on each rank, a
DistributedSampler added by graphopt). The training set is shuffled once, with a fixed seed,
before any configuration reads it, so every configuration sees the same samples in each step.

Written: ``--out`` (JSON) and the same name with ``.md`` (the table the README quotes). Needs
Debian's dataset-fashion-mnist package.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

FIELDS = ("calibration", "bias_correction", "distillation")


def _loaders(world: int, limit: int | None):
    from torch.utils.data import DataLoader, TensorDataset

    from graphopt.tools import fashion_mnist

    x, y = fashion_mnist.load("train")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:limit]
    x, y = x[order], y[order]
    calibration = DataLoader(TensorDataset(x[:2048]), batch_size=128)
    train = DataLoader(TensorDataset(x, y), batch_size=256 // world)
    return calibration, train


def worker(args) -> None:
    """One process of one configuration (under torchrun)."""
    torch.set_num_threads(args.threads)
    import graphopt
    from graphopt import PassContext, PassManager, distributed
    from graphopt.app.evaluate import top1_accuracy
    from graphopt.passes import QAT, BiasCorrection, FoldBatchNorm, InsertQDQ
    from graphopt.quant.qparams import QPARAMS_KEY
    from graphopt.tools import fashion_mnist
    from graphopt.tools.fashion_cnn import trained_fashion_cnn

    distributed.init()
    world = distributed.world_size()
    calibration, train = _loaders(world, args.limit)
    graph = graphopt.trace(trained_fashion_cnn(), (next(iter(calibration))[0][:4],))
    teacher = PassManager([FoldBatchNorm()]).run(graph).graph
    started = time.perf_counter()
    quantized = PassManager([InsertQDQ(observer="percentile", max_batches=16, progress=False),
                             BiasCorrection(max_batches=16, progress=False)],
                            context=PassContext({"calibration_data": calibration})).run(teacher)
    trained = PassManager([QAT(epochs=1, lr=1e-4, progress=False)],
                          context=PassContext({"train_data": train, "teacher": teacher})).run(quantized.graph)
    total = time.perf_counter() - started
    if not distributed.is_main():
        return
    accuracy = {name: round(100 * top1_accuracy(g, fashion_mnist.test_batches(), None, False), 2)
                for name, g in (("fp32", teacher), ("int8_calibrated", quantized.graph), ("after", trained.graph))}
    seconds = {"calibration": quantized.records[1].seconds, "bias_correction": quantized.records[2].seconds,
               "distillation": trained.records[1].seconds}
    qparams = {n.name: [n.meta[QPARAMS_KEY].scale, n.meta[QPARAMS_KEY].zero_point]
               for n in quantized.graph.nodes if QPARAMS_KEY in n.meta}
    torch.save({"calibrated": quantized.graph.gm.state_dict(), "trained": trained.graph.gm.state_dict()},
               args.out + ".pt")
    result = {"processes": world, "threads": args.threads, "seconds": {k: round(v, 2) for k, v in seconds.items()},
              "total_seconds": round(total, 2), "steps": trained.records[1].stats["steps"],
              "qparams": qparams, "checksum_calibrated": distributed.checksum(quantized.graph.gm),
              "test_top1": accuracy}
    with open(args.out, "w") as f:
        json.dump(result, f)


def _launch(processes: int, threads: int, out: str, limit: int | None) -> dict:
    # passive OpenMP waiting: on a busy machine, spinning threads of one process starve the others
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               os.path.abspath(__file__), "--worker", "--threads", str(threads), "--out", out]
    command += ["--limit", str(limit)] if limit else []
    subprocess.run(command, check=True, env=env)
    with open(out) as f:
        return json.load(f)


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def compare(runs: dict[str, dict], states: dict[str, dict]) -> dict[str, dict]:
    """Each configuration against the one-process, one-thread run."""
    base, ref = runs["1x1"], states["1x1"]
    out = {}
    for name, run in runs.items():
        mine, theirs = states[name]["calibrated"], ref["calibrated"]
        biases = [k for k in mine if k.endswith("bias")]
        out[name] = {
            "qparams_identical": run["qparams"] == base["qparams"],
            "calibrated_graph_identical_but_biases": all(torch.equal(mine[k], theirs[k]) for k in mine
                                                         if k not in biases),
            "bias_max_abs_diff_after_correction": _max_diff({k: mine[k] for k in biases},
                                                            {k: theirs[k] for k in biases}),
            "max_abs_diff_after_distillation": _max_diff(states[name]["trained"], ref["trained"]),
            "speedup": round(base["total_seconds"] / run["total_seconds"], 2),
        }
    return out


def table(runs: dict[str, dict], agreement: dict[str, dict]) -> str:
    lines = ["| processes x threads | calibration s | bias correction s | distillation (1 epoch) s | total s | "
             "speed-up vs 1x1 | qparams as 1x1 | max weight diff to 1x1 after distillation | test top-1 % |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for name, run in runs.items():
        a = agreement[name]
        lines.append(f"| {run['processes']} x {run['threads']} | {run['seconds']['calibration']:.2f} | "
                     f"{run['seconds']['bias_correction']:.2f} | {run['seconds']['distillation']:.1f} | "
                     f"{run['total_seconds']:.1f} | {a['speedup']:.2f}x | "
                     f"{'bit-identical' if a['qparams_identical'] else 'differ'} | "
                     f"{a['max_abs_diff_after_distillation']:.1e} | {run['test_top1']['after']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="1x1,1x2,2x1", help="processes x threads, comma-separated")
    parser.add_argument("--out", default="bench-results/distributed.json")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration; the fastest is kept")
    parser.add_argument("--limit", type=int, help="train on the first N (shuffled) images only (a quick check)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from graphopt.tools import fashion_mnist

    if not fashion_mnist.available():
        sys.exit("Fashion-MNIST not found: apt-get install -y dataset-fashion-mnist")
    configs = [c.strip() for c in args.configs.split(",")]
    if "1x1" not in configs:
        configs.insert(0, "1x1")
    runs, states, totals = {}, {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):   # configurations interleaved; each keeps its fastest run
            for name in configs:
                processes, threads = (int(v) for v in name.split("x"))
                out = os.path.join(folder, f"{name}.json")
                run = _launch(processes, threads, out, args.limit)
                print(f"{name} (run {repeat + 1}): {run['seconds']} total {run['total_seconds']} s", flush=True)
                totals.setdefault(name, []).append(run["total_seconds"])
                if name not in runs or run["total_seconds"] < runs[name]["total_seconds"]:
                    runs[name], states[name] = run, torch.load(out + ".pt", weights_only=True)
                runs[name]["all_totals"] = totals[name]
    agreement = compare(runs, states)
    for run in runs.values():
        run.pop("qparams")
    result = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__}, "runs": runs, "agreement": agreement}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    markdown = table(runs, agreement)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(markdown + "\n")
    print(markdown)
    print(json.dumps(agreement, indent=2))


if __name__ == "__main__":
    main()
