"""adaround: learned rounding keeps layer outputs closer to float than round-to-nearest on the
same grid, and the grid stays the one quantize_weights / the int8 backends use."""
import pytest
import torch

import graphopt
from graphopt import PassContext, PassManager
from graphopt.backends import onnx_int8
from graphopt.errors import ConfigError, PassFailed, RequirementError
from graphopt.passes import AdaRound, FoldBatchNorm, FoldQDQ, InsertQDQ, QuantizeWeights
from graphopt.tools import digits
from graphopt.verify import compare_outputs


@pytest.fixture(scope="module")
def folded():
    graph = graphopt.trace(digits.trained_digits_cnn(), next(digits.test_batches())[0][:4])
    return PassManager([FoldBatchNorm()]).run(graph).graph


def _ctx():
    return PassContext({"calibration_data": digits.train_batches})


def _test_inputs():
    return torch.cat([b[0] for b in digits.test_batches()])


def test_learned_4bit_rounding_is_closer_to_float_than_nearest(folded):
    x = _test_inputs()
    reference = folded.run(x)
    nearest = PassManager([QuantizeWeights(bits=4)]).run(folded).graph
    learned = PassManager([AdaRound(bits=4, iterations=150, max_batches=2, progress=False), QuantizeWeights(bits=4)],
                          context=_ctx()).run(folded)
    stats = learned.records[1].stats
    assert stats["layers"] == 3 and stats["output_error_learned"] < stats["output_error_nearest"]
    assert learned.records[2].stats["mean_weight_rel_error"] == 0.0   # already on quantize_weights' grid
    err_nearest = compare_outputs(reference, nearest.run(x))[1]
    err_learned = compare_outputs(reference, learned.graph.run(x))[1]
    assert err_learned < 0.9 * err_nearest                 # measured: 0.127 -> 0.092 relative (digits CNN)
    for name, p in learned.graph.gm.named_parameters():
        if p.dim() > 1:   # every weight is an integer code times its channel's scale
            scales = p.detach().reshape(p.shape[0], -1).abs().amax(1) / 7
            codes = p.detach().reshape(p.shape[0], -1) / scales[:, None]
            assert torch.allclose(codes, codes.round(), atol=1e-3), name


def test_learned_int8_rounding_exports_exactly(folded, tmp_path):
    ptq = PassManager([InsertQDQ(progress=False)], context=_ctx()).run(folded).graph
    result = PassManager([AdaRound(iterations=100, max_batches=2, progress=False), FoldQDQ()],
                         context=_ctx()).run(ptq)
    stats = result.records[1].stats
    assert stats["grid"] == "int8 (insert_qdq)" and stats["output_error_learned"] <= stats["output_error_nearest"]
    assert 0 < stats["flipped"] < 0.5
    report = onnx_int8.export(result.graph, str(tmp_path / "adaround.int8.onnx"))
    assert report.details["within_one_step"] >= 0.99


def test_bad_inputs_are_named(folded):
    with pytest.raises(ConfigError, match="bits must be one of 2, 4, 8"):
        AdaRound(bits=3)
    with pytest.raises(RequirementError, match="'adaround' requires 'calibration_data'"):
        PassManager([AdaRound(bits=4)]).run(folded)
    with pytest.raises(PassFailed, match="no fake-quantized weights.*no bits="):
        PassManager([AdaRound(progress=False)], context=_ctx()).run(folded)
    ptq = PassManager([InsertQDQ(progress=False)], context=_ctx()).run(folded).graph
    with pytest.raises(PassFailed, match="already have an int8 grid"):
        PassManager([AdaRound(bits=4, progress=False)], context=_ctx()).run(ptq)


def test_layers_and_exclude_choose_the_int8_layers(folded):
    ptq = PassManager([InsertQDQ(progress=False)], context=_ctx()).run(folded).graph
    names = sorted({n.args[0].target.rsplit(".", 1)[0] for n in ptq.nodes
                    if n.op == "call_function" and n.args and getattr(n.args[0], "op", None) == "get_attr"
                    and str(n.args[0].target).endswith(".weight")})
    before = {k: v.clone() for k, v in ptq.gm.state_dict().items()}
    result = PassManager([AdaRound(iterations=20, max_batches=1, exclude=[names[0]], progress=False)],
                         context=_ctx()).run(ptq)
    assert result.records[1].stats["layers"] == len(names) - 1
    after = result.graph.gm.state_dict()
    assert torch.equal(after[f"{names[0]}.weight"], before[f"{names[0]}.weight"])
    with pytest.raises(PassFailed, match="nope"):
        PassManager([AdaRound(layers=["nope"], progress=False)], context=_ctx()).run(ptq)
