"""What the fuzz tests share: a reproducible hypothesis profile, a fixed memory size, and a
TOML writer.

CI must get the same examples on every run (derandomized, no example database) with the same
outcome on every machine (memory checks see a fixed size), and the whole fuzz suite must stay
within its time budget, so every fuzz test sizes ``max_examples`` itself through :func:`fuzz`.
"""
from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, settings

from graphopt import memory

FUZZ_MEMORY = 64 << 20


def fuzz(max_examples: int) -> settings:
    """Settings for one fuzz test: fixed examples, no deadline (CI machines are slow and shared)."""
    return settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def bounded_memory(monkeypatch):
    """Fuzz tests run as if the machine had 64 MiB to give: a declared size is then accepted or
    refused the same way everywhere, and nothing a fuzzed input asks for can load a CI machine."""
    monkeypatch.setattr(memory, "available_bytes", lambda: FUZZ_MEMORY)


def _string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    escaped = "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F or c in '"\\' else c for c in text)
    return f'"{escaped}"'


def _key(key: str) -> str:
    return key if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key) else _string(key)


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML spelling for {type(value).__name__}")


def to_toml(document: dict) -> str:
    """``document`` as TOML, every top-level value on one line (tables inline): enough to write
    any shape of pipeline file, right or wrong, that ``tomllib`` reads back as ``document``."""
    return "".join(f"{_key(k)} = {_value(v)}\n" for k, v in document.items())
