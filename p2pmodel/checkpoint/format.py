"""What a checkpoint is on disk: the file names `transformers` uses, refused suffixes, and types.

Shared by reading and writing. Dtype names and sizes are `p2pmodel.dtypes`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Union

import torch

from p2pmodel.dtypes import ITEMSIZE

__all__ = ["INDEX_NAME", "SINGLE_NAME", "PICKLE_SUFFIXES", "TensorSource", "Layout", "OnTensor", "nbytes"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

TensorSource = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]
Layout = Mapping[str, tuple[str, tuple[int, ...]]]
OnTensor = Callable[[str, int], None]  # called with (name, bytes written) after each tensor


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor's data."""
    return math.prod(shape) * ITEMSIZE[dtype]
