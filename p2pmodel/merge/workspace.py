"""Scratch buffers reused from one tensor to the next while a checkpoint merge streams.

Why: a fresh buffer of a few MB costs a page fault per 4 KiB page the first time it is written
(about as much as a pass over it: measured 1.6 ns an entry for a subtraction into new memory
against 0.6 into reused memory), and the kernel returns large allocations to the system when
they are freed. `merge_checkpoints` runs inside `reuse_buffers()`; code that wants scratch space
asks `buffer(name, shape, dtype)`, which hands out the same memory again for the same name
(grown when a larger tensor needs it) inside that block and a new tensor outside it, so
single-tensor callers (`merge_tensor`, `merge_deltas`, the swarm) keep nothing alive.

A buffer is valid until the next `buffer()` call with the same name: never return one.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch

__all__ = ["buffer", "reuse_buffers"]

_active: ContextVar[dict[str, torch.Tensor] | None] = ContextVar("p2pmodel_merge_workspace", default=None)


@contextmanager
def reuse_buffers() -> Iterator[None]:
    """Within this block, `buffer()` reuses memory by name; it is all released at the end."""
    token = _active.set({})
    try:
        yield
    finally:
        _active.reset(token)


def buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor of `shape` and `dtype` (see module doc)."""
    pool = _active.get()
    if pool is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    held = pool.get(name)
    if held is None or held.numel() < nbytes:
        held = pool[name] = torch.empty(nbytes, dtype=torch.uint8)
    return held[:nbytes].view(dtype).view(shape)
