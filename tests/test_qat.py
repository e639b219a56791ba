"""qat: training through the simulated-int8 graph keeps its structure, exports like PTQ does, and
recovers what post-training quantization lost."""
import pytest
import torch

import graphopt
from graphopt import PassContext, PassManager
from graphopt.backends import onnx_int8
from graphopt.errors import PassFailed, RequirementError
from graphopt.app.evaluate import top1_accuracy
from graphopt.passes import QAT, FoldBatchNorm, FoldQDQ, InsertQDQ
from graphopt.quant.qparams import is_weight_fq
from graphopt.tools import digits, fashion_mnist


def _digits_graph():
    return graphopt.trace(digits.trained_digits_cnn(), next(digits.test_batches())[0][:4])


def _context():
    return PassContext({"calibration_data": digits.train_batches, "train_data": digits.train_batches})


@pytest.mark.parametrize("learn_scales", [False, True])
def test_qat_trains_weights_keeps_structure_and_exports(tmp_path, learn_scales):
    graph = _digits_graph()
    ptq = PassManager([FoldBatchNorm(), InsertQDQ(progress=False)], context=_context()).run(graph).graph
    result = PassManager([QAT(epochs=1, lr=1e-3, learn_scales=learn_scales, progress=False), FoldQDQ()],
                         context=PassContext({"train_data": digits.train_batches, "teacher": graph})).run(ptq)
    trained = result.records[1]
    assert trained.name == "qat" and trained.stats["steps"] == 23
    qat_graph = PassManager([QAT(epochs=1, lr=1e-3, learn_scales=learn_scales, progress=False)],
                            context=PassContext({"train_data": digits.train_batches, "teacher": graph})).run(ptq).graph
    assert [n.target for n in qat_graph.nodes] == [n.target for n in ptq.nodes]   # the same graph, retrained
    weights = [n for n in ptq.nodes if is_weight_fq(n)]
    for node in weights:
        w_ptq, w_qat = ptq.attr(node.args[0].target), qat_graph.attr(node.args[0].target)
        assert not torch.equal(w_ptq, w_qat)
        s_ptq, s_qat = ptq.attr(node.args[1].target), qat_graph.attr(node.args[1].target)
        assert torch.equal(s_ptq, s_qat) != learn_scales            # scales move only when learned
        assert not isinstance(s_qat, torch.nn.Parameter)            # and are buffers again afterwards
    assert (trained.stats["max_scale_change"] > 0) == learn_scales
    # the int8 artifact computes what was trained
    report = onnx_int8.export(result.graph, str(tmp_path / "qat.int8.onnx"))
    assert report.details["within_one_step"] >= 0.99
    simulated = top1_accuracy(result.graph, digits.test_batches())
    assert top1_accuracy(report.runner, digits.test_batches()) == pytest.approx(simulated, abs=2 / 360)


def test_qat_needs_fake_quant_and_training_data():
    graph = _digits_graph()
    with pytest.raises(PassFailed, match="no fake-quantized weights; run insert_qdq before qat"):
        PassManager([QAT(progress=False)], context=_context()).run(graph)
    with pytest.raises(RequirementError, match="'qat' requires 'train_data'"):
        PassManager([InsertQDQ(progress=False), QAT()],
                    context=PassContext({"calibration_data": digits.train_batches})).run(graph)


@pytest.mark.skipif(not fashion_mnist.available(), reason="needs Debian's dataset-fashion-mnist")
def test_qat_recovers_what_ptq_lost_on_fashion_mnist():
    from graphopt.tools.fashion_cnn import trained_fashion_cnn

    graph = graphopt.trace(trained_fashion_cnn(), next(fashion_mnist.batches("test", 4))[0])
    context = PassContext({"calibration_data": lambda: fashion_mnist.batches("train", 128, limit=1024),
                           "train_data": fashion_mnist.shuffled_epochs(128, limit=4096)})

    def accuracy(g):
        return 100 * top1_accuracy(g, fashion_mnist.batches("test", 500, limit=3000))

    fp32 = accuracy(graph)
    ptq = accuracy(PassManager([FoldBatchNorm(), InsertQDQ(progress=False), FoldQDQ()], context=context)
                   .run(graph).graph)
    qat = accuracy(PassManager([FoldBatchNorm(), InsertQDQ(progress=False), QAT(epochs=1, progress=False),
                                FoldQDQ()], context=context).run(graph).graph)
    assert qat >= ptq + 0.3 and qat >= fp32 - 0.3, (fp32, ptq, qat)
