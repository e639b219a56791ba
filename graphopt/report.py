"""Human-readable tables and JSON for pass records and graph summaries."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Sequence

from graphopt.distributed import main_process_only
from graphopt.files import atomic_path


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'; keeps small numbers exact."""
    if isinstance(n, str):
        return n
    if n is None:
        return "-"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}{unit}"
    return f"{n:g}{unit}" if isinstance(n, float) else f"{n}{unit}"


def format_error(e: float) -> str:
    if isinstance(e, str) or math.isinf(e):
        return "inf"
    return "0" if e == 0 else f"{e:.2e}"


def _numeric(cell: str) -> bool:
    return cell in ("", "-", "inf") or cell[:1].isdigit() or (cell[:1] in "+-." and cell[1:2].isdigit())


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain fixed-width table: numeric columns right-aligned, text columns left-aligned."""
    text_rows = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in text_rows]) for i, h in enumerate(headers)]
    right = [i > 0 and all(_numeric(r[i]) for r in text_rows) for i in range(len(headers))]

    def line(cells):
        return "  ".join(c.rjust(w) if right[i] else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in text_rows])


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """The same table in Markdown (for results files and the README)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _stat(value: Any) -> str:
    """A stats value for a table cell: collections are summarised by their size."""
    if isinstance(value, (dict, list, tuple, set)):
        return f"[{len(value)}]"
    return str(value)


def pass_table(records) -> str:
    rows = [(r.name, r.contract, human(r.params), human(r.macs), human(r.bytes, "B"),
             format_error(r.max_error), format_error(r.contract_error), format_error(r.error_vs_input),
             f"{r.seconds:.3f}", ", ".join(f"{k}={_stat(v)}" for k, v in r.stats.items())) for r in records]
    return table(["pass", "contract", "params", "MACs", "bytes", "change", "contract err", "vs input", "time s",
                  "stats"], rows)


@main_process_only   # under torchrun, rank 0 writes (every rank holds the same results)
def write_json(path: str | os.PathLike, payload: Any) -> None:
    with atomic_path(path, ".json") as tmp:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, default=str)
            f.write("\n")
