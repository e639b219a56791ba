"""Decoding a packed file's tensors on a thread pool while its module is built and run.

A pool of ``torch.get_num_threads()`` threads starts decoding the tensors in file order
(zstandard and most numpy work release the GIL) while the module is built with shape-only
(meta device) tensors, so the module exists before its weights do. A tensor is put in the module
the first time something needs it: a forward pre-hook on each called submodule waits for
that submodule's tensors only, so the first layers run while later ones still decode.
Nothing ever computes with a placeholder: until installed, a tensor is on the meta device,
where arithmetic with real tensors raises.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch
import torch.nn as nn

from graphopt.backends.packed_errors import CorruptFile, PackedFormatError


class PendingModule:
    """A GraphModule whose tensors are still being decoded (see the module docstring).

    ``module`` can be called at once; ``wait()`` returns it with every tensor in place (its
    ``state_dict()`` holds meta tensors until then); ``done()`` says whether decoding ended."""

    def __init__(self, module: torch.fx.GraphModule, futures: dict[str, Future], is_param: dict[str, bool],
                 path: str):
        self.module, self.path = module, path
        self._futures, self._is_param = dict(futures), is_param
        self._lock = threading.Lock()
        self._hooks = []
        needed_by_root = [n for n in futures if "." not in n]
        for node in module.graph.nodes:
            if node.op == "get_attr":
                needed_by_root += _under(futures, node.target)
            elif node.op == "call_module":
                self._hook(module.get_submodule(node.target), _under(futures, node.target))
        self._hook(module, needed_by_root)

    def _hook(self, target: nn.Module, names: list[str]) -> None:
        if not names:
            return
        handle = None

        def install_first(_module: nn.Module, _args: tuple) -> None:
            self._install(names)
            handle.remove()  # torch iterates over a copy of the hooks: removing here is safe

        handle = target.register_forward_pre_hook(install_first)
        self._hooks.append(handle)

    def _install(self, names: list[str]) -> None:
        with self._lock:
            for name in names:
                future = self._futures.get(name)
                if future is None:
                    continue  # installed already
                try:
                    tensor = future.result()
                except PackedFormatError:
                    raise
                except Exception as exc:
                    raise CorruptFile(f"{self.path}: tensor {name!r}: malformed contents: "
                                      f"{type(exc).__name__}: {exc}") from exc
                _put(self.module, name, tensor, self._is_param[name])
                del self._futures[name]

    def done(self) -> bool:
        """True once every tensor is decoded (installed or not)."""
        return all(f.done() for f in list(self._futures.values()))

    def wait(self) -> torch.fx.GraphModule:
        """The module with all its tensors (raises CorruptFile if one does not decode)."""
        self._install(list(self._futures))
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        return self.module


def start_decoding(builders: dict[str, Callable[[], torch.Tensor]], threads: int) -> dict[str, Future]:
    """Each builder queued on a new pool of ``threads`` threads, in order; the pool's threads
    end after the last one (``cancel`` the futures to drop the rest)."""
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="graphopt-packed")
    futures = {name: pool.submit(build) for name, build in builders.items()}
    pool.shutdown(wait=False)
    return futures


def _under(names: dict, prefix: str) -> list[str]:
    return [n for n in names if n == prefix or n.startswith(prefix + ".")]


def _put(module: nn.Module, name: str, tensor: torch.Tensor, is_param: bool) -> None:
    """Replace the placeholder ``name`` (a parameter or buffer) of ``module``; tensors of
    submodules the graph never uses are not in the GraphModule and are dropped, as fx does."""
    owner_path, _, attr = name.rpartition(".")
    try:
        owner = module.get_submodule(owner_path) if owner_path else module
    except AttributeError:
        return
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=is_param and tensor.is_floating_point())
    elif attr in owner._buffers:
        owner._buffers[attr] = tensor
