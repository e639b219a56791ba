"""Real data: the committed Fashion-MNIST CNN keeps its test accuracy through int8 PTQ."""
import os

import pytest

import graphopt
from graphopt import PassContext, PassManager
from graphopt.backends import onnx_int8
from graphopt.evaluate import top1_accuracy
from graphopt.passes import FoldBatchNorm, FoldQDQ, InsertQDQ
from graphopt.tools import fashion_mnist
from graphopt.tools.fashion_cnn import calibration_batches, trained_fashion_cnn

pytestmark = pytest.mark.skipif(not fashion_mnist.available(), reason="apt-get install -y dataset-fashion-mnist")


def test_fashion_mnist_int8_ptq_within_0_3_points(tmp_path):
    graph = graphopt.trace(trained_fashion_cnn(), next(calibration_batches())[0][:4])  # real images: the
    # contract is checked on the example inputs, which must look like the calibration data
    int8 = PassManager([FoldBatchNorm(), InsertQDQ(progress=False), FoldQDQ()],
                       context=PassContext({"calibration_data": calibration_batches})).run(graph).graph
    fp32_acc = top1_accuracy(graph, fashion_mnist.test_batches())
    assert fp32_acc > 0.8
    assert abs(top1_accuracy(int8, fashion_mnist.test_batches()) - fp32_acc) <= 0.003
    path = os.path.join(tmp_path, "fashion.int8.onnx")
    report = onnx_int8.export(int8, path, form="qoperator")
    assert abs(top1_accuracy(report.runner, fashion_mnist.test_batches(1000)) - fp32_acc) <= 0.003
