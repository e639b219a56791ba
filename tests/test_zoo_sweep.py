"""The zoo sweep's pure parts (benchmarks/zoo_sweep.py, benchmarks/zoo_models.py): which timm models
it picks, how a row's stages read, how refusals are grouped, the coverage tables; and one model run
through the whole pipeline in a worker process. The sweep itself is a tool, not a test."""
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # benchmarks/ is not installed

from benchmarks import zoo_models, zoo_sweep  # noqa: E402


def _row(model, stages, zoo="timm", **extra):
    return {"zoo": zoo, "model": model, "family": "f", "stages": stages, **extra}


OK = {"ok": True}
THROUGH = _row("a", {"build": OK, "trace": OK, "fold_batchnorm": OK,
                     "prune_channels": {"ok": True, "macs_kept": 0.5, "prunable": 3, "groups": 4},
                     "quantize": {"ok": True, "error": 0.01}, "onnx_int8": {"ok": True, "within_one_step": 1.0}})
REFUSED = _row("b", {"build": OK, "trace": OK, "fold_batchnorm": OK,
                     "prune_channels": {"ok": False, "reason": "NothingToPrune: all 3 channel groups are blocked; "
                                                               "blocking: foo at 'node_12'", "macs_kept": 1.0},
                     "quantize": OK, "onnx_int8": OK})
LITTLE = _row("c", {"build": OK, "trace": OK, "fold_batchnorm": OK,
                    "prune_channels": {"ok": True, "macs_kept": 0.97, "blocking": "LayerNorm (4 groups)"},
                    "quantize": OK, "onnx_int8": OK}, zoo="hf")
TIMEOUT = _row("d", {"build": OK, "trace": OK}, error="timeout after 60 s in stage fold_batchnorm",
               died_in="fold_batchnorm")


def test_stage_reached_first_refusal_and_through():
    assert zoo_sweep.reached(THROUGH) == "onnx_int8" and zoo_sweep.through(THROUGH, 0.1)
    assert zoo_sweep.reached(REFUSED) == "fold_batchnorm" and not zoo_sweep.through(REFUSED, 0.1)
    assert zoo_sweep.first_failure(REFUSED)[0] == "prune_channels"
    assert zoo_sweep.first_failure(LITTLE) == ("", "") and not zoo_sweep.through(LITTLE, 0.1)
    assert zoo_sweep.through(LITTLE, 0.02)
    assert zoo_sweep.first_failure(TIMEOUT) == ("fold_batchnorm", "timeout after 60 s in stage fold_batchnorm")


def test_reasons_are_grouped_without_their_model_specific_parts():
    a = zoo_sweep.reason_class("pass 'prune' failed at 'conv_3': 12 groups in /tmp/x/model.onnx")
    b = zoo_sweep.reason_class("pass 'prune' failed at 'blocks_7': 48 groups in /tmp/y/model.onnx")
    assert a == b


def test_coverage_summary_and_markdown_against_an_earlier_run():
    rows = [THROUGH, REFUSED, LITTLE, TIMEOUT]
    counts = zoo_sweep.summary(rows, 0.1)
    assert counts == {"models": 4, "traced": 4, "pruned": 2, "pruned_min_cut": 1, "quantized": 3,
                      "int8_exported": 3, "int8_kernels": 0, "through": 1}
    config = {"pipeline": "p", "ratio": 0.3, "min_cut": 0.1, "timeout": 60, "threads": 1, "when": "today", "label": "x"}
    before = {"config": dict(config, label="before"), "rows": [REFUSED, dict(THROUGH, stages={}), LITTLE, TIMEOUT]}
    text = zoo_sweep.markdown({"config": config, "rows": rows}, before)
    assert "## Coverage before -> after" in text and "| all | 4 -> 4 |" in text
    assert "| 0 -> 1 |" in text.split("## Coverage\n")[0].split("| all |")[1]     # through: 0 -> 1
    assert "pruned too little: LayerNorm (N groups)" in text and "timeout after N s in stage fold_batchnorm" in text
    # targets: THROUGH removes half the MACs (through, big cut); LITTLE 3% (neither); per zoo and all
    assert zoo_sweep.targets(rows, 0.1) == [["timm", 3, "1 (33.3%)", "missed", "1 (33.3%)", "missed"],
                                            ["hf", 1, "0 (0.0%)", "missed", "0 (0.0%)", "missed"],
                                            ["all", 4, "1 (25.0%)", "missed", "1 (25.0%)", "missed"]]
    assert zoo_sweep.targets([THROUGH] * 19 + [REFUSED], 0.1)[0][3] == "met"          # 95% of 20
    assert "## Targets" in text


