"""Where a graph runs: the device (and dtype) its weights live on, moving batches there, the
rule for comparing outputs on a device, and mixed precision for the training loops.

A graph runs where the traced model's weights are; every pass that runs it moves each batch
there. On CUDA, verification runs with TF32 off (full float32 matmuls and convolutions), so the
same tolerances hold on every device; training is left as the user's torch settings have it.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn

from graphopt.errors import ConfigError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(spec: Any) -> torch.device:
    """``spec`` ("cpu", "cuda", "cuda:1", a torch.device) as a device this process can use; a
    ConfigError names what is wrong (an unknown name, CUDA absent, an index past the last GPU)."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {spec!r} is not a torch device name (e.g. 'cpu', 'cuda', 'cuda:1'): {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r}: CUDA is not available here (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "meta":
        raise ConfigError("device 'meta' holds no values: graphopt needs weights it can run")
    return device


def module_device(module: nn.Module, where: str = "the model") -> torch.device | None:
    """The one device ``module``'s parameters and buffers are on (None when it has none); a model
    spread over several devices, or holding weights without values (meta), is refused."""
    devices: dict[torch.device, str] = {}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        devices.setdefault(tensor.device, name)
    if any(d.type == "meta" for d in devices):
        name = next(n for d, n in devices.items() if d.type == "meta")
        raise ConfigError(f"{where}: {name!r} is on the meta device (no values); load the weights before "
                          f"compressing (e.g. model.to_empty(device=...) then load_state_dict)")
    if len(devices) > 1:
        listed = ", ".join(f"{d} ({n!r})" for d, n in devices.items())
        raise ConfigError(f"{where} is spread over several devices: {listed}; graphopt runs a model on one device "
                          f"(move it with model.to(device))")
    return next(iter(devices), None)


def inputs_device(inputs: Any) -> torch.device | None:
    """The device of the first tensor in ``inputs`` (nested tuples, lists and dicts)."""
    for value in _leaves(inputs):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def float_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of the first floating-point parameter or buffer (None when there is none)."""
    return next((t.dtype for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()), None)


def to_device(value: Any, device: torch.device | None) -> Any:
    """``value`` with every tensor in it (nested tuples, lists, dicts) on ``device``; tensors
    already there are returned as they are (no copy)."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, tuple) and hasattr(value, "_fields"):   # a namedtuple
        return type(value)(*(to_device(v, device) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    else:
        yield value


@contextlib.contextmanager
def exact_math(device: torch.device | None) -> Iterator[None]:
    """Full float32 matmuls and convolutions while verifying on CUDA (TF32 off), restored after;
    a no-op elsewhere."""
    if device is None or device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        torch.set_float32_matmul_precision(precision)


def autocast(device: torch.device | None, amp: str | None) -> contextlib.AbstractContextManager:
    """Mixed precision for a training step (``amp``: None, "bf16" or "fp16"); fp16 is for CUDA
    (on the CPU, bf16 is the half type torch's kernels serve)."""
    if amp is None:
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ConfigError(f"amp must be one of {', '.join(AMP_DTYPES)} (or unset), got {amp!r}")
    kind = (device or torch.device("cpu")).type
    if amp == "fp16" and kind != "cuda":
        raise ConfigError(f"amp='fp16' needs a CUDA device (this graph runs on {kind}); use amp='bf16'")
    return torch.autocast(kind, dtype=AMP_DTYPES[amp])


def grad_scaler(device: torch.device | None, amp: str | None) -> torch.amp.GradScaler | None:
    """The loss scaler fp16 training needs (None otherwise: bf16 and float32 keep float32's range)."""
    if amp != "fp16":
        return None
    return torch.amp.GradScaler((device or torch.device("cpu")).type)
