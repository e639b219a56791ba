"""int8 targets: the simulated-quant graph models each target's arithmetic, and every backend's
check holds for every target on whatever CPU runs the suite.

Checks that need the target's own kernels run where this CPU computes the target exactly
(``host_target().runs_exactly(target)``); elsewhere the ONNX artifact is checked in exact integer
arithmetic (onnx's reference evaluator) and the TorchScript backend refuses, naming why. The
non-VNNI x86 arithmetic itself (u8 x s8 pairs summed in a saturating int16) is emulated, so the
reason for the x86-avx2 target is tested on every CPU too.
"""
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import graphopt
from graphopt import ConfigError, ExportError, PassContext, PassManager
from graphopt.backends import onnx as onnx_fp32, onnx_int8, torchscript_int8
from graphopt.passes import InsertQDQ
from graphopt.backends._int8_checks import output_steps, within_one_step
from graphopt.quant.targets import TARGETS, get_target, host_target
from graphopt.tools.fashion_cnn import FashionCNN

from conftest import randomize_bn
from test_quant_backends import _int8_graph as quantized_test_cnn

TARGET_NAMES = sorted(TARGETS)


def _int8_graph(target: str, batch: int = 4):
    return quantized_test_cnn(batch, target=target)


@pytest.fixture(scope="module", params=TARGET_NAMES)
def target_graph(request):
    return request.param, _int8_graph(request.param)


def test_weight_codes_span_the_targets_range(target_graph):
    name, graph = target_graph
    target = TARGETS[name]
    codes = [graph.attr(n.target) for n in graph.nodes if n.op == "get_attr" and n.target.endswith(".weight_int8")]
    assert len(codes) == 4   # three convs and the classifier
    for q in codes:   # per output channel, the largest code is the range's edge (symmetric scales)
        per_channel = q.flatten(1).abs().amax(1)
        assert int(per_channel.max()) == target.weight_qmax
        assert int(per_channel.min()) >= target.weight_qmax - 1
    assert graph.meta["graphopt.quant_target"] == name


def test_non_vnni_arithmetic_saturates_full_range_weights_but_not_the_avx2_targets():
    """The failure this target exists for, emulated on any CPU: VNNI-range weights on non-VNNI
    kernels are refused by the one-step check; 7-bit weights compute exactly there."""
    vnni, avx2 = _int8_graph("x86-vnni"), _int8_graph("x86-avx2")
    assert onnx_int8.reference_check(vnni)[0] == 1.0
    share, worst = onnx_int8.reference_check(vnni, pairwise_int16=True)
    assert share < 0.99 and worst.startswith("fake_quantize_per_tensor_affine")
    assert onnx_int8.reference_check(avx2, pairwise_int16=True)[0] == 1.0


def test_targets_arithmetic_rules():
    avx2, vnni, arm = TARGETS["x86-avx2"], TARGETS["x86-vnni"], TARGETS["arm64"]
    # 255 * 127 * 2 = 64770 overflows an int16 pair sum; 255 * 64 * 2 = 32640 does not
    assert avx2.saturates(127) and not avx2.saturates(64) and not vnni.saturates(127)
    assert avx2.runs_exactly(avx2) and not avx2.runs_exactly(vnni) and not avx2.runs_exactly(arm)
    assert vnni.runs_exactly(avx2) and vnni.runs_exactly(arm) and arm.runs_exactly(vnni)
    assert get_target("auto") is host_target()


@pytest.mark.parametrize("form", ["qoperator", "qdq"])
def test_onnx_int8_checks_every_target(target_graph, form, tmp_path):
    name, graph = target_graph
    path = tmp_path / f"{name}.onnx"
    report = onnx_int8.export(graph, path, form=form)
    d = report.details
    assert d["target"] == name and d["within_one_step"] >= 0.99
    exact_here = host_target().runs_exactly(TARGETS[name])
    assert d["check"].startswith("onnxruntime on this CPU" if exact_here else "ONNX reference evaluator")
    model = onnx.load(path)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["graphopt.quant_target"] == name
    assert meta["graphopt.weight_range"] == f"[-{TARGETS[name].weight_qmax}, {TARGETS[name].weight_qmax}]"
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights if w.ndim >= 2) == TARGETS[name].weight_qmax
    if exact_here:   # the file on fresh inputs, in this CPU's kernels
        x = torch.randn(8, 1, 28, 28)
        session = onnx_int8.ort_session(str(path), 1)
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert within_one_step(graph.run(x), [torch.from_numpy(out)], output_steps(graph)) >= 0.99


def test_torchscript_int8_checks_or_refuses_by_target(target_graph, tmp_path):
    name, graph = target_graph
    path = tmp_path / f"{name}.pt"
    if not host_target().runs_exactly(TARGETS[name]):
        with pytest.raises(ExportError, match=f"quantized for {name}.*would saturate"):
            torchscript_int8.export(graph, path)
        assert not path.exists()
        return
    report = torchscript_int8.export(graph, path)
    assert report.details["target"] == name and report.details["within_one_step"] >= 0.99
    files = {"graphopt.json": ""}
    torch.jit.load(str(path), _extra_files=files)
    assert json.loads(files["graphopt.json"])["quant_target"] == name


