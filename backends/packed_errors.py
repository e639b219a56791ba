"""Errors of the packed format: each says what is wrong with which file or graph element."""
from __future__ import annotations

from graphopt.errors import ExportError, GraphoptError


class PackedFormatError(GraphoptError):
    """A file could not be read as a graphopt packed model."""


class TruncatedFile(PackedFormatError):
    """The file ends before the lengths in its header say it should."""


class CorruptFile(PackedFormatError):
    """The checksum does not match, or the manifest is not what this format writes."""


class UnsupportedVersion(PackedFormatError):
    """The file was written by another version of the format."""


class DisallowedTarget(PackedFormatError):
    """The file names a module, function, method or attribute outside the allow-list."""


class UnsupportedGraph(ExportError):
    """The graph uses something the packed format cannot store without code (nothing written)."""
