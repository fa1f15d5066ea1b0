"""Merging single tensors: `merge_tensor` (models against a base) and `merge_deltas` (the swarm's).

Both resolve the method and its parameters first (so bad input fails before any math), then
stack the inputs in float32 (float64 inputs stay float64) and call the registered function.
Random methods get a `torch.Generator` seeded from `(seed, tensor name)`, so a tensor's
result does not depend on the order in which tensors are merged.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from p2pmodel.errors import UsageError
from p2pmodel.merge.registry import MergeError, MergeMethod, get_method
from p2pmodel.merge.workspace import buffer

__all__ = [
    "BaseRequired",
    "ShapeMismatch",
    "DtypeMismatch",
    "UnmergeableTensor",
    "merge_tensor",
    "merge_deltas",
    "prepare",
    "apply",
    "merge_one",
    "tensor_generator",
    "work_dtype",
]


class BaseRequired(MergeError, UsageError):
    """The method merges task vectors against a base model, and none was given."""

    def __init__(self, method: str):
        self.method = method
        super().__init__(f"merge method {method!r} needs a base model (--base)")


class ShapeMismatch(MergeError):
    """The inputs disagree on the shape of a tensor."""

    def __init__(self, tensor: str, shapes: dict[str, tuple[int, ...]]):
        self.tensor, self.shapes = tensor, shapes
        found = ", ".join(f"{m}: {list(s)}" for m, s in shapes.items())
        super().__init__(f"tensor {tensor!r} has different shapes in the inputs ({found})")


class DtypeMismatch(MergeError):
    """The inputs disagree on the dtype of a tensor."""

    def __init__(self, tensor: str, dtypes: dict[str, str]):
        self.tensor, self.dtypes = tensor, dtypes
        found = ", ".join(f"{m}: {d}" for m, d in dtypes.items())
        super().__init__(f"tensor {tensor!r} has different dtypes in the inputs ({found})")


class UnmergeableTensor(MergeError):
    """A tensor that no method can merge (an integer tensor whose values differ)."""

    def __init__(self, tensor: str, reason: str):
        self.tensor, self.reason = tensor, reason
        super().__init__(f"tensor {tensor!r} cannot be merged: {reason}")


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from `sha256(f"{seed}:{name}")`: one stream per tensor."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merges compute in: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def prepare(
    method: str, n_inputs: int, weights: Sequence[float] | float | None, params: dict[str, Any]
) -> tuple[MergeMethod, dict[str, Any]]:
    """Resolve `method` and its parameters for `n_inputs` stacked inputs.

    Raises:
        UnknownMethod, ModelCountError, MergeParameterError: see `registry`.
    """
    m = get_method(method)
    params = dict(params)
    if "lambda" in params:  # mergekit's name; a Python keyword, hence `lambda_` in signatures
        params["lambda_"] = params.pop("lambda")
    if weights is not None:
        params["weights"] = list(weights) if isinstance(weights, (list, tuple)) else weights
    return m, m.resolve(n_inputs, params)


def apply(m: MergeMethod, kwargs: dict[str, Any], stacked: Tensor, *, seed: int = 0, name: str = "",
          generator: torch.Generator | None = None) -> Tensor:
    """Call the method on `stacked` (shape `(n, *shape)`) with resolved `kwargs`. Random methods
    draw from `generator`, else from a fresh `tensor_generator(seed, name)`."""
    if m.random:
        kwargs = {**kwargs, "generator": generator or tensor_generator(seed, name)}
    return m.func(stacked, **kwargs)


def _check_same(tensors: Sequence[Tensor], labels: Sequence[str], name: str) -> None:
    if len({tuple(t.shape) for t in tensors}) > 1:
        raise ShapeMismatch(name, {lab: tuple(t.shape) for lab, t in zip(labels, tensors)})
    if len({t.dtype for t in tensors}) > 1:
        raise DtypeMismatch(name, {lab: str(t.dtype).removeprefix("torch.") for lab, t in zip(labels, tensors)})
    if not tensors[0].is_floating_point():
        raise UnmergeableTensor(name, f"dtype {tensors[0].dtype} is not floating point")


def merge_tensor(
    method: str,
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weights: Sequence[float] | float | None = None,
    seed: int = 0,
    name: str = "",
    **params: Any,
) -> Tensor:
    """Merge one tensor of several models, as `merge_checkpoints` does for each tensor.

    Args:
        method: a name in `METHODS`.
        tensors: the models' tensors (same shape and dtype).
        base: the base model's tensor; task-vector methods merge `tensors[i] - base` and add
            `base` back; for linear and slerp the base is the first input.
        weights: one per model, or one for all (default 1.0 each).
        seed, name: seed the generator of random methods (DARE) for this tensor.
        params: the method's other parameters (see `METHODS[method].params`).

    Returns:
        The merged tensor, in the inputs' dtype.

    Raises:
        UnknownMethod, ModelCountError, MergeParameterError, BaseRequired, ShapeMismatch,
        DtypeMismatch, UnmergeableTensor.
    """
    m = get_method(method)
    inputs = list(tensors)
    if m.base == "input" and base is not None:
        inputs.insert(0, base)
    if m.base == "required" and base is None:
        raise BaseRequired(method)
    m, kwargs = prepare(method, len(inputs), weights, params)
    labels = [f"input {i}" for i in range(len(inputs))]
    if base is not None and m.base != "input":
        inputs, labels = [base, *inputs], ["base", *labels]
    _check_same(inputs, labels, name or "tensor")
    if base is not None and m.base != "input":
        return merge_one(m, kwargs, inputs[1:], inputs[0], seed=seed, name=name)
    return merge_one(m, kwargs, inputs, None, seed=seed, name=name)


def merge_one(
    m: MergeMethod,
    kwargs: dict[str, Any],
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    seed: int = 0,
    name: str = "",
    transform: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
    mapped: bool = False,
) -> Tensor:
    """Merge already-validated tensors with resolved `kwargs`; returns the inputs' dtype.

    `base` is subtracted before and added after a task-vector method (pass None for linear
    and slerp, whose base is one of `tensors`). `transform` maps the stacked task vectors
    before the method sees them (the engine's whole-model TIES trim). `generator`, when given,
    is the stream random methods draw from (and advance), instead of one seeded per tensor.
    `mapped`: `tensors` and `base` lie in file mappings nobody writes to (the engine's own
    readers), whose pages may be handed back to the page cache as the merge goes (`pages.py`).
    """
    if m.random and generator is None:
        generator = tensor_generator(seed, name)
    out_dtype = tensors[0].dtype
    wd = work_dtype(out_dtype)
    if base is not None and transform is None:
        from p2pmodel.merge.gta import fused_merge

        fused = fused_merge(m.name, kwargs, tensors, base, generator, mapped)
        if fused is not None:
            return fused.to(out_dtype)
    if base is None:
        stacked = torch.stack([t.detach().to("cpu", wd) for t in tensors])  # (n, *shape)
        if transform is not None:
            stacked = transform(stacked)
        return apply(m, kwargs, stacked, generator=generator).to(out_dtype)
    b = base.detach().to("cpu", wd)
    deltas = buffer("deltas", (len(tensors), *b.shape), wd)  # (n, *shape): the task vectors
    for i, t in enumerate(tensors):
        # one pass per model, the same float op as stacking and then subtracting
        torch.sub(t.detach().to("cpu", wd), b, out=deltas[i])
    if transform is not None:
        deltas = transform(deltas)
    return (b + apply(m, kwargs, deltas, generator=generator)).to(out_dtype)


def merge_deltas(
    method: str,
    deltas: Sequence[Tensor],
    *,
    weights: Sequence[float] | float | None = None,
    seed: int = 0,
    name: str = "",
    **params: Any,
) -> Tensor:
    """Merge task vectors directly (the swarm's entry point); the result is a merged delta.

    Deterministic: computed in float32 on CPU, random methods seeded from `(seed, name)`.

    Raises:
        UnknownMethod, ModelCountError, MergeParameterError, ShapeMismatch, UnmergeableTensor.
    """
    m, kwargs = prepare(method, len(deltas), weights, params)
    labels = [f"delta {i}" for i in range(len(deltas))]
    cpu = [d.detach().to("cpu", torch.float32) if d.is_floating_point() else d for d in deltas]
    _check_same(cpu, labels, name or "delta")
    return apply(m, kwargs, torch.stack(cpu), seed=seed, name=name).to(torch.float32)
