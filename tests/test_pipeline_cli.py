import json
import os
import sys

import pytest
import torch

import graphopt

from graphopt import ConfigError
from graphopt.app.pipeline import load_pipeline, run_pipeline
from graphopt.tools.cli import main as cli_main
from graphopt.tools.digits import CHECKPOINT, EXAMPLES

EXAMPLE = os.path.join(EXAMPLES, "digits.toml")


def write(tmp_path, body, name="p.toml"):
    path = tmp_path / name
    path.write_text(body)
    return str(path)


MODEL = f"""
[model]
factory = "graphopt.tools.digits:DigitsCNN"
checkpoint = "{CHECKPOINT}"
input_shape = [1, 1, 8, 8]
"""


def test_bundled_example_runs_end_to_end(tmp_path, capsys):
    report_path = tmp_path / "report.json"
    assert cli_main(["run", EXAMPLE, "--quiet", "--json", str(report_path)]) == 0
    out = capsys.readouterr().out
    for word in ("fold_batchnorm", "onnx", "torchscript", "top1"):
        assert word in out
    report = json.loads(report_path.read_text())
    assert [r["name"] for r in report["passes"]] == ["input", "fold_batchnorm", "remove_identity",
                                                     "eliminate_dead_code"]
    assert report["passes"][1]["stats"]["folded"] == 2
    assert {e["backend"] for e in report["exports"]} == {"onnx", "torchscript"}
    assert all(e["max_rel_error"] <= 1e-4 for e in report["exports"])
    before, after = report["metrics"]["before"]["top1"], report["metrics"]["after"]["top1"]
    assert before >= 0.97  # the committed checkpoint is trained
    assert after == pytest.approx(before, abs=1e-9)


def test_digits_data_without_scikit_learn_names_the_extra(tmp_path, monkeypatch, capsys):
    """scikit-learn is the `examples` extra, not a dependency: without it the digits model still
    loads, and its data is a ConfigError saying what to install (the CLI prints it, exit 2)."""
    from graphopt.tools import digits

    for name in ("sklearn", "sklearn.datasets", "sklearn.model_selection"):
        monkeypatch.setitem(sys.modules, name, None)
    assert digits.trained_digits_cnn()(torch.rand(1, 1, 8, 8)).shape == (1, 10)
    with pytest.raises(ConfigError, match=r"needs scikit-learn .*pip install 'graphopt\[examples\]'"):
        digits.test_batches()
    path = write(tmp_path, MODEL + '[evaluate]\ndata = "graphopt.tools.digits:test_batches"\n')
    assert cli_main(["run", path, "--quiet"]) == 2
    assert "pip install 'graphopt[examples]'" in capsys.readouterr().err


def test_pipeline_with_torchvision_model(tmp_path):
    path = write(tmp_path, """
[model]
torchvision = "resnet18"
input_shape = [1, 3, 64, 64]

[[passes]]
name = "fold_batchnorm"

[[backends]]
name = "onnx"
path = "r18.onnx"
""")
    outcome = run_pipeline(load_pipeline(path), progress=False)
    assert outcome.records[1].stats["folded"] == 20
    assert (tmp_path / "r18.onnx").exists()


@pytest.mark.parametrize("body, message", [
    (MODEL + '[[passes]]\nname = "fold_batchnrom"\n', "unknown pass 'fold_batchnrom'; registered passes: "),
    (MODEL + '[[passes]]\nname = "fold_batchnorm"\nratio = 0.5\n', "pass 'fold_batchnorm': unknown option 'ratio'"),
    (MODEL.replace("input_shape", "inputshape"), "[model]: unknown key 'inputshape'; valid keys: checkpoint"),
    (MODEL + "[reprot]\njson = 'x'\n", "unknown key 'reprot'; valid keys: backends, data, evaluate"),
    (MODEL.replace("[1, 1, 8, 8]", "[1, -1, 8, 8]"), "input_shape must be a list of positive integers"),
    (MODEL.replace("[1, 1, 8, 8]", '"1x1x8x8"'), "input_shape must be a list of positive integers"),
    (MODEL.replace(CHECKPOINT, "/nonexistent/ckpt.pt"), "model.checkpoint: file not found: /nonexistent/ckpt.pt"),
    (MODEL.replace("graphopt.tools.digits:DigitsCNN", "graphopt.tools.digits:Nope"),
     "model.factory: module 'graphopt.tools.digits' has no attribute 'Nope'"),
    (MODEL.replace("graphopt.tools.digits:DigitsCNN", "nosuchpkg:f"), "cannot import module 'nosuchpkg'"),
    ('[model]\ntorchvision = "resnet99"\ninput_shape = [1]\n', "unknown model 'resnet99'"),
    (MODEL + '[[backends]]\nname = "tflite"\npath = "x"\n', "unknown backend 'tflite'; registered backends: "),
    (MODEL + '[[backends]]\nname = "onnx"\npath = "x.onnx"\nopset = "18"\n', "option 'opset' must be int"),
    (MODEL + '[[backends]]\nname = "onnx"\n', "backends[0].path must be an output path"),
    (MODEL + '[[passes]]\nname = "insert_qdq"\ntarget = "x86-sse2"\n',
     "option 'target' must be one of auto, x86-vnni, x86-avx2, arm64, got str 'x86-sse2'"),
    (MODEL + '[evaluate]\ndata = "graphopt.tools.digits:test_batches"\nmetric = "f1"\n', "evaluate.metric must be one of top1, got str 'f1'"),
    ("[model\n", "not valid TOML"),
    ("[[passes]]\nname = 'fold_batchnorm'\n", "missing [model] table"),
])
def test_bad_pipeline_files_give_clear_errors(tmp_path, body, message):
    with pytest.raises(ConfigError) as info:
        load_pipeline(write(tmp_path, body))
    assert message in str(info.value)


