"""The README's Python examples run as written."""
import os
import re

import pytest
import torch

import graphopt
from graphopt.report import markdown_table

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def python_blocks():
    return re.findall(r"```python\n(.*?)```", open(README).read(), re.S)


def test_readme_pipeline_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(python_blocks()[0], scope)
    assert scope["result"].records[1].stats["folded"] == 20
    assert (tmp_path / "resnet18.onnx").exists() and (tmp_path / "resnet18.pt").exists()


def test_readme_custom_pass_runs_and_is_held_to_its_bound():
    scope = {}
    exec(next(b for b in python_blocks() if "register_pass" in b), scope)
    ScaleLogits = scope["ScaleLogits"]
    assert graphopt.get_pass("scale_logits") is ScaleLogits
    graph = graphopt.trace(torch.nn.Linear(4, 3), torch.randn(2, 4))
    result = graphopt.PassManager([ScaleLogits(factor=1.1)]).run(graph)
    assert result.records[1].max_error == pytest.approx(0.1, rel=1e-4)
    torch.testing.assert_close(result.graph.run(), graph.run() * 1.1)
    with pytest.raises(graphopt.PassFailed, match="bounded contract"):
        graphopt.PassManager([ScaleLogits(factor=2.0)]).run(graph)


def test_readme_quantization_example_runs(tmp_path, monkeypatch):
    from graphopt.tools.fashion_cnn import FashionCNN

    monkeypatch.chdir(tmp_path)
    scope = {"g": graphopt.trace(FashionCNN(width=8).eval(), torch.randn(2, 1, 28, 28)),
             "loader": [torch.randn(8, 1, 28, 28) for _ in range(2)]}
    exec(next(b for b in python_blocks() if "onnx_int8" in b), scope)
    assert [r.name for r in scope["result"].records][-2:] == ["bias_correction", "fold_qdq"]
    assert (tmp_path / "model.int8.onnx").exists() and (tmp_path / "model.int8.pt").exists()


def test_readme_compress_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(next(b for b in python_blocks() if "graphopt.compress(" in b), scope)
    result = scope["result"]
    assert result.chosen is not None and result.original.metric - result.chosen.metric <= 1.0
    assert (tmp_path / "out" / "compress" / "report.md").exists()
    assert os.path.isfile(result.artifact) and result.artifact.endswith(".gpk")


def test_readme_setup_runs_the_bundled_compress_spec():
    from graphopt.search.spec import load_spec

    setup = re.search(r"```sh\n(python3 -m venv.*?)\n```", open(README).read()).group(1)
    spec = re.search(r"graphopt compress (\S+)", setup).group(1)
    loaded = load_spec(os.path.join(os.path.dirname(README), spec))
    assert loaded.goal.max_minutes <= 2.5 and loaded.goal.max_drop == 1.0   # the README's promise: < 3 min


def _cell(text: str) -> str:
    """A docstring sentence as a Markdown table cell: ``code`` as `code`, pipes escaped."""
    return re.sub(r"``([^`]+)``", r"`\1`", " ".join(text.split())).replace("|", "\\|")


def passes_table() -> str:
    """The README's table of built-in passes, made from the registry (so none goes unlisted):
    name, numerical contract, the first line of the class docstring."""
    return markdown_table(["pass", "contract", "what it does"],
                          [(f"`{name}`", cls.contract.value, _cell(cls.summary()))
                           for name, cls in graphopt.registered_passes().items()
                           if cls.__module__.startswith("graphopt.passes.")])


def backends_table() -> str:
    """The README's table of built-in backends: name and the first sentence of its docstring."""
    rows = []
    for name, export in graphopt.registered_backends().items():
        if export.__module__.startswith("graphopt.backends."):
            first = " ".join((export.__doc__ or "").strip().split("\n\n")[0].split())
            rows.append((f"`{name}`", _cell(re.split(r"(?<=\.)\s", first, maxsplit=1)[0])))
    return markdown_table(["backend", "what it writes and checks"], rows)


def test_readme_lists_every_registered_pass_and_backend():
    text = open(README).read()
    for expected in (passes_table(), backends_table()):
        assert expected in text, f"the README's table is out of date; it should read:\n{expected}"
