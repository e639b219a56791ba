"""Instruments: code the PassManager calls around a pipeline and each pass (as TVM's pass
instruments and MLIR's pass instrumentation do), so progress bars, IR dumps and record logs are
plug-ins rather than manager code. Verification of each pass's contract is not an instrument:
it is what the manager exists for, and no configuration can leave it out silently (only
``verify=False``, which the records then show as unchecked)."""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Sequence

from tqdm.auto import tqdm

from graphopt.errors import ConfigError

if TYPE_CHECKING:
    from graphopt.ir import Graph
    from graphopt.pass_base import Pass
    from graphopt.pass_manager import PassRecord, PipelineResult


class Instrument:
    """Subclass and override the hooks you need; each gets the pass's index in the pipeline."""

    def run_begin(self, graph: "Graph", passes: Sequence["Pass"]) -> None:
        pass

    def before_pass(self, index: int, p: "Pass", graph: "Graph") -> None:
        pass

    def after_pass(self, index: int, p: "Pass", graph: "Graph", record: "PassRecord") -> None:
        pass

    def pass_failed(self, index: int, p: "Pass", error: Exception) -> None:
        pass

    def run_end(self, result: "PipelineResult") -> None:
        pass


class ProgressBar(Instrument):
    """One bar over the pipeline, naming the pass that runs (shown after 2 s)."""

    def run_begin(self, graph: "Graph", passes: Sequence["Pass"]) -> None:
        self.bar = tqdm(total=len(passes), desc="passes", leave=False, delay=2)

    def before_pass(self, index: int, p: "Pass", graph: "Graph") -> None:
        self.bar.set_postfix_str(p.name)

    def after_pass(self, index: int, p: "Pass", graph: "Graph", record: "PassRecord") -> None:
        self.bar.update(1)

    def pass_failed(self, index: int, p: "Pass", error: Exception) -> None:
        self.bar.close()

    def run_end(self, result: "PipelineResult") -> None:
        self.bar.close()


class IRDump(Instrument):
    """Writes the IR after each pass into ``directory``: ``00_input.py``, ``01_<pass>.py``, ...
    (the generated forward code, then the node table with each node's kind and shape), so a
    pipeline's effect can be read and diffed pass by pass. An existing, non-empty directory is
    refused rather than mixed with an earlier run's dumps."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        if os.path.isdir(self.directory) and os.listdir(self.directory):
            raise ConfigError(f"IRDump: {self.directory!r} is not empty; give a new or empty directory")
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise ConfigError(f"IRDump: {self.directory!r} is a file, not a directory")

    def _write(self, stem: str, graph: "Graph") -> None:
        os.makedirs(self.directory, exist_ok=True)
        rows = [f"#   {n.name}: {n.op} {n.target} kind={graph.kind(n).value} shape={graph.shape(n)}"
                for n in graph.nodes]
        with open(os.path.join(self.directory, f"{stem}.py"), "w") as f:
            f.write(graph.gm.code.strip() + "\n\n# nodes\n" + "\n".join(rows) + "\n")

    def run_begin(self, graph: "Graph", passes: Sequence["Pass"]) -> None:
        self._write("00_input", graph)

    def after_pass(self, index: int, p: "Pass", graph: "Graph", record: "PassRecord") -> None:
        self._write(f"{index + 1:02d}_{p.name}", graph)


class RecordLog(Instrument):
    """Appends each pass's record to a JSON-lines file as soon as the pass is verified, so a long
    pipeline that fails or is stopped leaves the records of the passes that finished."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def _append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    def after_pass(self, index: int, p: "Pass", graph: "Graph", record: "PassRecord") -> None:
        self._append(record.to_dict())

    def pass_failed(self, index: int, p: "Pass", error: Exception) -> None:
        self._append({"name": p.name, "failed": f"{type(error).__name__}: {error}"})
