"""Fuzzing the options of every registered pass and backend, through a pipeline file.

The oracle is this file's own table of what kind of value each option takes (taken from its
default where it has one), not graphopt's checker: a value of another kind must be a
ConfigError that names the pass and the option; a value of the right kind is accepted or
refused by a ConfigError naming the option (a range), never a raw Python error.
"""
from __future__ import annotations

import inspect
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from graphopt.backend import registered_backends
from graphopt.errors import ConfigError
from graphopt.pass_base import registered_passes
from graphopt.app.pipeline import load_pipeline
from graphopt.tools.digits import CHECKPOINT

from fuzz_support import bounded_memory, fuzz, to_toml  # noqa: F401  (bounded_memory: autouse)

MODEL = {"factory": "graphopt.tools.digits:DigitsCNN", "checkpoint": CHECKPOINT, "input_shape": [1, 1, 8, 8]}

# kinds of options whose default (None) does not tell; "names" is a list of strings
KIND_OF_NONE = {"ratio": "float", "target_macs": "float", "target_params": "float", "energy": "float",
                "max_error": "float", "bound": "float", "max_batches": "int", "exclude": "names", "layers": "names",
                "feature_nodes": "names", "overrides": "table", "bits": "int", "strength": "float", "amp": "str"}
# where ``layers`` was a table of per-layer settings, a table is still taken (the deprecated spelling of overrides)
TABLE_LAYERS = {"prune_channels", "split_low_rank"}
NEEDS = {"prune_channels": {"ratio": 0.3}}            # options a pass cannot be built without
BUDGETS = {"ratio", "target_macs", "target_params", "energy"}


def _kind(owner: str, param: inspect.Parameter) -> str:
    if param.name == "importance":
        return "str"
    default = param.default
    if default is None:
        return KIND_OF_NONE[param.name]
    return {bool: "bool", int: "int", float: "float", str: "str"}[type(default)]


def _options(fn) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(fn).parameters.values()
            if p.name not in ("self", "graph", "path") and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


TARGETS = ([("passes", name, p, _kind(name, p)) for name, cls in registered_passes().items()
            for p in _options(cls.__init__)]
           + [("backends", name, p, _kind(name, p)) for name, fn in registered_backends().items()
              for p in _options(fn)])

VALUES = {
    "bool": st.booleans(),
    "int": st.one_of(st.integers(-(2 ** 63), 2 ** 63 - 1), st.sampled_from([0, 1, -1, 2 ** 40])),
    "float": st.one_of(st.floats(), st.sampled_from([0.0, 1.0, -1.0, 0.5, 1e300, math.nan, math.inf, -math.inf])),
    "str": st.one_of(st.text(max_size=10), st.sampled_from(["", "l2", "kd", "features.0", "auto", "uint8"])),
    "names": st.lists(st.sampled_from(["features.0", "classifier.2", "fc9", "*", ""]), max_size=3),
    "mixed list": st.lists(st.one_of(st.integers(-3, 3), st.floats(), st.booleans(), st.text(max_size=3)),
                           min_size=1, max_size=3).filter(lambda v: not all(isinstance(x, str) for x in v)),
    "table": st.dictionaries(st.sampled_from(["features.0", "classifier.2", "fc9", "rank", "ratio"]),
                             st.one_of(st.integers(-2, 40), st.floats(-1, 2), st.text(max_size=3)), max_size=2),
}


def _fits(kind: str, value_kind: str, owner: str = "", name: str = "") -> bool:
    deprecated_table = value_kind == "table" and name == "layers" and owner in TABLE_LAYERS
    return value_kind == kind or (kind == "float" and value_kind == "int") or deprecated_table


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz_options")


def _load(folder, section: str, owner: str, options: dict):
    entry = {"name": owner, **({"path": "out/model.bin"} if section == "backends" else {}), **options}
    path = folder / "p.toml"
    path.write_text(to_toml({"model": MODEL, section: [entry]}), encoding="utf-8")
    return load_pipeline(str(path))


@fuzz(800)
@given(data=st.data())
def test_option_values_of_the_wrong_kind_are_config_errors_naming_the_option(folder, data):
    section, owner, param, kind = data.draw(st.sampled_from(TARGETS), label="option")
    value_kind = data.draw(st.sampled_from(sorted(VALUES)), label="kind")
    value = data.draw(VALUES[value_kind], label="value")
    base = {k: v for k, v in NEEDS.get(owner, {}).items() if not (param.name in BUDGETS and k in BUDGETS)}
    nan = isinstance(value, float) and math.isnan(value)
    if _fits(kind, value_kind, owner, param.name) and not nan:
        try:
            _load(folder, section, owner, {**base, param.name: value})
        except ConfigError as exc:   # a value out of range: the message says which option
            assert param.name in str(exc) or "overrides" in str(exc), str(exc)
        return
    with pytest.raises(ConfigError) as info:
        _load(folder, section, owner, {**base, param.name: value})
    assert f"'{owner}'" in str(info.value) and f"option '{param.name}'" in str(info.value), str(info.value)


@fuzz(60)
@given(owner=st.sampled_from(sorted(registered_passes())),
       key=st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_unknown_option_names_are_refused_with_the_valid_ones_listed(folder, owner, key):
    valid = [p.name for p in _options(registered_passes()[owner].__init__)]
    if key in valid or key in registered_passes()[owner].Rules.renamed:   # a deprecated name still works
        return
    with pytest.raises(ConfigError, match=f"pass '{owner}': unknown option '{key}'; valid options: "):
        _load(folder, "passes", owner, {**NEEDS.get(owner, {}), key: 1})

