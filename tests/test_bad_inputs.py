"""Bad inputs of the kinds that reach graphopt from outside: example-input dtypes, shapes too large
for memory, output paths a file cannot be written to, and training data that does not fit the
model. Each is refused by name, before the work it would spoil (or, for bool and complex
inputs, handled correctly)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import ConfigError, DataError, PassContext, PassFailed, PassManager, TraceError
from graphopt import memory
from graphopt.backend import registered_backends
from graphopt.training.distill import DistillConfig, distill
from graphopt.passes import Binarize, Distill, PruneChannels, PruneMagnitude, ShareWeights
from graphopt.app.pipeline import ModelSpec, load_pipeline
from graphopt.tools.cli import main
from graphopt.tools.digits import CHECKPOINT, train_batches, trained_digits_cnn
from graphopt.verify import compare_outputs


def _pipeline(tmp_path, model: str, body: str = "") -> str:
    path = tmp_path / "p.toml"
    path.write_text(f"[model]\n{model}\n{body}")
    return str(path)


# -- dtypes of example inputs ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype, message", [
    ("qint8", "model.input_dtype: torch.qint8 is a quantized dtype for example inputs; give one of float32"),
    ("quint8", "torch.quint8 is a quantized dtype"),
    ("float8_e4m3fn", "torch.float8_e4m3fn is an unsupported dtype for example inputs"),
    ("complex32", "torch.complex32 is an unsupported dtype"),
    ("Tensor", "unknown dtype 'Tensor'"),
])
def test_example_input_dtypes_that_cannot_be_made_are_refused_at_load(tmp_path, dtype, message):
    path = _pipeline(tmp_path, f'factory = "torch.nn:Tanh"\ninput_shape = [2, 3]\ninput_dtype = "{dtype}"')
    with pytest.raises(ConfigError, match=message):
        load_pipeline(path)


@pytest.mark.parametrize("dtype", ["bool", "complex64", "complex128"])
def test_bool_and_complex_example_inputs_are_made_and_inspected(tmp_path, capsys, dtype):
    path = _pipeline(tmp_path, f'factory = "torch.nn:Tanh"\ninput_shape = [2, 3]\ninput_dtype = "{dtype}"')
    (x,) = load_pipeline(path).model.example_inputs()
    assert x.dtype == getattr(torch, dtype) and x.shape == (2, 3)
    if dtype == "bool":
        assert 0 < int(x.sum()) < 6   # both values occur (seeded)
    else:
        assert x.imag.abs().sum() > 0
    assert main(["inspect", path]) == 0
    assert f"2x3  {dtype}" in capsys.readouterr().out


def test_a_quantized_example_input_is_refused_by_trace():
    x = torch.quantize_per_tensor(torch.randn(1, 1, 8, 8), 0.1, 0, torch.qint8)
    with pytest.raises(ConfigError, match=r"example input 0 is a quantized tensor \(torch.qint8\)"):
        graphopt.trace(trained_digits_cnn(), x)


@pytest.mark.parametrize("x, named", [(torch.randn(1, 1, 8, 8, dtype=torch.complex64), "complex64"),
                                      (torch.ones(1, 1, 8, 8, dtype=torch.bool), "bool")])
def test_an_input_the_weights_cannot_take_is_named_in_the_trace_error(x, named):
    with pytest.raises(TraceError, match=f"example input 0 is {named}; the model's weights are float32"):
        graphopt.trace(trained_digits_cnn(), x)


def test_complex_outputs_are_compared_with_their_imaginary_parts():
    ref = torch.tensor([1 + 1j, 2 - 1j])
    assert compare_outputs(ref, ref.clone()) == (0.0, 0.0)
    assert compare_outputs(ref, torch.tensor([1 + 0.5j, 2 - 1j]))[0] == pytest.approx(0.5)


def test_a_nan_in_a_complex_example_input_is_refused():
    with pytest.raises(ConfigError, match="example input 0 holds NaN or Inf"):
        graphopt.trace(nn.Tanh(), torch.tensor([complex(float("nan"), 0.0)]))


# -- sizes ---------------------------------------------------------------------------------------------
def test_a_pipeline_input_too_large_for_memory_is_refused_at_load(tmp_path):
    path = _pipeline(tmp_path, f'factory = "graphopt.tools.digits:DigitsCNN"\ncheckpoint = "{CHECKPOINT}"\n'
                                "input_shape = [1000, 3, 100000, 100000]")
    with pytest.raises(ConfigError, match=r"model.input_shape: example inputs of shape 1000x3x100000x100000 "
                                          r"\(float32\) would need 120000.00GB of memory; this machine has"):
        load_pipeline(path)


def test_the_memory_check_counts_every_input_and_its_dtype(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 1_000_000)
    fits = ModelSpec(factory="torch.nn:Tanh", input_shapes=[[500, 500]], input_dtype="float32")
    assert fits.example_inputs()[0].shape == (500, 500)            # 1,000,000 bytes: just fits
    for spec, need in ((ModelSpec(input_shapes=[[500, 500]], input_dtype="float64"), "2.00MB"),
                       (ModelSpec(input_shapes=[[500, 500], [1]], input_dtype="float32"), "1.00MB")):
        with pytest.raises(ConfigError, match=f"would need {need} of memory; this machine has 1.00MB available"):
            spec.example_inputs()


# -- output paths ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(registered_backends()))
@pytest.mark.parametrize("path, message", [("", "the output path is empty"),
                                           ("m\0odel.bin", "contains a NUL byte"),
                                           ("{dir}", "is a directory")])
def test_an_output_path_no_file_can_have_is_refused_before_any_work(digits_graph, tmp_path, monkeypatch, name,
                                                                     path, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    path = path.format(dir=tmp_path / "out")
    with pytest.raises(ConfigError, match=f"backend '{name}': path: .*{message}"):
        registered_backends()[name](digits_graph, path)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("path, message", [('""', r"backends\[0\].path: the output path is empty"),
                                           ('"a\\u0000b.onnx"', "contains a NUL byte"),
                                           ('"."', "is a directory")])
def test_a_pipeline_output_path_no_file_can_have_is_refused_at_load(tmp_path, path, message):
    body = f'[[backends]]\nname = "onnx"\npath = {path}\n'
    with pytest.raises(ConfigError, match=message):
        load_pipeline(_pipeline(tmp_path, 'factory = "torch.nn:Tanh"\ninput_shape = [2, 3]', body))


# -- training data -------------------------------------------------------------------------------------
def _loader(bad_batch: int, bad):
    """Digits training batches of 8, the one at ``bad_batch`` replaced by ``bad(images, labels)``."""
    def batches():
        for index, (images, labels) in enumerate(train_batches(8)):
            if index > 3:
                return
            yield bad(images, labels) if index == bad_batch else (images, labels)
    return batches


BAD_DATA = [
    (lambda x, y: (x[:, :, :4], y), r"batch 2 of epoch 1 has input shapes \[\(8, 1, 4, 8\)\], but the model was "
                                    r"traced with \[\(2, 1, 8, 8\)\]"),
    (lambda x, y: (x.double(), y), "batch 2 of epoch 1: input 0 is float64, but the model was traced with float32"),
    (lambda x, y: ((x, x), y), r"batch 2 of epoch 1 has input shapes \[\(8, 1, 8, 8\), \(8, 1, 8, 8\)\]"),
    (lambda x, y: (x, y[:5]), r"batch 2 of epoch 1: labels of shape \(5,\) for outputs of shape \(8, 10\)"),
    (lambda x, y: (x, torch.arange(8) + 5), r"batch 2 of epoch 1: labels range over \[5, 12\], but the model has 10 "
                                            r"classes"),
]


@pytest.mark.parametrize("bad, message", BAD_DATA)
def test_distillation_names_the_batch_that_does_not_fit(bad, message):
    teacher = graphopt.trace(trained_digits_cnn(), torch.rand(2, 1, 8, 8))
    student = teacher.clone()
    with pytest.raises(DataError, match="distillation: " + message):
        distill(student, teacher, _loader(2, bad), DistillConfig(epochs=1, alpha=0.5), progress=False)


@pytest.mark.parametrize("make", [lambda: Distill(epochs=1, progress=False),
                                  lambda: Binarize(distill_epochs=1, progress=False),
                                  lambda: PruneMagnitude(sparsity=0.5, finetune_epochs=1),
                                  lambda: ShareWeights(bits=4, finetune_epochs=1)])
def test_every_fine_tuning_pass_refuses_training_data_that_does_not_fit(digits_graph, make):
    data = _loader(2, lambda x, y: (x.double(), y))
    with pytest.raises(PassFailed, match="DataError: distillation: batch 2 of epoch 1: input 0 is float64"):
        PassManager([make()], context=PassContext({"train_data": data})).run(digits_graph)


def test_binary_input_shifts_refuse_a_first_batch_that_does_not_fit(digits_graph):
    data = _loader(0, lambda x, y: (x[:, :, :4], y))
    with pytest.raises(PassFailed, match=r"binarize: training batch 0 \(input shifts\) has input shapes"):
        PassManager([Binarize(activations=True, progress=False)],
                    context=PassContext({"train_data": data})).run(digits_graph)


def test_taylor_importance_names_the_training_batch_that_does_not_fit(digits_graph):
    data = _loader(1, lambda x, y: (x, torch.arange(8) + 5))
    with pytest.raises(PassFailed, match=r"taylor importance: training batch 1: labels range over \[5, 12\]"):
        PassManager([PruneChannels(ratio=0.25, importance="taylor")],
                    context=PassContext({"train_data": data})).run(digits_graph)


def test_calibration_names_a_batch_of_the_wrong_dtype(digits_graph):
    from graphopt.passes import InsertQDQ

    data = _loader(1, lambda x, y: (x.half(), y))
    with pytest.raises(PassFailed, match="calibration batch 1: input 0 is float16, but the model was traced with"):
        PassManager([InsertQDQ(progress=False)], context=PassContext({"calibration_data": data})).run(digits_graph)
