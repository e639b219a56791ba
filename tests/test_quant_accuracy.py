"""Real data: the committed Fashion-MNIST CNN keeps its test accuracy through int8 PTQ, on the
host's own target and on x86-avx2's 7-bit weights (which every x86 and ARM CPU runs exactly)."""
import argparse
import os

import pytest

from benchmarks.harness import parse_targets
import graphopt
from graphopt import PassContext, PassManager
from graphopt.backends import onnx_int8
from graphopt.app.evaluate import top1_accuracy
from graphopt.passes import FoldBatchNorm, FoldQDQ, InsertQDQ
from graphopt.tools import fashion_mnist
from graphopt.tools.fashion_cnn import calibration_batches, trained_fashion_cnn

needs_data = pytest.mark.skipif(not fashion_mnist.available(), reason="apt-get install -y dataset-fashion-mnist")


@needs_data
@pytest.mark.parametrize("target", ["auto", "x86-avx2"])
def test_fashion_mnist_int8_ptq_within_0_3_points(tmp_path, target):
    graph = graphopt.trace(trained_fashion_cnn(), next(calibration_batches())[0][:4])  # real images: the
    # contract is checked on the example inputs, which must look like the calibration data
    int8 = PassManager([FoldBatchNorm(), InsertQDQ(progress=False, target=target), FoldQDQ()],
                       context=PassContext({"calibration_data": calibration_batches})).run(graph).graph
    fp32_acc = top1_accuracy(graph, fashion_mnist.test_batches())
    assert fp32_acc > 0.8
    assert abs(top1_accuracy(int8, fashion_mnist.test_batches()) - fp32_acc) <= 0.003
    path = os.path.join(tmp_path, "fashion.int8.onnx")
    report = onnx_int8.export(int8, path, form="qoperator")
    assert abs(top1_accuracy(report.runner, fashion_mnist.test_batches(1000)) - fp32_acc) <= 0.003


def test_accuracy_tools_targets_option_is_a_checked_list():
    assert parse_targets("x86-vnni,x86-avx2") == ["x86-vnni", "x86-avx2"]
    assert parse_targets(" arm64 , auto,arm64") == ["arm64", "auto"]
    for bad in ("x86-avx512", "", " , "):
        with pytest.raises(argparse.ArgumentTypeError, match="known: auto, x86-vnni"):
            parse_targets(bad)
