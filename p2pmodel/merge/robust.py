"""The robust family: aggregates of task vectors that a minority of bad inputs cannot drag far.

These operate on deltas `d_i = x_i - base` (or on the raw tensors when there is no base) and
return a merged delta. mergekit has none of them; the formulas are the papers':

- `median` — coordinate-wise median; for an even count, the mean of the two middle values
  (numpy's convention; `torch.median` would return the lower one).
- `trimmed_mean` — coordinate-wise: sort the n values, drop `k` from each end, average the
  rest (Yin et al. 2018, "Byzantine-Robust Distributed Learning", Def. 2). `trim` is a
  fraction of n per side when below 0.5 (`k = floor(trim * n)`), else a count per side.
  The default is one per side: a fractional default such as 0.1 would trim nothing from
  fewer than ten models, which is how a swarm usually starts.
- `centered_clip` — Karimireddy, He & Jaggi 2021, "Learning from History for Byzantine
  Robust Optimization", Alg. 2: starting from a center `v`, repeat `iterations` times
  `v <- v + sum_i w_i (d_i - v) min(1, tau / |d_i - v|) / sum_i w_i`.
  The paper starts from the previous round's aggregate; a one-shot merge has none, so `init`
  picks the coordinate median (robust, the default), zero (no change) or the mean.
  `tau` defaults to the median distance `|d_i - v_0|`, which keeps it scale-free.
  The norm `|.|` is taken per tensor (the engine streams tensors), a finer clip than the
  paper's whole-model norm. Norms are summed in float64 so that peers agree bit for bit.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor

from p2pmodel.merge.registry import Check, MergeParameterError, merge_method

__all__ = ["median", "trimmed_mean", "centered_clip", "coordinate_median"]


def coordinate_median(x: Tensor) -> Tensor:
    """Median over dim 0, averaging the two middle values when the count is even."""
    n = x.shape[0]
    s = x.sort(dim=0).values  # (n, *shape)
    if n % 2:
        return s[n // 2]
    return (s[n // 2 - 1] + s[n // 2]) / 2


@merge_method(
    "median",
    pretty_name="Coordinate-wise median",
    reference_url="https://arxiv.org/abs/1803.01498",
    base="optional",
    coordinatewise=True,
)
def median(deltas: Tensor) -> Tensor:
    """The coordinate-wise median of the task vectors."""
    return coordinate_median(deltas)


def _valid_trim(v: float) -> bool:
    return 0 <= v < 0.5 or (v >= 1 and float(v).is_integer())


@merge_method(
    "trimmed_mean",
    pretty_name="Coordinate-wise trimmed mean",
    reference_url="https://arxiv.org/abs/1803.01498",
    base="optional",
    coordinatewise=True,
)
def trimmed_mean(
    deltas: Tensor,
    *,
    trim: Annotated[float, Check(_valid_trim, "must be a fraction in [0, 0.5) or a whole count >= 1")] = 1,
) -> Tensor:
    """Drop the `trim` largest and smallest values of each coordinate, average the rest."""
    n = deltas.shape[0]
    k = int(trim) if trim >= 1 else int(trim * n)
    if 2 * k >= n:
        raise MergeParameterError("trimmed_mean", "trim", f"trims {k} per side, leaving nothing of {n} models")
    s = deltas.sort(dim=0).values  # (n, *shape)
    return s[k : n - k].mean(dim=0)


@merge_method(
    "centered_clip",
    pretty_name="CenteredClip",
    reference_url="https://arxiv.org/abs/2012.10333",
    base="optional",
)
def centered_clip(
    deltas: Tensor,
    *,
    weights: Annotated[list[float], Check(lambda v: v >= 0, "must be >= 0")] = 1.0,  # type: ignore[assignment]
    tau: Annotated[float | None, Check(lambda v: v > 0, "must be > 0")] = None,
    iterations: Annotated[int, Check(lambda v: v >= 1, "must be >= 1")] = 3,
    init: Literal["median", "zero", "mean"] = "median",
) -> Tensor:
    """Iteratively clipped mean around a moving center (see module doc)."""
    if sum(weights) <= 0:
        raise MergeParameterError("centered_clip", "weights", "must not all be zero")
    n = deltas.shape[0]
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()  # (n,)
    if init == "median":
        v = coordinate_median(deltas)  # (*shape)
    elif init == "zero":
        v = torch.zeros_like(deltas[0])
    else:
        v = deltas.mean(dim=0)
    for step in range(iterations):
        diff = deltas - v  # (n, *shape)
        dist = torch.linalg.vector_norm(diff.reshape(n, -1), dim=1, dtype=torch.float64)  # (n,)
        if step == 0 and tau is None:
            tau = float(coordinate_median(dist))
            if tau == 0:
                break  # a majority sits exactly on the center already
        scale = torch.where(dist > tau, tau / dist, torch.ones_like(dist)) * w  # (n,)
        v = v + (diff * scale.to(deltas.dtype).view(-1, *([1] * (deltas.dim() - 1)))).sum(dim=0)
    return v
