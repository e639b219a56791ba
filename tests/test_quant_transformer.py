"""Int8 for transformer-shaped graphs (captured by torch.export, symbolic sequence axis): Linears on
token sequences get int8 weights and inputs with float outputs, ONNX goes through torch.onnx's QDQ
export into onnxruntime's integer kernels, and TorchScript runs FBGEMM's float-output linear."""
import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim

import graphopt
from graphopt import ConfigError, PassContext, PassManager
from graphopt.backends import onnx_int8, torchscript_int8
from graphopt.passes import FoldQDQ, InsertQDQ
from graphopt.quant.qparams import is_activation_fq


class TinyEncoder(nn.Module):
    """Embedding, one attention block with a residual and LayerNorm, a GELU FFN, mean pooling."""

    def __init__(self, vocab: int = 100, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn_in, self.ffn_out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, ids):
        h = self.emb(ids)
        b, t, d = h.shape
        if t > 1:                                    # a size branch: torch.fx gives up, torch.export captures
            h = h * 1.0
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        h = self.norm1(h + self.out(a))
        h = self.norm2(h + self.ffn_out(F.gelu(self.ffn_in(h))))
        return h.mean(1)


@pytest.fixture(scope="module")
def encoder_int8():
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    seq = Dim("seq", min=2, max=64)
    graph = graphopt.trace(model, torch.randint(0, 100, (2, 12)), dynamic_shapes=({0: Dim("batch", max=64), 1: seq},))
    data = [torch.randint(0, 100, (8, n)) for n in (9, 16, 12, 20)]
    result = PassManager([InsertQDQ(progress=False), FoldQDQ()], context=PassContext({"calibration_data": data})).run(graph)
    return model, graph, result


def test_linears_on_token_sequences_keep_float_outputs(encoder_int8):
    _, graph, result = encoder_int8
    assert graph.captured_by == "torch.export"
    stats = result.records[1].stats
    assert stats["int8_layers"] == 4 and stats["int8_embeddings"] == 1
    quantized = [n.args[0].name for n in result.graph.nodes if is_activation_fq(n)]
    # one quantized input per distinct Linear input (qkv, out, ffn_in, ffn_out); no quantized outputs
    assert len(quantized) == 4
    assert stats["sqnr_db"] > 25


def test_insert_qdq_layer_outputs_option(encoder_int8):
    _, graph, _ = encoder_int8
    data = [torch.randint(0, 100, (8, 10))]
    result = PassManager([InsertQDQ(progress=False, layer_outputs="int8")],
                         context=PassContext({"calibration_data": data})).run(graph)
    assert result.records[1].stats["fake_quant_nodes"] == 8         # inputs and outputs
    with pytest.raises(ConfigError, match="option 'layer_outputs' must be one of auto, int8, float"):
        InsertQDQ(layer_outputs="int4")


def test_onnx_int8_goes_through_torch_onnx_and_reaches_integer_kernels(encoder_int8, tmp_path):
    _, _, result = encoder_int8
    report = onnx_int8.export(result.graph, tmp_path / "enc.onnx")
    assert report.details["lowering"] == "torch_onnx"
    assert report.details["int8_layers"] == 4 and report.details["int8_mac_share"] > 0.9
    assert report.details["within_one_step"] >= 0.99
    model = onnx.load(tmp_path / "enc.onnx")
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    # the four Linears and the embedding table (gathered as int8 rows)
    assert sum(np.prod(t.dims) for t in int8_weights) == 32 * 96 + 32 * 32 + 32 * 128 + 128 * 32 + 100 * 32
    assert not [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                and tuple(t.dims) in ((96, 32), (32, 128), (128, 32), (100, 32))]   # no float copy of a weight
    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    assert any(n.input[0] in {t.name for t in int8_weights} for n in gathers)
    session = onnx_int8.ort_session(str(tmp_path / "enc.onnx"), 1)
    other = torch.randint(0, 100, (3, 23))                               # another batch and length
    out = session.run(None, {session.get_inputs()[0].name: other.numpy()})[0]
    np.testing.assert_allclose(out, result.graph.gm(other).detach().numpy(), atol=0.05)
    with pytest.raises(ConfigError, match="option 'lowering' must be one of auto, direct, torch_onnx"):
        onnx_int8.export(result.graph, tmp_path / "x.onnx", lowering="tvm")


