"""Fuzzing the command line in-process: whatever arguments ``graphopt run`` and ``graphopt
inspect`` get, they exit with a status, and a failure is an error line on stderr, never a
Python traceback (torch's own logged tracebacks included: its error records are collected)."""
from __future__ import annotations

import logging
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from graphopt import memory
from graphopt.tools.cli import main
from graphopt.tools.digits import CHECKPOINT, DigitsCNN

from fuzz_support import bounded_memory, fuzz  # noqa: F401  (bounded_memory: autouse)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Files the arguments may name, good and bad, by name."""
    folder = tmp_path_factory.mktemp("fuzz_cli")
    model = f'[model]\nfactory = "graphopt.tools.digits:DigitsCNN"\ncheckpoint = "{CHECKPOINT}"\n'
    files = {
        "good.toml": model + 'input_shape = [1, 1, 8, 8]\n[[passes]]\nname = "fold_batchnorm"\n',
        "bad_pass.toml": model + 'input_shape = [1, 1, 8, 8]\n[[passes]]\nname = "fold_batchnrom"\n',
        "huge.toml": model + "input_shape = [1, 3, 1000000, 1000000]\n",
        "qint8.toml": model + 'input_shape = [1, 1, 8, 8]\ninput_dtype = "qint8"\n',
        "not_toml.toml": "[model\n",
        "empty.toml": "",
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    (folder / "binary.toml").write_bytes(b"\xff\xfe\x00garbage")
    (folder / "empty.pt").write_bytes(b"")
    (folder / "garbage.pt").write_bytes(os.urandom(64))
    torch.save(torch.zeros(3), folder / "tensor.pt")
    torch.save(DigitsCNN(width=4).state_dict(), folder / "other.pt")
    (folder / "dir.toml").mkdir()
    return folder


NAMES = ["good.toml", "bad_pass.toml", "huge.toml", "qint8.toml", "not_toml.toml", "empty.toml", "binary.toml",
         "dir.toml", "missing.toml", "empty.pt", "garbage.pt", "tensor.pt", "other.pt", CHECKPOINT, ""]
MODELS = ["graphopt.tools.digits:DigitsCNN", "graphopt.tools.digits:test_batches", "graphopt.tools.digits:EXAMPLES",
          "graphopt.tools.digits:Nope", "nosuchpkg:f", ".rel:f", ":", "resnet99", "", "a\0b"]
# sizes are small or absurd, never in between: a run must not depend on how much memory the machine has
dims = st.one_of(st.integers(-2, 32), st.just(10 ** 12))
shapes = st.one_of(st.lists(dims, min_size=0, max_size=5).map(lambda d: ",".join(map(str, d))),
                   st.tuples(st.integers(1, 3), st.integers(1, 2), st.integers(1, 20), st.integers(1, 20)).map(
                       lambda d: ",".join(map(str, d))),   # plausible images: most do not fit the model
                   st.sampled_from(["1,1,8,8", "1,1,2,2", "1,3,1000000,1000000", "1x1x8x8", "1,,8", "8", "nan"]),
                   st.text(max_size=8))
numbers = st.one_of(st.floats().map(str), st.integers(-5, 5).map(str), st.sampled_from(["x", "", "1e400"]))


@st.composite
def argv(draw, folder) -> list[str]:
    def path():
        name = draw(st.sampled_from(NAMES))
        return name if not name or os.path.isabs(name) else str(folder / name)

    if draw(st.booleans()):
        args = ["run", path()]
        if draw(st.booleans()):
            args += ["--json", draw(st.sampled_from(["", "a\0b.json", str(folder), str(folder / "dir.toml"),
                                                     str(folder / "empty.pt" / "x.json"), CHECKPOINT]))]
        args += draw(st.sampled_from([[], ["--quiet"], ["--bogus"], ["extra"]]))
        return args
    model = draw(st.one_of(st.just(MODELS[0]), st.sampled_from(MODELS), st.builds(path)))
    args = ["inspect", model]
    for flag, values, odds in (("--input-shape", shapes, 2), ("--checkpoint", st.builds(path), 4),
                               ("--ratio", numbers, 4), ("--target-macs", numbers, 4), ("--round-to", numbers, 4),
                               ("--importance", st.sampled_from(["l1", "taylor", "nope", ""]), 4)):
        if draw(st.integers(1, odds)) == 1:
            args += [f"{flag}={draw(values)}"]
    if draw(st.booleans()):
        args.append("--prune-plan")
    return args


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def torch_errors():
    """Error records torch logs (its handler writes them, tracebacks and all, to the terminal's
    stderr, which pytest's capture of sys.stderr does not always see)."""
    handler = _Records()
    logging.getLogger("torch").addHandler(handler)
    yield handler.records
    logging.getLogger("torch").removeHandler(handler)


@fuzz(250)
@given(data=st.data())
def test_bad_arguments_exit_with_an_error_line_and_no_traceback(inputs, capfd, torch_errors, data):
    args = data.draw(argv(inputs), label="argv")
    capfd.readouterr()
    torch_errors.clear()
    try:
        status = main(args)
    except SystemExit as exit_:   # argparse: usage, then one "graphopt ...: error: ..." line
        status = exit_.code
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    assert not torch_errors, [r.getMessage() for r in torch_errors]
    if status != 0:
        last = err.strip().splitlines()[-1] if err.strip() else ""
        assert last.startswith("error: ") or "error: " in last, err
    for name in os.listdir(inputs):
        assert not name.startswith("."), f"a temporary file was left: {name}"


@pytest.mark.parametrize("args, message", [
    (["inspect", "graphopt.tools.digits:DigitsCNN", "--input-shape", "1,3,100000,100000"],
     r"error: --input-shape: example inputs of shape 1x3x100000x100000 \(float32\) would need 120.00GB of memory; "
     r"this machine has 68.72GB available"),
    (["inspect", "graphopt.tools.digits:DigitsCNN", "--input-shape", "1,1,2,2"],
     r"error: cannot trace DigitsCNN: <root>: RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    (["run", "{folder}/qint8.toml"], "model.input_dtype: torch.qint8 is a quantized dtype for example inputs"),
    (["run", "{folder}/good.toml", "--json", ""], "the report JSON: the output path is empty"),
    (["run", "{folder}/good.toml", "--json", "a\0b.json"], "the report JSON: the output path 'a\\\\x00b.json' contains"),
    (["run", "{folder}/good.toml", "--json", "{folder}"], "the report JSON: .* is a directory"),
    (["run", "{folder}/binary.toml"], "binary.toml: not valid TOML: 'utf-8' codec can't decode"),
])
def test_named_bad_arguments(inputs, capfd, monkeypatch, args, message):
    import re

    monkeypatch.setattr(memory, "available_bytes", lambda: 64 << 30)   # as on a 64 GiB machine, wherever run
    args = [a.format(folder=inputs) for a in args]
    assert main(args) == 2
    out, err = capfd.readouterr()
    assert re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert "pipeline" not in out   # refused before any work: no report printed
