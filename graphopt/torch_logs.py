"""Quieting torch's own error logs where graphopt reports the failure itself.

Tracing falls back to torch.export, and checking a graph's sizes runs it on fake tensors;
when either fails, torch logs a full traceback to stderr before raising, although graphopt
turns the exception into one line naming the model part and the reason.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

FAKE_TENSOR_LOGGER = "torch._subclasses.fake_tensor"


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """Within the block, the named loggers (default: fake tensors') report only critical records."""
    loggers = [logging.getLogger(n) for n in names or (FAKE_TENSOR_LOGGER,)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