def test_unknown_pass_lists_every_registered_pass(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_pipeline(write(tmp_path, MODEL + '[[passes]]\nname = "nope"\n'))
    listed = str(info.value).split("registered passes: ")[1].split(", ")
    assert listed == sorted(graphopt.registered_passes())
    assert {"fold_batchnorm", "remove_identity", "eliminate_dead_code", "distill"} <= set(listed)


def test_checkpoint_that_does_not_fit_the_model(tmp_path):
    body = MODEL.replace("graphopt.tools.digits:DigitsCNN", "graphopt.tools.digits:DigitsCNN") + \
        "[model.kwargs]\nwidth = 8\n"
    path = write(tmp_path, body)
    with pytest.raises(ConfigError, match="does not fit the model"):
        load_pipeline(path).model.build()


def test_unwritable_output_fails_before_any_work_and_leaves_nothing(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    path = write(tmp_path, MODEL + f'[[passes]]\nname = "fold_batchnorm"\n[[backends]]\nname = "onnx"\n'
                                   f'path = "{blocker}/out/m.onnx"\n')
    assert cli_main(["run", path, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: backends[0].path: cannot write") and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["blocker", "p.toml"]


def test_missing_pipeline_file(capsys):
    assert cli_main(["run", "/nonexistent/pipeline.toml"]) == 2
    assert "pipeline file not found: /nonexistent/pipeline.toml" in capsys.readouterr().err


def test_untraceable_model_from_the_cli(capsys):
    assert cli_main(["inspect", "test_trace:GatedNet", "--input-shape", "2,4"]) == 2
    err = capsys.readouterr().err
    assert "cannot trace GatedNet: block.1: data-dependent control flow" in err


def test_inspect_prints_layers_and_totals(capsys):
    assert cli_main(["inspect", "graphopt.tools.digits:DigitsCNN", "--input-shape", "1,1,8,8"]) == 0
    out = capsys.readouterr().out
    assert "features_3" in out and "1x32x8x8" in out
    assert "params 9.98k, MACs 309.25k" in out


def test_passes_and_backends_list_what_is_registered(capsys):
    assert cli_main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "fold_batchnorm" in out and "exact" in out and "folded_norms" in out
    assert len([line for line in out.splitlines() if line.startswith("fold_")]) == 2   # one line each
    assert cli_main(["backends"]) == 0
    assert "torchscript_int8  Rebuild graph on torch's int8 kernels" in capsys.readouterr().out


def test_outputs_never_overwrite_inputs_or_each_other(tmp_path, capsys):
    import shutil

    checkpoint = tmp_path / "ckpt.pt"
    shutil.copy(CHECKPOINT, checkpoint)
    before = checkpoint.read_bytes()
    model = MODEL.replace(CHECKPOINT, str(checkpoint))
    cases = {
        f'[[backends]]\nname = "torchscript"\npath = "{checkpoint}"\n': "would overwrite model.checkpoint",
        '[[backends]]\nname = "onnx"\npath = "sub/../p.toml"\n': "would overwrite the pipeline file",
        '[[backends]]\nname = "onnx"\npath = "m.onnx"\n[[backends]]\nname = "torchscript"\npath = "./m.onnx"\n':
            r"backends\[1\].path: .*/\./m.onnx would overwrite backends\[0\].path",
        '[[backends]]\nname = "onnx"\npath = "m.onnx"\n[report]\njson = "m.onnx"\n':
            r"report.json: .*m.onnx would overwrite backends\[0\].path",
    }
    for body, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_pipeline(write(tmp_path, model + body))
    path = write(tmp_path, model + '[[backends]]\nname = "onnx"\npath = "m.onnx"\n')
    assert cli_main(["run", path, "--quiet", "--json", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "the report JSON" in err and "would overwrite model.checkpoint" in err
    assert checkpoint.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["ckpt.pt", "p.toml"]


@pytest.mark.parametrize("argv, message", [
    (["inspect", "resnet99"], "unknown model 'resnet99'; did you mean resnet50"),
    (["inspect", "graphopt.tools.digits:DigitsCNN", "--input-shape=-1,1,8,8"], "--input-shape must be positive"),
    (["inspect", "graphopt.tools.digits:DigitsCNN", "--input-shape=1,3,8,8"],
     "cannot trace DigitsCNN: <root>: RuntimeError: Given groups=1"),
    (["inspect", ".rel:f"], "'.rel' is a relative module name"),
    (["inspect", "graphopt.tools.digits:DigitsCNN", "--input-shape=1,1,8,8", "--checkpoint", "{empty}"],
     "cannot load .*empty.pt as a state_dict: EOFError"),
    (["inspect", "graphopt.tools.digits:DigitsCNN", "--input-shape=1,1,8,8", "--checkpoint", "{tensor}"],
     "holds a Tensor, not a state_dict"),
])
def test_cli_bad_input_names_the_problem_without_a_traceback(tmp_path, capsys, argv, message):
    import re

    empty, tensor = tmp_path / "empty.pt", tmp_path / "tensor.pt"
    empty.write_bytes(b"")
    torch.save(torch.zeros(3), tensor)
    argv = [a.format(empty=empty, tensor=tensor) for a in argv]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err