def test_a_cpu_that_saturates_checks_other_targets_exactly_and_torchscript_refuses(tmp_path, monkeypatch):
    """Cross-target export, decided as an AVX2-only machine would (its decision, not its kernels)."""
    avx2 = TARGETS["x86-avx2"]
    monkeypatch.setattr(onnx_int8, "host_target", lambda: avx2)
    monkeypatch.setattr(torchscript_int8, "host_target", lambda: avx2)
    graph = _int8_graph("x86-vnni")
    report = onnx_int8.export(graph, tmp_path / "vnni.onnx")
    assert report.details["check"].startswith("ONNX reference evaluator") and report.details["host"] == "x86-avx2"
    assert report.details["within_one_step"] >= 0.99
    with pytest.raises(ExportError, match="x86-vnni, whose weights torch's int8 kernels on this CPU"):
        torchscript_int8.export(graph, tmp_path / "vnni.pt")
    assert not (tmp_path / "vnni.pt").exists()


def test_reference_check_refuses_a_wrong_artifact(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_int8, "host_target", lambda: TARGETS["x86-avx2"])
    graph = _int8_graph("arm64")
    original = onnx_int8._Lowering.weight

    def wrong_weight(self, dq):  # a lowering bug: every weight code halved
        q, scales, axis = original(self, dq)
        return (q // 2).to(torch.int8), scales, axis

    monkeypatch.setattr(onnx_int8._Lowering, "weight", wrong_weight)
    with pytest.raises(ExportError, match="target arm64, checked by ONNX reference evaluator"):
        onnx_int8.export(graph, tmp_path / "bad.onnx", form="qdq")
    assert not (tmp_path / "bad.onnx").exists()


def test_bad_targets_and_models_without_quantizable_layers_are_named(tmp_path):
    with pytest.raises(ConfigError, match="option 'target' must be one of auto, x86-vnni, x86-avx2, arm64, got str "
                                          "'x86-avx1024'"):
        InsertQDQ(target="x86-avx1024")

    class NoLayers(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2

    graph = graphopt.trace(NoLayers(), torch.randn(2, 4))
    with pytest.raises(graphopt.PassFailed, match="no quantizable layer"):
        PassManager([InsertQDQ(progress=False)],
                    context=PassContext({"calibration_data": [torch.randn(2, 4)]})).run(graph)


def test_a_target_this_onnxruntime_cannot_run_is_named(tmp_path, monkeypatch):
    graph = _int8_graph("x86-avx2")

    def no_kernel(model, threads=0):
        if isinstance(model, str):   # the written file
            raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation "
                               "for QLinearConv(10) node with name 'qconv_5'")
        return real(model, threads)

    real = onnx_int8.ort_session
    monkeypatch.setattr(onnx_int8, "ort_session", no_kernel)
    with pytest.raises(ExportError, match=r"this onnxruntime \(.*\) cannot run the model built for target "
                                          r"x86-avx2: .*QLinearConv"):
        onnx_int8.export(graph, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("dynamic", [True, False])
def test_onnx_exports_have_a_symbolic_batch_axis_unless_asked_not_to(tmp_path, dynamic):
    torch.manual_seed(0)
    model = randomize_bn(FashionCNN(width=8))
    graph = graphopt.trace(model, torch.randn(1, 1, 28, 28))      # traced at batch 1
    int8 = _int8_graph("x86-avx2", batch=1)
    x = torch.randn(16, 1, 28, 28)
    for backend, g, tol in ((onnx_fp32, graph, 1e-4), (onnx_int8, int8, None)):
        path = tmp_path / f"{backend.__name__.rsplit('.', 1)[-1]}.onnx"
        report = backend.export(g, path, dynamic_batch=dynamic)
        assert report.details["batch"] == ("dynamic" if dynamic else "static")
        session = onnx_fp32.ort_session(str(path), 1)
        if not dynamic:
            with pytest.raises(Exception, match="(?i)dimension|shape"):
                session.run(None, {session.get_inputs()[0].name: x.numpy()})
            continue
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert out.shape == (16, 10)
        if tol:
            torch.testing.assert_close(torch.from_numpy(out), g.run(x), rtol=tol, atol=tol)
        elif host_target().runs_exactly(TARGETS["x86-avx2"]):
            assert within_one_step(g.run(x), [torch.from_numpy(out)], output_steps(g)) >= 0.99


def test_a_simplifier_that_breaks_the_quantization_keeps_the_built_model(tmp_path, monkeypatch):
    import onnxsim

    graph = _int8_graph("x86-avx2")

    def dropping_simplify(model, **_):   # as if onnx-simplifier folded a Q/DQ pair away
        broken = onnx.ModelProto()
        broken.CopyFrom(model)
        node = next(n for n in broken.graph.node if n.op_type == "DequantizeLinear")
        broken.graph.node.remove(node)
        return broken, True

    monkeypatch.setattr(onnxsim, "simplify", dropping_simplify)
    report = onnx_int8.export(graph, tmp_path / "m.onnx", form="qdq")
    assert report.details["simplified"] is False
    assert "changed the quantization structure" in report.details["simplify_skipped"]
    assert report.details["within_one_step"] >= 0.99
    written = onnx.load(tmp_path / "m.onnx")
    assert sum(n.op_type == "DequantizeLinear" for n in written.graph.node) == \
        report.details["quant_ops"] - sum(n.op_type == "QuantizeLinear" for n in written.graph.node)
