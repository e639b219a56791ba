"""Allocations this machine cannot hold are refused before they are tried.

A declared size (an ``input_shape``, a shape read from a file) can ask for terabytes; torch
would then fail with an overflow, get the process killed, or swap for minutes. Checking the
bytes against the memory available turns that into an error naming the size, up front.
"""
from __future__ import annotations

import math
import os
from typing import Iterable

import torch

from graphopt.errors import ConfigError
from graphopt.report import human
from graphopt.torch_logs import quiet


def available_bytes() -> int:
    """Memory a new allocation can get now: Linux's MemAvailable, else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        return 1 << 62   # nothing to go by: only absurd sizes are refused


def tensor_bytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    """Bytes of a dense tensor (exact integers: no overflow however large the shape)."""
    return math.prod(int(d) for d in shape) * dtype.itemsize


def check_fits(nbytes: int, what: str, error: type[Exception] = ConfigError) -> None:
    """Raise ``error`` naming ``what`` and its size if ``nbytes`` exceed the memory available."""
    limit = available_bytes()
    if nbytes > limit:
        raise error(f"{what} would need {human(nbytes, 'B')} of memory; this machine has {human(limit, 'B')} "
                    f"available")


class _TooLarge(Exception):
    def __init__(self, node: str, nbytes: int):
        super().__init__(node)
        self.node, self.nbytes = node, nbytes


def check_run_fits(gm: torch.fx.GraphModule, inputs: tuple, what: str, error: type[Exception] = ConfigError) -> None:
    """Raise ``error`` naming the first node of ``gm`` whose output on ``inputs`` would not fit in
    memory, found by running on fake tensors (shapes only: nothing is allocated). A graph read
    from a file can ask for any size (``x.repeat(10**5, 10**5)``); its real run comes after this.
    A failure that is not about size is left to that run, which reports it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    limit = available_bytes()

    class Sizes(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            leaves = torch.utils._pytree.tree_leaves(out)
            nbytes = sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
            if nbytes > limit:
                raise _TooLarge(node.name, nbytes)
            return out

    try:
        with quiet(), FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
            Sizes(gm).run(*(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs))
    except _TooLarge as big:
        raise error(f"{what}: node {big.node!r} would need {human(big.nbytes, 'B')} of memory; this machine has "
                    f"{human(limit, 'B')} available") from None
    except Exception:
        return
