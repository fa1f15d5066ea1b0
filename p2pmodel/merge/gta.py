"""Generalized task arithmetic: `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`.

One family, as in mergekit (`mergekit/merge_methods/generalized_task_arithmetic.py`,
`GTATask.execute`, registered with per-variant defaults in `mergekit/merge_methods/registry.py`).
With task vectors `d_i = x_i - base` (shape `(n, *shape)`) and weights `w_i`:

1. sparsify each `d_i` (see `sparsify.py`): TIES by magnitude, DARE by a random drop;
2. `wd_i = w_i * d_i`;
3. with sign consensus (TIES, DARE-TIES): `sign* = +1 where sum_i wd_i >= 0 else -1`
   ("sum", mergekit's default and the TIES paper's elect step) or the same on
   `sum_i sign(wd_i)` ("count"); `m_i = (sign(wd_i) == sign*)` (a zero entry never agrees);
   `mixed = sum_i m_i wd_i`, `divisor = sum_i m_i w_i` (set to 1 where it is 0);
   without consensus: `mixed = sum_i wd_i`, `divisor = sum_i w_i` (1 where `|.| < 1e-8`);
4. `mixed /= divisor` when `normalize`; then `mixed *= lambda`;
5. the merged model is `base + mixed` (the engine adds the base; `merge_deltas` does not).

Defaults are mergekit's: density 1.0 (no trimming unless asked), TIES normalises, DARE
does not and rescales what it keeps by L1 norm, task arithmetic does neither.
Weights default to 1.0 per model (mergekit requires them).

Where the papers differ from mergekit, the paper's variant is an option:
`ties(scope="model")` trims each task vector over the whole model instead of per tensor
(Yadav et al. 2023); `dare_*(rescale="density")` rescales by `1/density` (Yu et al. 2023)
instead of matching the L1 norm.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor

from p2pmodel.merge.registry import Check, merge_method
from p2pmodel.merge.sparsify import Rescale, bernoulli, magnitude

__all__ = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "sign_consensus_mask"]

Density = Annotated[list[float], Check(lambda v: 0 < v <= 1, "must be in (0, 1]")]
Consensus = Literal["sum", "count"]


def sign_consensus_mask(weighted: Tensor, method: Consensus = "sum") -> Tensor:
    """Which entries agree with the elected sign (mergekit's `get_mask`). Bool, `(n, *shape)`."""
    sign = weighted.sign()  # (n, *shape)
    votes = weighted.sum(dim=0) if method == "sum" else sign.sum(dim=0)  # (*shape)
    elected = (votes >= 0).to(weighted.dtype).mul_(2).sub_(1)  # ties elect +1, as mergekit
    return sign.eq_(elected).bool()  # in place: `sign` is ours


def _mix(
    deltas: Tensor, weights: list[float], consensus: Consensus | None, normalize: bool, lambda_: float
) -> Tensor:
    w = torch.tensor(weights, dtype=deltas.dtype).view(-1, *([1] * (deltas.dim() - 1)))  # (n, 1, ...)
    weighted = deltas * w  # (n, *shape)
    if consensus is not None:
        mask = sign_consensus_mask(weighted, consensus)  # (n, *shape), bool
        mixed = weighted.mul_(mask).sum(dim=0)  # (*shape); in place: one (n, *shape) copy fewer
        del weighted
        divisor = mask.to(deltas.dtype).mul_(w).sum(dim=0)  # (*shape)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)  # (1, ...)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return mixed


# A scalar default for a per-model (list[float]) parameter is broadcast to every model.


@merge_method(
    "task_arithmetic",
    pretty_name="Task Arithmetic",
    reference_url="https://arxiv.org/abs/2212.04089",
    base="required",
)
def task_arithmetic(
    deltas: Tensor,
    *,
    weights: list[float] = 1.0,  # type: ignore[assignment]
    normalize: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """`sum_i w_i d_i` (divided by `sum_i w_i` if `normalize`), times `lambda`."""
    return _mix(deltas, weights, None, normalize, lambda_)


@merge_method(
    "ties",
    pretty_name="TIES",
    reference_url="https://arxiv.org/abs/2306.01708",
    base="required",
)
def ties(
    deltas: Tensor,
    *,
    weights: list[float] = 1.0,  # type: ignore[assignment]
    density: Density = 1.0,  # type: ignore[assignment]
    normalize: bool = True,
    consensus: Consensus = "sum",
    scope: Literal["tensor", "model"] = "tensor",
    rescale: Rescale = "none",
    lambda_: float = 1.0,
) -> Tensor:
    """Trim each task vector to its `density` largest entries, elect signs, average agreeing ones.

    `scope="tensor"` (mergekit) trims per tensor; `scope="model"` (the paper) trims over the
    whole model, which the checkpoint engine does before calling this (for one tensor on
    its own the two are the same).
    """
    trimmed = torch.empty_like(deltas)  # (n, *shape); filled one model at a time
    for i, (d, p) in enumerate(zip(deltas, density)):
        trimmed[i] = magnitude(d, p, rescale)
    return _mix(trimmed, weights, consensus, normalize, lambda_)


@merge_method(
    "dare_linear",
    pretty_name="Linear DARE",
    reference_url="https://arxiv.org/abs/2311.03099",
    base="required",
)
def dare_linear(
    deltas: Tensor,
    *,
    weights: list[float] = 1.0,  # type: ignore[assignment]
    density: Density = 1.0,  # type: ignore[assignment]
    rescale: Rescale = "l1",
    normalize: bool = False,
    lambda_: float = 1.0,
    generator: torch.Generator,
) -> Tensor:
    """Drop each entry of each task vector with probability `1 - density`, rescale, add up."""
    dropped = torch.empty_like(deltas)  # (n, *shape); filled one model at a time
    for i, (d, p) in enumerate(zip(deltas, density)):
        dropped[i] = bernoulli(d, p, generator, rescale)
    return _mix(dropped, weights, None, normalize, lambda_)


@merge_method(
    "dare_ties",
    pretty_name="DARE TIES",
    reference_url="https://arxiv.org/abs/2311.03099",
    base="required",
)
def dare_ties(
    deltas: Tensor,
    *,
    weights: list[float] = 1.0,  # type: ignore[assignment]
    density: Density = 1.0,  # type: ignore[assignment]
    rescale: Rescale = "l1",
    normalize: bool = False,
    consensus: Consensus = "sum",
    lambda_: float = 1.0,
    generator: torch.Generator,
) -> Tensor:
    """DARE's random drop, then TIES' sign election and disjoint merge."""
    dropped = torch.empty_like(deltas)  # (n, *shape); filled one model at a time
    for i, (d, p) in enumerate(zip(deltas, density)):
        dropped[i] = bernoulli(d, p, generator, rescale)
    return _mix(dropped, weights, consensus, normalize, lambda_)
