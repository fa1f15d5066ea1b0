"""Interpolation of the models' own tensors: `linear` (weighted average) and `slerp`.

Both match mergekit (arcee-ai/mergekit) for the same inputs and parameters:

- `linear` — `mergekit/merge_methods/linear.py` (`LinearMergeTask.execute`):
  `out = sum_i w_i x_i`, divided by `sum_i w_i` when `normalize` (the default).
  mergekit requires a weight per model; here it defaults to 1.0 (a plain mean).
  A base model, when given, is just the first input (mergekit gathers it like any model).
- `slerp` — `mergekit/merge_methods/slerp.py` (`slerp`): with `v0` the base (or first)
  model and `v1` the other, each flattened and normalised by its L2 norm when that exceeds
  1e-8, `dot = <v0/|v0|, v1/|v1|>`; if `|dot| > 0.9995` the vectors are taken as colinear
  and `out = (1-t) v0 + t v1`; else `theta = arccos(dot)` and
  `out = sin((1-t) theta)/sin(theta) v0 + sin(t theta)/sin(theta) v1`.
  mergekit computes in numpy float32; we compute the scalars in float64 (fewer rounding
  steps, and independent of BLAS) and the blend in float32, which agrees to fp32 rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from p2pmodel.merge.registry import MergeParameterError, merge_method

__all__ = ["linear", "slerp"]


@merge_method(
    "linear",
    pretty_name="Linear (weighted average)",
    reference_url="https://arxiv.org/abs/2203.05482",
    base="input",
    coordinatewise=True,
)
def linear(
    tensors: Tensor,
    *,
    weights: list[float] = 1.0,  # type: ignore[assignment]  # broadcast to every model
    normalize: bool = True,
) -> Tensor:
    """Weighted average `sum_i w_i x_i / sum_i w_i` (FedAvg with weights = samples)."""
    if normalize and sum(weights) == 0:
        raise MergeParameterError("linear", "weights", "sum to zero; cannot normalize (use --no-normalize)")
    w = torch.tensor(weights, dtype=tensors.dtype)  # (n,)
    w = w.view(-1, *([1] * (tensors.dim() - 1)))  # (n, 1, ..., 1)
    out = (w * tensors).sum(dim=0)  # (*shape)
    if normalize:
        out = out / w.sum(dim=0)
    return out


_DOT_THRESHOLD = 0.9995  # mergekit's: beyond this the inputs are colinear, fall back to lerp
_EPS = 1e-8  # mergekit's: a vector with a smaller norm is not normalised


@merge_method(
    "slerp",
    pretty_name="SLERP",
    reference_url="https://en.wikipedia.org/wiki/Slerp",
    base="input",
    n_models=2,
)
def slerp(tensors: Tensor, *, t: float) -> Tensor:
    """Spherical interpolation from `tensors[0]` (t=0) to `tensors[1]` (t=1)."""
    v0, v1 = tensors[0], tensors[1]  # (*shape) each
    n0 = torch.linalg.vector_norm(v0, dtype=torch.float64).item()
    n1 = torch.linalg.vector_norm(v1, dtype=torch.float64).item()
    dot = torch.sum(v0.double() * v1.double()).item()
    dot /= (n0 if n0 > _EPS else 1.0) * (n1 if n1 > _EPS else 1.0)
    if abs(dot) > _DOT_THRESHOLD:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    s0 = math.sin(theta - theta * t) / math.sin(theta)
    s1 = math.sin(theta * t) / math.sin(theta)
    return s0 * v0 + s1 * v1
