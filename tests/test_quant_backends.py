"""Int8 backends: ONNX (QOperator and QDQ) and TorchScript, checked against the simulated-quant IR."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import graphopt
from graphopt import ConfigError, ExportError, PassContext, PassManager
from graphopt.backends import onnx_int8, torchscript_int8
from graphopt.passes import FoldBatchNorm, FoldQDQ, InsertQDQ
from graphopt.quant.qparams import is_activation_fq
from graphopt.backends._int8_checks import output_steps, within_one_step
from graphopt.tools.fashion_cnn import FashionCNN

from conftest import randomize_bn


def _int8_graph(batch: int = 4, **insert_options):
    """The Fashion-MNIST test CNN, BatchNorm folded, quantized and folded (traced at ``batch``)."""
    torch.manual_seed(3)
    graph = graphopt.trace(randomize_bn(FashionCNN(width=8)), torch.randn(batch, 1, 28, 28))
    gen = torch.Generator().manual_seed(4)
    data = [torch.randn(16, 1, 28, 28, generator=gen) for _ in range(4)]
    passes = [FoldBatchNorm(), InsertQDQ(progress=False, **insert_options), FoldQDQ()]
    return PassManager(passes, context=PassContext({"calibration_data": data})).run(graph).graph


@pytest.fixture(scope="module")
def int8_graph():
    return _int8_graph()


@pytest.mark.parametrize("form", ["qoperator", "qdq"])
def test_onnx_int8_parity_and_int8_weights(int8_graph, tmp_path, form):
    path = tmp_path / f"{form}.onnx"
    report = onnx_int8.export(int8_graph, path, form=form)
    d = report.details
    assert d["form"] == form and d["within_one_step"] >= 0.99
    assert d["int8_mac_share"] == 1.0 and d["float_layers"] == {}
    model = onnx.load(path)
    ops = [n.op_type for n in model.graph.node]
    if form == "qoperator":
        assert ops.count("QLinearConv") == 3 and ops.count("QGemm") == 1 and "QLinearAdd" in ops
        assert "Conv" not in ops
    else:
        assert ops.count("Conv") == 3 and ops.count("QuantizeLinear") >= 5
    # weights are int8 initializers; float initializers hold only scales and biases
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    int8_weights = [a for a in inits.values() if a.dtype == np.int8 and a.ndim >= 2]
    assert sorted(a.shape for a in int8_weights) == sorted([(8, 1, 3, 3), (16, 8, 3, 3), (16, 16, 3, 3), (10, 16)])
    assert max(a.size for a in inits.values() if a.dtype == np.float32) <= 16
    # onnx-simplifier ran and kept the quantization structure (the backend checks it; the file says so)
    assert d["simplified"] and d["int8_initializer_bytes"] >= sum(a.size for a in int8_weights)
    # end to end on fresh inputs: within one output step of the simulated-quant graph
    x = torch.randn(8, 1, 28, 28)
    session = onnx_int8.ort_session(str(path), 1)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert within_one_step(int8_graph.run(x), [torch.from_numpy(out)], output_steps(int8_graph)) >= 0.99


def test_onnx_int8_auto_form_is_a_rule_and_the_file_is_deterministic(int8_graph, tmp_path):
    first = onnx_int8.export(int8_graph, tmp_path / "a.onnx")
    second = onnx_int8.export(int8_graph, tmp_path / "b.onnx")
    assert first.details["form"] == "qoperator" and first.details["ms_by_form"] == {}   # nothing timed
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_onnx_int8_tune_times_both_forms_and_keeps_the_faster_or_on_a_tie_the_smaller(int8_graph, tmp_path):
    report = onnx_int8.export(int8_graph, tmp_path / "tuned.onnx", form="tune")
    timings = report.details["ms_by_form"]
    assert set(timings) == {"qoperator", "qdq"}
    assert timings[report.details["form"]] <= min(timings.values()) * (1 + onnx_int8.SPEED_MARGIN)

    class Built:
        def __init__(self, size):
            self.model = type("M", (), {"ByteSize": lambda _: size})()

    small = {"qoperator": Built(100), "qdq": Built(120)}
    assert onnx_int8._pick(small, {"qoperator": 1.03, "qdq": 1.0}) == "qoperator"   # a tie: smaller file
    assert onnx_int8._pick(small, {"qoperator": 1.20, "qdq": 1.0}) == "qdq"         # clearly faster wins


def test_torchscript_int8_parity_and_kernels(int8_graph, tmp_path):
    path = tmp_path / "m.pt"
    report = torchscript_int8.export(int8_graph, path)
    assert report.details["within_one_step"] >= 0.99 and report.details["int8_mac_share"] == 1.0
    loaded = torch.jit.load(str(path))
    code = loaded.code + "".join(m.code for m in loaded.children() if hasattr(m, "code"))
    assert "quantized" in str(loaded.graph) or "quantized" in code
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        out = loaded(x)
    assert within_one_step(int8_graph.run(x), out, output_steps(int8_graph)) >= 0.99


def test_float_layers_are_named_in_both_backends(tmp_path):
    graph = _int8_graph(first_layer="float")
    onnx_report = onnx_int8.export(graph, tmp_path / "m.onnx", form="qoperator")
    assert list(onnx_report.details["float_layers"]) == ["stem.0"]
    assert 0 < onnx_report.details["int8_mac_share"] < 1
    ts_report = torchscript_int8.export(graph, tmp_path / "m.pt")
    assert ts_report.details["int8_mac_share"] == pytest.approx(onnx_report.details["int8_mac_share"])


def test_int8_backends_reject_bad_input(int8_graph, tmp_path):
    float_graph = graphopt.trace(FashionCNN(width=8).eval(), torch.randn(2, 1, 28, 28))
    for backend in (onnx_int8, torchscript_int8):
        with pytest.raises(ConfigError, match="no int8 weights; run insert_qdq and fold_qdq first"):
            backend.export(float_graph, tmp_path / "x.bin")
    with pytest.raises(ConfigError, match="option 'form' must be one of auto, qoperator, qdq, tune"):
        onnx_int8.export(int8_graph, tmp_path / "x.onnx", form="qlinear")


def test_onnx_int8_parity_failure_writes_nothing(int8_graph, tmp_path, monkeypatch):
    original = onnx_int8._Lowering.weight

    def wrong_weight(self, dq):  # a lowering bug: every weight code off by a lot
        q, scales, axis = original(self, dq)
        return (q // 2).to(torch.int8), scales, axis

    monkeypatch.setattr(onnx_int8._Lowering, "weight", wrong_weight)
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="within one step of the simulated-quant graph"):
        onnx_int8.export(int8_graph, path, form="qoperator")
    assert not path.exists()


class PoolReluPermute(torch.nn.Module):
    """ReLU after max pooling (not fusable into the conv) and a permute (or the same move as
    two swapaxes) before a linear layer."""

    def __init__(self, swaps=False):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 6)
        self.swaps = swaps

    def forward(self, x):
        x = torch.relu(torch.nn.functional.max_pool2d(self.a(x), 2))
        x = self.b(x)
        return self.fc(x.swapaxes(1, 3).swapaxes(1, 2) if self.swaps else x.permute(0, 2, 3, 1))


@pytest.mark.parametrize("swaps", [False, True])
def test_relu_on_a_quantized_tensor_stays_integer(swaps, tmp_path):
    torch.manual_seed(5)
    graph = graphopt.trace(PoolReluPermute(swaps).eval(), torch.randn(2, 3, 8, 8))
    data = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    int8 = PassManager([InsertQDQ(progress=False), FoldQDQ()],
                       context=PassContext({"calibration_data": data})).run(graph).graph
    onnx_report = onnx_int8.export(int8, tmp_path / "m.onnx", form="qoperator")
    ts_report = torchscript_int8.export(int8, tmp_path / "m.pt")
    for report in (onnx_report, ts_report):
        assert report.details["within_one_step"] >= 0.99
    # both convs run in integer kernels; ONNX's QGemm takes 2-D inputs, so the rank-4 linear is named float
    assert onnx_report.details["int8_layers"] == 2
    assert onnx_report.details["float_layers"] == {"fc": "rank-4 input (QGemm takes 2-D)"}
    assert ts_report.details["int8_layers"] == 3


class TinyDistilledViT(torch.nn.Module):
    """DeiT's distilled shape (timm's VisionTransformerDistilled), tiny: patch tokens behind a
    class and a distillation token (parameters broadcast to the batch), a position embedding,
    one attention block, and two heads whose outputs are averaged in eval."""

    def __init__(self, dim=32, heads=4, classes=10, batch=2):
        super().__init__()
        self.heads, self.batch = heads, batch
        self.patch = torch.nn.Conv2d(3, dim, 8, 8)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.dist_token = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = torch.nn.Parameter(torch.randn(1, 16 + 2, dim) * 0.02)
        self.norm1, self.norm2, self.norm = (torch.nn.LayerNorm(dim) for _ in range(3))
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.fc1, self.fc2 = torch.nn.Linear(dim, 2 * dim), torch.nn.Linear(2 * dim, dim)
        self.head, self.head_dist = torch.nn.Linear(dim, classes), torch.nn.Linear(dim, classes)

    def forward(self, x):
        b, n, d = self.batch, 18, self.qkv.in_features        # sizes the model was built for
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(b, -1, -1), self.dist_token.expand(b, -1, -1), x), dim=1)
        x = x + self.pos_embed
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        x = self.norm(x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x)))))
        return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2


@pytest.fixture(scope="module")
def distilled_vit_int8():
    torch.manual_seed(6)
    graph = graphopt.trace(TinyDistilledViT().eval(), torch.randn(2, 3, 32, 32))
    data = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    return PassManager([InsertQDQ(progress=False), FoldQDQ()],
                       context=PassContext({"calibration_data": data})).run(graph).graph


@pytest.mark.parametrize("form", ["qoperator", "qdq"])
def test_a_distilled_vit_falls_back_to_torch_onnx_with_the_node_named(distilled_vit_int8, tmp_path, form):
    # the direct lowering reads the tokens and the position embedding as constants, and has no
    # rule for the broadcast of the tokens to the batch: an ExportError naming node and op
    with pytest.raises(ExportError, match=r"no ONNX lowering for node 'expand' \(expand\)") as info:
        onnx_int8.export(distilled_vit_int8, tmp_path / "direct.onnx", form=form, lowering="direct")
    assert (getattr(info.value, "node", None), getattr(info.value, "op", None)) == ("expand", "expand")
    assert not (tmp_path / "direct.onnx").exists()
    report = onnx_int8.export(distilled_vit_int8, tmp_path / "auto.onnx", form=form)   # lowering="auto"
    assert report.details["lowering"] == "torch_onnx" and report.details["within_one_step"] >= 0.99
    assert "'expand'" in report.details["direct_lowering_failed"]
    quantized = sum(1 for n in distilled_vit_int8.nodes if is_activation_fq(n))
    model = onnx.load(tmp_path / "auto.onnx")
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == quantized


def test_no_raw_error_of_a_lowering_rule_escapes_export(int8_graph, tmp_path, monkeypatch):
    def broken_conv(self, node, quant_in, user):   # a lowering rule with a bug
        raise TypeError("unsupported operand type(s) for +: 'NoneType' and 'int'")

    monkeypatch.setattr(onnx_int8._Lowering, "lower_conv", broken_conv)
    with pytest.raises(ExportError, match=r"could not lower node 'conv2d' \(conv2d\): TypeError"):
        onnx_int8.export(int8_graph, tmp_path / "direct.onnx", form="qoperator", lowering="direct")
    report = onnx_int8.export(int8_graph, tmp_path / "auto.onnx", form="qoperator")
    assert report.details["lowering"] == "torch_onnx" and report.details["within_one_step"] >= 0.99
    assert "'conv2d'" in report.details["direct_lowering_failed"]


class ConstantOperand(torch.nn.Module):
    """A learned offset added to a quantized activation: a constant operand of an add."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1)
        self.offset = torch.nn.Parameter(torch.randn(1, 16, 1, 1))
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.a(x)) + self.offset))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("form", ["qoperator", "qdq"])
def test_direct_lowering_reads_a_constant_operand_as_an_initializer(tmp_path, form):
    torch.manual_seed(7)
    graph = graphopt.trace(ConstantOperand().eval(), torch.randn(2, 3, 16, 16))
    data = [torch.randn(8, 3, 16, 16) for _ in range(3)]
    int8 = PassManager([InsertQDQ(progress=False), FoldQDQ()],
                       context=PassContext({"calibration_data": data})).run(graph).graph
    report = onnx_int8.export(int8, tmp_path / "m.onnx", form=form, lowering="direct")
    assert report.details["lowering"] == "direct" and report.details["within_one_step"] >= 0.99
    assert report.details["int8_layers"] == 3