def _fused_ops(model: onnx.ModelProto, tmp_path) -> set[str]:
    """Op types in onnxruntime's optimized version of ``model`` (what it actually runs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}


def test_layernorms_on_2d_keep_onnxruntime_from_fusing_the_residual_add(encoder_int8, tmp_path):
    from graphopt.backends.onnx_layernorm import layernorms_on_2d, skip_layernorm_sites

    _, _, result = encoder_int8
    report = onnx_int8.export(result.graph, tmp_path / "enc.onnx")
    assert report.details["layernorms_2d"] == 2 and report.details["ms_by_form"] == {}   # by rule, untimed
    tuned = onnx_int8.export(result.graph, tmp_path / "tuned.onnx", form="tune")
    assert {"qdq", "qdq+ln2d"} <= set(tuned.details["ms_by_form"])      # the twin was built and timed
    assert tuned.details["layernorms_2d"] in (0, 2)
    original = onnx_int8._candidates(result.graph, "auto", "auto", True, 1, True)["qdq"].model
    assert len(skip_layernorm_sites(original)) == 2                    # norm1 and norm2 follow residual adds
    rewritten, count = layernorms_on_2d(original)
    assert count == 2 and not skip_layernorm_sites(rewritten)
    assert "SkipLayerNormalization" in _fused_ops(original, tmp_path)
    assert "SkipLayerNormalization" not in _fused_ops(rewritten, tmp_path)
    ids = torch.randint(0, 100, (3, 17)).numpy()
    a, b = (onnx_int8.ort_session(m.SerializeToString(), 1) for m in (original, rewritten))
    np.testing.assert_allclose(a.run(None, {a.get_inputs()[0].name: ids})[0],
                               b.run(None, {b.get_inputs()[0].name: ids})[0], rtol=1e-5, atol=1e-6)


def test_onnx_int8_prefers_the_ln2d_twin_unless_it_is_clearly_slower():
    class Built:
        def __init__(self, size):
            self.model = type("M", (), {"ByteSize": lambda _: size})()

    twins = {"qdq": Built(100), "qdq+ln2d": Built(110)}
    assert onnx_int8._pick(twins, {"qdq": 1.0, "qdq+ln2d": 1.03}) == "qdq+ln2d"   # a tie: the twin
    assert onnx_int8._pick(twins, {"qdq": 1.0, "qdq+ln2d": 0.80}) == "qdq+ln2d"
    assert onnx_int8._pick(twins, {"qdq": 1.0, "qdq+ln2d": 1.20}) == "qdq"        # clearly slower: not


def test_torchscript_int8_runs_float_output_kernels_at_any_length(encoder_int8, tmp_path):
    model, _, result = encoder_int8
    report = torchscript_int8.export(result.graph, tmp_path / "enc.pt")
    assert report.details["int8_layers"] == 4 and not report.details["float_layers"]
    assert report.details["within_one_step"] >= 0.99
    loaded = torch.jit.load(str(tmp_path / "enc.pt"))
    other = torch.randint(0, 100, (5, 17))
    out = loaded(other)
    assert isinstance(out, torch.Tensor) and out.shape == (5, 32)
    torch.testing.assert_close(out, result.graph.gm(other), atol=0.05, rtol=0)
    assert (out - model(other)).abs().max() < 0.25                       # and still the float model, roughly


def test_a_cnn_with_an_op_the_direct_lowering_lacks_falls_back_to_torch_onnx(tmp_path):
    class ErfNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 10)

        def forward(self, x):
            x = torch.erf(self.c1(x))                  # no direct lowering rule for erf
            x = F.silu(self.c2(x)) + x
            return self.fc(x.mean((2, 3)))

    graph = graphopt.trace(ErfNet().eval(), torch.randn(2, 3, 32, 32))
    int8 = PassManager([InsertQDQ(progress=False), FoldQDQ()],
                       context=PassContext({"calibration_data": [torch.randn(8, 3, 32, 32)]})).run(graph).graph
    with pytest.raises(Exception, match="no ONNX lowering"):
        onnx_int8.export(int8, tmp_path / "direct.onnx", lowering="direct")
    report = onnx_int8.export(int8, tmp_path / "auto.onnx")
    assert report.details["lowering"] == "torch_onnx"
    assert report.details["int8_layers"] == 3 and report.details["int8_mac_share"] == 1.0
    assert report.details["within_one_step"] >= 0.99


class EncoderWithUnusedPooler(TinyEncoder):
    """TinyEncoder whose forward also runs a pooler (first token -> Linear -> tanh) it does not
    return, as a wrapper keeping a Hugging Face model's ``last_hidden_state`` does: torch.export
    keeps the dead pooler in the graph, torch.onnx's optimizer removes it."""

    def __init__(self):
        super().__init__()
        self.pooler = nn.Linear(32, 32)

    def forward(self, ids):
        h = self.emb(ids)
        b, t, d = h.shape
        if t > 1:
            h = h * 1.0
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = self.norm1(h + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)))
        h = self.norm2(h + self.ffn_out(F.gelu(self.ffn_in(h))))
        torch.tanh(self.pooler(h[:, 0]))                     # computed, never returned
        return h


