"""Pure helpers of the benchmarks: how bench_quant composes its compounding ratio, the rule
ort_recipe_avx2_check compares emulated and native outputs by, how bench_packed decides its targets,
and the shared harness (results written and rendered; no process state changed at import)."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks import bench_packed, bench_quant, bench_quant_ab, harness
from benchmarks.ort_recipe_avx2_check import agreement, output_steps

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def test_compounding_ratio_and_missing_columns():
    speedups = {bench_quant.int8_column("ONNX", "x86-avx2"): 2.0, bench_quant.PRUNED_FP32: 1.5,
                bench_quant.int8_column("pruned", "x86-avx2"): 2.7}
    got = bench_quant.compounding(speedups, "x86-avx2")
    assert got["product"] == 3.0 and abs(got["ratio"] - 0.9) < 1e-12 and "ratio_same_export" not in got
    speedups[bench_quant.GRAPHOPT_FP32] = 1.25       # the export alone is faster: pruning gained 1.2x, not 1.5x
    assert abs(bench_quant.compounding(speedups, "x86-avx2")["ratio_same_export"] - 1.35 / 1.2) < 1e-12
    assert bench_quant.compounding(speedups, "x86-vnni") is None          # a refused or untimed column
    cols = bench_quant.columns(["x86-vnni", "x86-avx2"], prune=True)
    assert len(cols) == len(set(cols)) and "graphopt pruned+int8 ONNX (x86-vnni)" in cols
    assert not any("pruned" in c for c in bench_quant.columns(["x86-avx2"], prune=False))


def test_agreement_counts_elements_within_one_output_step():
    ref = [np.zeros((2, 10))]
    other = [np.zeros((2, 10))]
    other[0][0, 0] = 0.5 * 1.001        # exactly at the slack: agrees
    other[0][1, 3] = 1.0                # two steps off
    got = agreement(ref, other, [0.5])
    assert got["share"] == 19 / 20 and not got["passes"] and got["max_diff_steps"] == 2.0
    assert got["rule"] == "step"
    close = agreement(ref, [np.zeros((2, 10))], [0.5])
    assert close["share"] == 1.0 and close["passes"] and close["top1_agreement"] == 1.0


def test_agreement_float_outputs_relative_to_largest_magnitude():
    ref = [np.array([[100.0, -2.0, 1.0, 0.0]])]
    other = [np.array([[100.05, -2.09, 1.2, 0.0]])]    # 1e-3 x 100 = 0.1: the 0.2 miss is the only one
    got = agreement(ref, other, [None])
    assert got["share"] == 0.75 and got["rule"] == "float" and got["max_diff_steps"] is None


def test_output_steps_reads_the_final_dequantize_scale():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
             helper.make_node("Relu", ["x"], ["r"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4]),
                               helper.make_tensor_value_info("r", TensorProto.FLOAT, [4])],
                              [numpy_helper.from_array(np.array(0.25, np.float32), "s"),
                               numpy_helper.from_array(np.array(3, np.uint8), "z")])
    assert output_steps(helper.make_model(graph)) == [0.25, None]
    onnx.checker.check_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_packed_targets_are_decided_on_the_mean_over_seeds():
    runs = [{"seed": s, "params": 10, "loss_points": loss, "ratio_vs_fp32": ratio, "accuracy_fp32": 90.0,
             "accuracy_packed": 90.0 - loss, "file_bytes": 100, "bits_per_weight": 1.0, "bit_exact_reload": True}
            for s, loss, ratio in [(0, 1.3, 41.0), (1, 0.2, 39.5), (2, 0.7, 42.0)]]
    got = bench_packed.summarise("net", runs, target_ratio=40)
    assert got["loss_points"] == {"mean": 0.73, "std": 0.55, "min": 0.2, "max": 1.3}
    assert got["ratio_vs_fp32"]["mean"] == 40.83 and got["meets_target"]  # one seed over 1 point, one under 40x
    runs[1]["loss_points"] = 1.2
    assert not bench_packed.summarise("net", runs, target_ratio=40)["meets_target"]  # mean loss 1.07
    per_seed, summary = bench_packed.fashion_tables([got])
    assert len(per_seed[1]) == 3 and summary[1][0][2] == "0.73 ± 0.55 [0.20, 1.30]"


def test_results_are_rendered_beside_their_json_and_into_the_documents(tmp_path):
    def batch(speedup):
        return {"ms": {k: 10 / speedup[k] for k in speedup}, "speedup_over_ort_fp32": speedup}
    results = {"threads": 2, "rounds": 3, "models": {"resnet18": {
        1: batch(dict(zip(bench_quant_ab.RUNNERS, (1.0, 2.0, 2.5, 2.25)))),
        16: batch(dict(zip(bench_quant_ab.RUNNERS, (1.0, 3.0, 3.125, 3.5))))}}}
    path = str(tmp_path / "quant_ab.json")
    text = harness.write_results(path, results, bench_quant_ab.markdown)
    assert json.load(open(path))["rendered_by"] == "benchmarks.bench_quant_ab:markdown"
    assert (tmp_path / "quant_ab.md").read_text() == text
    assert "| ResNet-18 | 1 / 16 | 2.00x / 3.00x | 2.50x / 3.12x | 2.25x / 3.50x |" in text
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "quant.md").write_text("notes\n<!-- render: quant_ab.json -->\nthe recorded table\n<!-- /render -->\n"
                                   "<!-- render: never_run.json -->\nkept as recorded\n<!-- /render -->\n")
    assert harness.render_docs(str(tmp_path), str(docs)) == ["quant.md: quant_ab.json"]
    assert (docs / "quant.md").read_text() == ("notes\n<!-- render: quant_ab.json -->\n" + text
                                               + "<!-- /render -->\n<!-- render: never_run.json -->\n"
                                               "kept as recorded\n<!-- /render -->\n")


def test_importing_the_benchmarks_changes_no_process_state():
    """Thread counts and environment variables are set in main(), never at import."""
    script = ("import os, importlib, pkgutil, torch, benchmarks\n"
              "env, threads = dict(os.environ), torch.get_num_threads()\n"
              "names = [m.name for m in pkgutil.iter_modules(benchmarks.__path__)]\n"
              "for name in names:\n"
              "    importlib.import_module('benchmarks.' + name)\n"
              "assert len(names) >= 20, names\n"
              "assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())\n"
              "assert torch.get_num_threads() == threads\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True, timeout=300)
