"""Which layers a pass acts on: one vocabulary for every pass.

``layers``: module-name patterns (fnmatch: ``features.*``, ``encoder.layer.?.output.dense``) of
the layers the pass acts on (None or empty: every layer it can); ``exclude``: patterns of layers it leaves
alone. A module path (``features.3``) is a pattern matching itself. Each pattern must match a
candidate layer of the model: a misspelt name is an error naming it, never a layer silently left
alone. Per-layer settings (a ratio for one layer) are a separate table, ``overrides``.
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Iterable, Sequence

from graphopt.errors import ConfigError

LayerPatterns = list[str]   # the option type: ``layers: LayerPatterns | None = None``


@dataclass(frozen=True)
class LayerSelection:
    layers: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    @classmethod
    def of(cls, layers: Iterable[str] | None = None, exclude: Iterable[str] | None = None) -> "LayerSelection":
        return cls(tuple(layers) if layers else None, tuple(exclude or ()))

    def check(self, candidates: Sequence[str], owner: str, what: str = "conv/linear layer") -> None:
        """ConfigError for a pattern that matches none of ``candidates`` (names of the model's
        layers the pass could act on), naming the pattern and the closest or a few candidates."""
        names = list(dict.fromkeys(candidates))
        for key, patterns in (("layers", self.layers or ()), ("exclude", self.exclude)):
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                    close = difflib.get_close_matches(pattern, names, n=3)
                    hint = (f"did you mean {', '.join(map(repr, close))}?" if close
                            else f"e.g. {', '.join(names[:6]) or '(none)'}")
                    raise ConfigError(f"{owner}: {key} pattern {pattern!r} matches no {what} of the model; {hint}")

    def reason(self, *names: str) -> str | None:
        """Why the layer known by ``names`` (its module path, its node name) is left alone:
        "excluded", "not in layers", or None when the pass acts on it."""
        names = tuple(n for n in names if n)
        if any(fnmatch.fnmatchcase(n, p) for n in names for p in self.exclude):
            return "excluded"
        if self.layers is not None and not any(fnmatch.fnmatchcase(n, p) for n in names for p in self.layers):
            return "not in layers"
        return None

    def selects(self, *names: str) -> bool:
        return self.reason(*names) is None


def is_table(value: object) -> bool:
    """For ``Renamed(..., when=is_table)``: ``layers`` given as a table is the old spelling of
    ``overrides``."""
    return isinstance(value, dict)