def _quantizers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.output[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}


def test_torch_onnx_lowering_finds_each_quantizer_by_identity_not_by_count(tmp_path):
    from graphopt.backends import onnx_int8_decomposed as decomposed

    torch.manual_seed(0)
    dims = ({0: Dim("batch", max=64), 1: Dim("seq", min=2, max=64)},)
    graph = graphopt.trace(EncoderWithUnusedPooler().eval(), torch.randint(0, 100, (2, 12)), dynamic_shapes=dims)
    data = [torch.randint(0, 100, (8, n)) for n in (9, 16, 12)]
    int8 = PassManager([InsertQDQ(progress=False), FoldQDQ()],
                       context=PassContext({"calibration_data": data})).run(graph).graph
    report = onnx_int8.export(int8, tmp_path / "enc.onnx")
    assert report.details["lowering"] == "torch_onnx" and report.details["within_one_step"] >= 0.99
    live = decomposed.live_nodes(int8)
    activations = {n.name for n in int8.nodes if is_activation_fq(n)}
    dead = {n for n in activations if n not in live}
    assert len(activations) == 6 and len(dead) == 2           # the pooler's input and output
    # one QuantizeLinear per quantized activation the outputs depend on, each found through the
    # extra graph output it was exported as (removed again), with the node's own parameters
    assert len(_quantizers(onnx.load(tmp_path / "enc.onnx"))) == len(activations - dead) == 4
    built, found = decomposed.build(int8)
    assert set(found) == activations - dead and len(built.graph.output) == 1     # the extra outputs are gone
    quantizers = _quantizers(built)
    nodes = {n.name: n for n in int8.nodes}
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in built.graph.initializer}
    for name, tensor in found.items():
        scale = constants[quantizers[tensor].input[1]]
        assert float(scale) == pytest.approx(nodes[name].meta["graphopt.qparams"].scale, rel=1e-6)


def test_torch_onnx_lowering_survives_the_exporter_merging_equal_quantizers(encoder_int8, tmp_path):
    from graphopt.backends import onnx_int8_decomposed as decomposed

    _, _, result = encoder_int8
    graph = result.graph.clone()
    shared = next(n for n in graph.nodes if is_activation_fq(n) and len(n.users) > 1)
    user = next(u for u in shared.users if u.target is F.linear)
    with graph.gm.graph.inserting_after(shared):     # a second fake-quant of the same tensor, same grid
        twin = graph.gm.graph.call_function(shared.target, shared.args, dict(shared.kwargs))
    twin.meta.update(shared.meta)
    user.replace_input_with(shared, twin)
    graph.commit()
    assert sum(is_activation_fq(n) for n in graph.nodes) == 5
    built, found = decomposed.build(graph)
    # torch.onnx's common-subexpression pass merges the two QuantizeLinear nodes: both map to it
    assert len(found) == 5 and found[shared.name] == found[twin.name]
    assert len(_quantizers(built)) == 4
    report = onnx_int8.export(graph, tmp_path / "enc.onnx")
    assert report.details["lowering"] == "torch_onnx" and report.details["within_one_step"] >= 0.99
