"""torch.distributed as graphopt's data-consuming steps use it when launched under torchrun.

Every function here does nothing, at the cost of one check, when torch.distributed is not
initialised and the process was not started by a multi-process launcher: one process behaves
and costs as it always has. Under ``torchrun --nproc_per_node=N`` (or ``--nnodes``/``--rdzv_*``
across machines) the default process group is initialised on first use with torch's choice of
backend (NCCL for CUDA tensors where present, gloo on CPU), unless the script did it already.

- ``rank``, ``world_size``, ``is_main``; ``main_process_only`` for whatever writes files.
- ``all_reduce``, ``all_gather_object``, ``broadcast_object``: collectives that return their
  result (and return their input unchanged in one process).
- ``shard``: a pass's data as this rank reads it. A DataLoader without a DistributedSampler gets
  one; a DataLoader with one, and data wrapped in ``sharded(...)`` (already split per rank by its
  owner), are read as given; any other iterable is shared by batches (rank r takes batches r,
  r+N, ...) and graphopt says so once. ``rank_share`` splits a budget of batches.
- ``agree``: a batch stream that stops as soon as any rank's stream ends (equal steps for DDP).
- ``map_shared``: a list of independent trials, each rank computing a share, results gathered.
- ``local``: a block in which graphopt runs as one process (a trial built on one rank, or
  graphopt called by one rank of a job that set up torch.distributed for its own purposes).
- ``check_same``: a checksum of the graph's code, parameters and buffers, all-reduced; a rank
  whose graph differs from the others' is an error naming the step.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import hashlib
import itertools
import os
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from graphopt.errors import GraphoptError

T = TypeVar("T")

_local_depth = 0          # > 0 inside ``local()``: every helper acts as in one process
_initialised_here = False
_said: set[str] = set()


class DistributedError(GraphoptError):
    """Ranks disagree where they must not: a graph that differs between ranks after a pass."""


class ShardingWarning(UserWarning):
    """graphopt split a pass's data across ranks itself (said once per kind of data)."""


# -- who am I ----------------------------------------------------------------------------------
def _launched() -> bool:
    """Started by torchrun (or another launcher setting torch's env:// variables) with N > 1."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return False
    return size > 1 and "MASTER_ADDR" in os.environ and "RANK" in os.environ


def init() -> bool:
    """Initialise the default process group from torchrun's environment if it is not already;
    True when this process is one of several. Called on first use by every helper."""
    global _initialised_here
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if not _launched():
        return False
    dist.init_process_group(backend=None)   # torch's choice: gloo for CPU tensors, NCCL for CUDA ones
    _initialised_here = True
    atexit.register(_shutdown)
    return dist.get_world_size() > 1


def _shutdown() -> None:
    if _initialised_here and dist.is_available() and dist.is_initialized():
        finish()


def finish() -> None:
    """Leave the process group once every rank is done: a rank that tears its connections down
    while another is still inside a collective makes that one abort (gloo: std::terminate). A
    rank that never arrives (it failed) is waited for a minute on gloo, then left."""
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        else:
            dist.barrier()
    except Exception:   # another rank failed: leave anyway, its own error is the one reported
        pass
    dist.destroy_process_group()


def active() -> bool:
    """True when this process is one of several ranks (and not inside ``local()``)."""
    return _local_depth == 0 and init()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def main_process_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorator: ``fn`` runs on rank 0 only (it writes files or prints the report); other
    ranks get None. In one process it simply runs."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        return fn(*args, **kwargs) if is_main() else None
    return wrapper


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Inside this block graphopt runs as one process: no collectives, no sharding, every rank on
    its own (a search trial or a sensitivity trial built by one rank)."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


# -- collectives --------------------------------------------------------------------------------
_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


def _device() -> torch.device:
    """Where collective tensors live: CPU when the group has gloo, else the current CUDA device."""
    backend = str(dist.get_backend()).lower()
    if "gloo" in backend or "nccl" not in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``tensor`` reduced over every rank (``op``: sum, min or max), as a new tensor on its device;
    in one process, ``tensor`` itself."""
    if not active():
        return tensor
    work = tensor.detach().to(_device(), copy=True).contiguous()
    dist.all_reduce(work, op=getattr(dist.ReduceOp, _OPS[op]))
    return work.to(tensor.device)


def all_reduce_many(tensors: Sequence[torch.Tensor], op: str = "sum") -> list[torch.Tensor]:
    """Several tensors reduced together: one collective per dtype (flattened and concatenated)."""
    if not active() or not tensors:
        return list(tensors)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        picked = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = all_reduce(torch.cat([tensors[i].detach().reshape(-1) for i in picked]), op)
        start = 0
        for i in picked:
            out[i] = flat[start:start + tensors[i].numel()].view_as(tensors[i])
            start += tensors[i].numel()
    return out


