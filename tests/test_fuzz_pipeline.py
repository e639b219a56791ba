"""Fuzzing pipeline files: whatever shape a file has, loading it (what ``graphopt run`` does
before any work) either gives a config or a ConfigError; building and tracing the model of
an accepted config gives a model or a GraphoptError. Never a raw Python error."""
from __future__ import annotations

import copy
import os
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from graphopt.errors import ConfigError, GraphoptError
from graphopt.app.pipeline import EVALUATE_KEYS, MODEL_KEYS, REPORT_KEYS, SECTIONS, check_outputs, load_pipeline
from graphopt.pass_base import registered_passes
from graphopt.backend import registered_backends
from graphopt.options import option_names
from graphopt.tools.digits import CHECKPOINT
from graphopt.trace import trace

from fuzz_support import bounded_memory, fuzz, to_toml  # noqa: F401  (bounded_memory: autouse)

VALID = {
    "model": {"factory": "graphopt.tools.digits:DigitsCNN", "checkpoint": CHECKPOINT, "input_shape": [1, 1, 8, 8],
              "kwargs": {"width": 16}},
    "passes": [{"name": "fold_batchnorm"}, {"name": "prune_magnitude", "sparsity": 0.5},
               {"name": "distill", "epochs": 0.5, "max_batches": 2}],
    "backends": [{"name": "onnx", "path": "out/m.onnx"}, {"name": "packed", "path": "out/m.gpk"}],
    "evaluate": {"data": "graphopt.tools.digits:test_batches", "limit": 2},
    "report": {"json": "out/report.json", "latency": True, "threads": 1},
    "data": {"train_data": {"factory": "graphopt.tools.digits:train_batches", "kwargs": {"batch_size": 8}}},
}

# Callables a mutated file may name: only harmless ones (a pipeline file is code; the fuzzer must
# not write one that calls os.system). Random text below never holds ':'.
CALLABLES = ["graphopt.tools.digits:DigitsCNN", "graphopt.tools.digits:trained_digits_cnn",
             "graphopt.tools.digits:test_batches", "graphopt.tools.digits:EXAMPLES", "graphopt.tools.digits:Nope",
             "nosuchpkg:f", ".rel:f", ":", "graphopt.tools.digits", "graphopt.tools.digits:"]
KEYS = sorted(SECTIONS | MODEL_KEYS | EVALUATE_KEYS | REPORT_KEYS | {"name", "path", "factory", "kwargs"}
              | {o for cls in registered_passes().values() for o in option_names(cls.__init__)})
WORDS = (CALLABLES + KEYS + list(registered_passes()) + list(registered_backends())
         + ["float32", "int64", "complex64", "bool", "qint8", "Tensor", "resnet18", "resnet99", "out/x.onnx",
            "", ".", "/", "out", "a\0b", "top1", "f1", "kd", "layer", "global", "features.0", "*"])

scalars = st.one_of(
    st.booleans(),
    st.sampled_from([0, 1, -1, 2, 7, 64, 2 ** 31, 2 ** 62, -(2 ** 63)]),
    st.integers(-(2 ** 63), 2 ** 63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(WORDS),
    st.text(alphabet=st.characters(blacklist_characters=":", blacklist_categories=("Cs",)), max_size=8),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(string.ascii_letters, max_size=5)), inner,
                    max_size=3)), max_leaves=8)


def _paths(node, prefix=()):
    """Every place in the document a value sits, as a key/index path."""
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _paths(child, prefix + (key,))


def _parent(doc, path):
    for key in path[:-1]:
        doc = doc[key]
    return doc


@st.composite
def mutated_pipelines(draw):
    """The valid document with one to three edits: a value replaced, a key dropped or added, a
    value wrapped in a list or a list replaced by one of its items."""
    doc = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from([p for p in _paths(doc) if p]))
        parent, key, old = _parent(doc, path), path[-1], _parent(doc, path)[path[-1]]
        action = draw(st.sampled_from(["replace", "replace", "drop", "add", "wrap", "unwrap"]))
        if action == "replace":
            parent[key] = draw(values)
        elif action == "drop":
            del parent[key]
        elif action == "add" and isinstance(old, dict):
            old[draw(st.sampled_from(KEYS))] = draw(values)
        elif action == "wrap":
            parent[key] = [old]
        elif action == "unwrap" and isinstance(old, list) and old:
            parent[key] = old[0]
        if not doc:
            break
    return doc


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz_pipeline")


def _load_or_config_error(path: str):
    """What ``graphopt run`` does before any work: a config, or None after a ConfigError."""
    try:
        config = load_pipeline(path)
        check_outputs(config)
        return config
    except ConfigError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip(), repr(str(exc))
        return None


def test_the_unmutated_document_loads(folder):
    path = folder / "valid.toml"
    path.write_text(to_toml(VALID))
    config = load_pipeline(str(path))
    assert [p.name for p in config.passes] == ["fold_batchnorm", "prune_magnitude", "distill"]
    assert [b[0] for b in config.backends] == ["onnx", "packed"]


@fuzz(400)
@given(doc=mutated_pipelines())
def test_mutated_pipeline_files_load_or_raise_config_error(folder, doc):
    path = folder / "mutated.toml"
    path.write_text(to_toml(doc), encoding="utf-8")
    config = _load_or_config_error(str(path))
    if config is None:
        return
    try:   # an accepted file's model is built and traced, as the run would
        trace(config.model.build(), config.model.example_inputs())
    except GraphoptError:
        pass
    assert not os.path.exists(folder / "out"), "loading a pipeline wrote an output"


@fuzz(150)
@given(text=st.one_of(st.text(max_size=80), st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
                      st.sampled_from(["[model", "[[model]]\n", "model = 1", "[model]\n[model]\n", "a = [1,",
                                       "x = 1979-05-27T07:32:00Z", "passes = 3\n[model]\n", '"\\uD800" = 1'])))
def test_arbitrary_text_is_a_config_error(folder, text):
    path = folder / "text.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _load_or_config_error(str(path))


@fuzz(60)
@given(data=st.binary(min_size=1, max_size=64))
def test_bytes_that_are_not_utf8_are_a_config_error(folder, data):
    path = folder / "bytes.toml"
    path.write_bytes(b"[model]\n" + data + b"\xff\xfe")
    with pytest.raises(ConfigError, match="bytes.toml"):
        load_pipeline(str(path))
