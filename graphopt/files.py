"""Output files: a path is checked before any work, and an artifact appears complete under
its final name, or not at all."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Iterator

from graphopt.errors import ConfigError, ExportError


def check_output_path(path: Any, where: str) -> str:
    """``path`` as a string if a file can be written there; else a ConfigError naming ``where``
    and why (not a path, empty, a NUL byte, a directory, or no writable directory to hold it)."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise ConfigError(f"{where} must be a file path, got {type(path).__name__} {path!r}")
    path = os.fspath(path)
    if not path:
        raise ConfigError(f"{where}: the output path is empty")
    if "\0" in path:
        raise ConfigError(f"{where}: the output path {path!r} contains a NUL byte")
    if os.path.isdir(path):
        raise ConfigError(f"{where}: {path} is a directory")
    probe = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise ConfigError(f"{where}: cannot write {path}: {probe} is not a writable directory")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix or ".tmp", dir=folder)
        os.close(fd)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