def test_timm_models_are_chosen_by_family_and_size_not_by_outcome():
    counts = {f"resnet{d}": ("resnet", d * 1e6) for d in (18, 26, 34, 50, 101, 152)}
    counts |= {"seresnext26t_32x4d": ("resnet", 16e6), "resnet50_384": ("resnet", 50e6),
               "test_resnet": ("resnet", 1e5), "huge_vit": ("vit", 600e6), "vgg11": ("vgg", 130e6), "vgg13": ("vgg", 131e6)}
    chosen = {r["model"]: r["family"] for r in zoo_models.choose_timm(counts)}
    # resnet: 7 distinct architectures (test_* and the 384 px variant not counted) -> 1 + floor(log4 7) = 2,
    # round-robin over the stems 'seresnext' and 'resnet', each stem's smallest first; then resnet50, one of
    # the most used timm models (POPULAR); vit/vgg: nothing under 100 M parameters, so their smallest
    assert 1 + math.floor(math.log(7, 4)) == 2 and "resnet50" in zoo_models.POPULAR
    assert [m for m, f in chosen.items() if f == "resnet"] == ["seresnext26t_32x4d", "resnet18", "resnet50"]
    assert chosen["huge_vit"] == "vit" and chosen["vgg11"] == "vgg" and "vgg13" not in chosen


def test_the_committed_timm_selection_covers_every_family():
    import json

    with open(zoo_models.CATALOGUE) as f:
        catalogue = json.load(f)
    families = {r["family"] for r in catalogue["models"]}
    assert len(catalogue["models"]) >= 150 and len(families) == catalogue["families"]
    assert len(zoo_models.HF) >= 25 and {"llama", "gpt2", "bert", "t5", "vit"} <= set(zoo_models.HF)


def test_one_model_runs_through_the_pipeline_in_a_worker(tmp_path):
    pytest.importorskip("transformers")
    spec = zoo_models.Spec("hf", "llama", "decoder")
    worker = zoo_sweep.Worker(ratio=0.3, threads=1)
    try:
        row = worker.run(spec, timeout=300)
    finally:
        worker.stop()
    assert zoo_sweep.through(row, 0.1), row
    prune = row["stages"]["prune_channels"]
    assert prune["oracle_error"] < 1e-5 and prune["prunable"] == 4 and prune["macs_kept"] < 0.9
    assert row["stages"]["onnx_int8"]["within_one_step"] >= 0.99


# One model per family, through the whole pipeline as the sweep runs it (the CI subset of #15).
# Golden values are the sweep's at ratio 0.3: prunable groups of all groups, and the MACs kept
# (with 0.01 of slack for importance ties); each int8 file must match its simulated graph.
FAMILIES = [
    # zoo, model, family, prunable groups, of groups, MACs kept at most
    ("hf", "bert", "encoder", 4, 6, 0.73),
    ("hf", "gpt2", "decoder", 4, 5, 0.72),
    ("hf", "deberta-v2", "encoder", 4, 5, 0.73),                           # heads folded into the batch
    ("hf", "roformer", "encoder", 4, 7, 0.73),                             # rotary sin/cos from a table
    ("hf", "falcon", "decoder", 4, 5, 0.64),                               # grouped-query fused q/k/v
    ("hf", "vit", "vision", 4, 6, 0.77),
    ("hf", "t5", "encoder-decoder", 7, 8, 0.74),                           # one bias shared by layers
    ("timm", "resnet18", "resnet", 12, 13, 0.51),
    ("timm", "tf_efficientnet_b0", "efficientnet", 40, 41, 0.52),          # TF "same" padding
    ("timm", "mobilenetv3_small_050", "mobilenetv3", 26, 27, 0.57),        # SE, hard-swish, depthwise
    ("timm", "gernet_s", "byobnet", 28, 29, 0.50),
    ("timm", "vit_tiny_patch16_224", "vision_transformer", 25, 26, 0.49),  # LayerNorm stream, fused qkv
    ("timm", "convnextv2_atto", "convnext", 16, 17, 0.51),                 # global response norm
    ("timm", "mobilevit_xxs", "mobilevit", 41, 46, 0.60),                  # conv + transformer hybrid
    ("torchvision", "mobilenet_v3_small", "mobilenet_v3", 27, 28, 0.53),
    ("torchvision", "googlenet", "googlenet", 57, 58, 0.51),
]


@pytest.fixture(scope="module")
def worker():
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    w = zoo_sweep.Worker(ratio=0.3, threads=1)
    yield w
    w.stop()


@pytest.mark.parametrize("zoo,model,family,prunable,groups,macs_kept", FAMILIES,
                         ids=[f"{z}:{m}" for z, m, *_ in FAMILIES])
def test_one_model_per_family_goes_through_with_its_golden_cut(worker, zoo, model, family, prunable, groups,
                                                              macs_kept):
    row = worker.run(zoo_models.Spec(zoo, model, family), timeout=300)
    assert zoo_sweep.reached(row) == "onnx_int8", zoo_sweep.first_failure(row)
    prune = row["stages"]["prune_channels"]
    assert (prune["prunable"], prune["groups"]) == (prunable, groups), prune.get("blocking")
    assert prune["macs_kept"] <= macs_kept + 0.01 and prune["oracle_error"] < 1e-5
    assert row["stages"]["onnx_int8"]["within_one_step"] >= 0.99
