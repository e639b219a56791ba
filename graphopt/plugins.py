"""Discovery of passes and backends that register themselves.

The core never imports a particular pass or backend: packages declare an entry point in
the ``graphopt.plugins`` group (graphopt's own ``passes`` and ``backends`` included), and
importing it runs their ``@register_pass`` / ``@register_backend`` decorators.
"""
from __future__ import annotations

from importlib.metadata import entry_points

_loaded = False


def load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for entry in entry_points(group="graphopt.plugins"):
        entry.load()