def all_true(flag: bool) -> bool:
    """True when ``flag`` is true on every rank."""
    if not active():
        return flag
    return bool(all_reduce(torch.tensor([1 if flag else 0], dtype=torch.int64), "min").item())


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Make ``module``'s buffers rank ``src``'s (BatchNorm running statistics after DDP training,
    which each rank last updated from its own batch)."""
    if not active():
        return
    for buffer in module.buffers():
        work = buffer.detach().to(_device(), copy=True)
        dist.broadcast(work, src=src)
        buffer.data.copy_(work.to(buffer.device))


# -- data -----------------------------------------------------------------------------------------
class Sharded:
    """Data its owner already split per rank (each rank's own loader or generator): graphopt reads
    it as given. Wraps a callable (returning an iterable of batches) or an iterable."""

    def __init__(self, data: Any):
        self.data = data.data if isinstance(data, Sharded) else data

    def __call__(self) -> Iterable:
        return self.data() if callable(self.data) else self.data

    def __iter__(self) -> Iterator:
        return iter(self())


def sharded(data: Any) -> Sharded:
    """Mark ``data`` as already split per rank, so no pass splits it again."""
    return Sharded(data)


class _Strided:
    """Batches ``rank``, ``rank + n``, ``rank + 2n``, ... of an iterable."""

    def __init__(self, batches: Iterable, rank_: int, size: int):
        self.batches, self.rank, self.size = batches, rank_, size

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.batches), self.rank, None, self.size)


class _SizedStrided(_Strided):
    def __len__(self) -> int:
        return len(range(self.rank, len(self.batches), self.size))


class _ShardedCall:
    """A data callable whose every result is sharded."""

    def __init__(self, fn: Callable, what: str):
        self.fn, self.what = fn, what

    def __call__(self) -> Iterable:
        return _shard_iterable(self.fn(), self.what)


@functools.lru_cache(maxsize=1)
def _epoch_sampler_class():
    from torch.utils.data import DistributedSampler

    class EpochSampler(DistributedSampler):
        """A DistributedSampler that moves to the next epoch each time it is iterated, as a
        RandomSampler draws a new order each time (every rank iterates it equally often)."""

        def __iter__(self):
            iterator = super().__iter__()
            self.set_epoch(self.epoch + 1)
            return iterator

    return EpochSampler


def _say(message: str) -> None:
    if message not in _said:
        _said.add(message)
        if is_main():
            warnings.warn(message, ShardingWarning, stacklevel=4)


def _kind(data: Any) -> str:
    return type(data).__name__


def _reshard_loader(loader: Any) -> Any | None:
    """``loader`` rebuilt with a DistributedSampler for this rank, or None where it cannot be
    (an IterableDataset, a custom batch sampler)."""
    from torch.utils.data import BatchSampler, IterableDataset, RandomSampler

    if loader.batch_size is None or isinstance(loader.dataset, IterableDataset) \
            or type(loader.batch_sampler) is not BatchSampler:
        return None
    sampler = _epoch_sampler_class()(loader.dataset, num_replicas=world_size(), rank=rank(),
                                     shuffle=isinstance(loader.sampler, RandomSampler), seed=0, drop_last=False)
    workers = loader.num_workers
    return type(loader)(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                        multiprocessing_context=loader.multiprocessing_context if workers else None,
                        generator=loader.generator, prefetch_factor=loader.prefetch_factor if workers else None,
                        persistent_workers=loader.persistent_workers)


def _is_sharded_loader(data: Any) -> bool:
    from torch.utils.data import DataLoader, DistributedSampler

    if not isinstance(data, DataLoader):
        return False
    samplers = (data.sampler, getattr(data.batch_sampler, "sampler", None))
    return any(isinstance(s, DistributedSampler) for s in samplers)


def _shard_iterable(batches: Any, what: str) -> Any:
    from torch.utils.data import DataLoader

    if isinstance(batches, Sharded) or _is_sharded_loader(batches):
        return batches
    size = world_size()
    if isinstance(batches, DataLoader):
        rebuilt = _reshard_loader(batches)
        if rebuilt is not None:
            _say(f"{what}: the DataLoader has no DistributedSampler; graphopt gives it one for {size} ranks "
                 f"(each rank reads 1/{size} of the dataset)")
            return rebuilt
    _say(f"{what}: a {_kind(batches)} is not sharded across {size} ranks; each rank takes 1 batch in {size} "
         f"(rank r: batches r, r+{size}, r+{2 * size}, ...). Give a DataLoader (graphopt adds a DistributedSampler), "
         f"or wrap data already split per rank in graphopt.distributed.sharded(...)")
    return (_SizedStrided if hasattr(batches, "__len__") else _Strided)(batches, rank(), size)


def shard(data: Any, what: str = "data") -> Any:
    """``data`` (an iterable of batches, or a callable returning one) as this rank reads it. In
    one process, ``data`` itself. ``what`` names the data in the one message said when graphopt
    splits it itself."""
    if data is None or not active() or isinstance(data, Sharded):
        return data
    from torch.utils.data import DataLoader

    if callable(data) and not isinstance(data, DataLoader):
        return _ShardedCall(data, what)
    if not isinstance(data, Iterable):
        return data   # the caller's own check names what is wrong with it
    return _shard_iterable(data, what)


def set_epoch(loader: Any, epoch: int) -> None:
    """Tell a user's DistributedSampler which epoch starts, so each epoch has a new order
    (samplers graphopt added count their epochs themselves). Nothing in one process."""
    if not active():
        return
    from torch.utils.data import DistributedSampler

    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler) and not isinstance(sampler, _epoch_sampler_class()):
        sampler.set_epoch(epoch)


def rank_share(count: int | None) -> int | None:
    """How many of the first ``count`` batches (summed over ranks) this rank reads: those whose
    index is this rank's modulo the world size. None stays None (no limit)."""
    if count is None or not active():
        return count
    return len(range(rank(), count, world_size()))


def steps_share(count: int | None) -> int | None:
    """Training steps each rank takes for a budget of ``count`` batches summed over ranks (every
    rank must take the same number): ``count / N`` rounded up."""
    if count is None or not active():
        return count
    return -(-count // world_size())


def agree(batches: Iterable[T]) -> Iterator[T]:
    """``batches`` while every rank still has one: the stream ends for all when it ends for any
    (DDP needs every rank to take the same steps). One small all-reduce per batch; in one
    process, ``batches`` unchanged."""
    if not active():
        yield from batches
        return
    end = object()
    iterator = iter(batches)
    while True:
        batch = next(iterator, end)
        if not all_true(batch is not end):
            return
        yield batch


def agree_count(count: int | None) -> int | None:
    """The smallest of every rank's ``count``; None when any rank's is None (unknown)."""
    if not active():
        return count
    counts = all_reduce(torch.tensor([-1 if count is None else count], dtype=torch.int64), "min").item()
    return None if counts < 0 else int(counts)


# -- trials ---------------------------------------------------------------------------------------
def map_shared(fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
    """``[fn(x) for x in items]``, each rank computing the items whose index is its own modulo the
    world size (inside ``local()``: each trial is one process's work), the results gathered in
    order on every rank. ``fn`` returns picklable values; it should catch the errors it expects
    (an error escaping on one rank stops that rank, and torchrun stops the others)."""
    items = list(items)
    if not active():
        return [fn(x) for x in items]
    size, me = world_size(), rank()
    mine = {}
    with local():
        for index in range(me, len(items), size):
            mine[index] = fn(items[index])
    merged: dict[int, T] = {}
    for part in all_gather_object(mine):
        merged.update(part)
    return [merged[i] for i in range(len(items))]


# -- every rank the same graph --------------------------------------------------------------------
def checksum(module: torch.nn.Module) -> int:
    """A 56-bit digest of a module's code (for a GraphModule) and every parameter and buffer, bit for bit."""
    digest = hashlib.sha256(getattr(module, "code", "").encode())
    named = itertools.chain(module.named_parameters(remove_duplicate=False),
                            module.named_buffers(remove_duplicate=False))
    for name, tensor in sorted(named, key=lambda item: item[0]):
        digest.update(name.encode())
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(str(data.dtype).encode())
        if data.is_quantized:
            data = data.int_repr().reshape(-1)
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return int.from_bytes(digest.digest()[:7], "big")


def check_same(module: torch.nn.Module, where: str) -> None:
    """Raise DistributedError on every rank if ``module`` is not bit-identical on all ranks."""
    if not active():
        return
    mine = checksum(module)
    both = all_reduce(torch.tensor([mine, -mine], dtype=torch.int64), "max")
    if both[0].item() == -both[1].item():
        return
    sums = all_gather_object(mine)
    odd = [r for r, s in enumerate(sums) if s != sums[0]]
    raise DistributedError(f"{where}: the graph differs between ranks after it (checksums of code, parameters "
                           f"and buffers: rank 0 {sums[0]:014x}; rank{'s' if len(odd) > 1 else ''} "
                           f"{', '.join(map(str, odd))} differ); every rank must end a data-consuming step with "
                           f"the same graph")
