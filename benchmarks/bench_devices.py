"""One epoch of distillation of a ResNet-18-sized student on each device this machine has (issue
#20): seconds per epoch and the student's top-1, CPU next to CUDA (and CUDA with bf16 autocast)
in one run, from the same initial weights and the same batches.

    python -m benchmarks.bench_devices [--devices cpu,cuda] [--max-batches N] [--threads 2]
                                       [--out bench-results/devices.json]

Teacher: the committed Fashion-MNIST CNN (tools/examples/fashion_cnn.pt, 80.3% top-1). Student:
torchvision's ResNet-18 (11.2 M parameters) with a one-channel 3x3 stem and no max-pool for the
28x28 images, random initial weights (seed 0), 10 classes. ``distill`` (KD, alpha 0.7, AdamW
1e-3, cosine schedule) over the Fashion-MNIST training images in batches of 128; top-1 on the
10 000 test images. ``--max-batches`` caps the steps (the epoch time is then extrapolated from
the mean step time and marked so): on 2 CPU cores a whole epoch takes most of an hour.
Devices not present are listed as skipped, with the reason.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

from benchmarks import harness
from graphopt.report import markdown_table, table

STEPS_PER_EPOCH = 469   # 60 000 images in batches of 128


def student() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model.eval()


def run_one(device: str, amp: str | None, max_batches: int | None) -> dict:
    import graphopt
    from graphopt.tools import fashion_mnist
    from graphopt.tools.fashion_cnn import trained_fashion_cnn
    from graphopt.training.distill import DistillConfig, distill

    example = torch.randn(2, 1, 28, 28)
    teacher = graphopt.trace(trained_fashion_cnn().to(device), example)
    pupil = graphopt.trace(student().to(device), example)
    data = fashion_mnist.shuffled_epochs(128)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    stats = distill(pupil, teacher, data, DistillConfig(epochs=1.0, max_batches=max_batches, amp=amp), progress=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    steps = stats["steps"]
    return {"device": device, "amp": amp or "fp32", "steps": steps,
            "epoch_s": round(seconds * STEPS_PER_EPOCH / steps, 1), "extrapolated": steps < STEPS_PER_EPOCH,
            "top1": round(100 * harness.accuracy(pupil), 2), "loss_last": round(stats["loss_last"], 4)}


HEADERS = ("device", "precision", "steps", "epoch s", "top-1 %", "last loss")


def _rows(results: dict) -> list[tuple]:
    return [(r["device"], r["amp"], r["steps"], f"{r['epoch_s']}{' (extrapolated)' if r['extrapolated'] else ''}",
             r["top1"], r["loss_last"]) for r in results["rows"]]


def markdown(results: dict) -> str:
    skipped = "".join(f"\n- {s['device']}: skipped ({s['reason']})" for s in results.get("skipped", []))
    return (f"# One epoch of distillation, ResNet-18 student, per device\n\n{markdown_table(HEADERS, _rows(results))}\n"
            + (f"\nNot run:{skipped}\n" if skipped else ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--max-batches", type=int, default=None, help="cap the steps (default: a whole epoch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench-results/devices.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, skipped = [], []
    for device in args.devices.split(","):
        if device.startswith("cuda") and not torch.cuda.is_available():
            skipped.append({"device": device, "reason": "torch.cuda.is_available() is False on this machine"})
            continue
        for amp in (None, "bf16") if device.startswith("cuda") else (None,):
            rows.append(run_one(device, amp, args.max_batches))
            print(table(HEADERS, _rows({"rows": rows[-1:]})))
    results = {"threads": args.threads, "max_batches": args.max_batches, "rows": rows, "skipped": skipped}
    print(harness.write_results(args.out, results, markdown))


if __name__ == "__main__":
    main()
