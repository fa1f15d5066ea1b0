"""Sparsification of task vectors: TIES' magnitude trim and DARE's random drop.

Follows `mergekit/sparsify.py` (arcee-ai/mergekit):

- `magnitude(d, density)`: keep the `k = int(density * numel)` entries of largest `|d|` in
  this tensor, zero the rest (mergekit's `magnitude`, top-k by `argsort` of `|d|`).
  mergekit asserts `k > 0`; we keep at least one entry instead, so a low density does not
  abort a merge on a tiny tensor (a bias of 4 entries at density 0.2).
  Ties between equal magnitudes at the cut are broken by position (a stable sort's order) so
  every peer keeps the same entries. mergekit's `argsort` is not stable (for tensors beyond
  torch's small-sort size its order among equal values is the sort implementation's), so where
  equal magnitudes straddle the cut it may keep other ones of them than we do.
- `bernoulli(d, density)`: keep each entry independently with probability `density`
  (mergekit's `bernoulli`), drawn from the caller's seeded generator.
- Rescaling of what is kept (`rescale`):
  `"l1"`      — mergekit's current rule (`rescaled_masked_tensor`, `RescaleNorm.l1`):
                multiply by `|d|_1 / |d*m|_1`, so the kept entries have the L1 norm of the
                whole vector; skipped when either norm is below 1e-7;
  `"density"` — the DARE paper's rule (Yu et al. 2023, eq. 2): divide by `density`
                (= `1/(1-p)` for drop rate `p`); mergekit's original implementation;
  `"none"`    — keep the entries as they are.
- `above_threshold(d, thr)`: the TIES paper's trim over the whole model (Yadav et al. 2023,
  §3: "keep the top-k% values ... of each task vector"); the engine finds, for each model,
  the magnitude `thr` of its k-th largest entry over all tensors and keeps `|d| >= thr`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["Rescale", "magnitude", "bernoulli", "above_threshold", "rescale_masked"]

Rescale = Literal["l1", "density", "none"]

_RESCALE_EPS = 1e-7  # mergekit's: below this norm, do not rescale


def rescale_masked(d: Tensor, mask: Tensor, rescale: Rescale, density: float) -> Tensor:
    """`d * mask`, rescaled as `rescale` says (see module doc)."""
    masked = d * mask
    if rescale == "none":
        return masked
    if rescale == "density":
        return masked / density
    before = d.abs().sum()
    after = masked.abs().sum()
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return masked
    return masked * (before / after)


def magnitude(d: Tensor, density: float, rescale: Rescale = "none") -> Tensor:
    """Keep the `int(density * numel)` (at least 1) largest-magnitude entries of `d`."""
    if density >= 1:
        return d
    k = max(1, int(density * d.numel()))
    a = d.abs().reshape(-1).float()  # (numel,)
    # The same set as mergekit's `argsort(descending)[:k]`, found in O(n) with kthvalue: every
    # entry above the k-th largest, then entries equal to it in index order (a stable sort's).
    kth = torch.kthvalue(a, a.numel() - k + 1).values
    above = a > kth
    at = a == kth
    need = k - int(above.sum())
    if int(at.sum()) > need:  # several entries tie at the k-th magnitude: keep the first ones
        at &= at.cumsum(0) <= need
    keep = above | at
    return rescale_masked(d, keep.view(d.shape).to(d.dtype), rescale, density)


def bernoulli(d: Tensor, density: float, generator: torch.Generator, rescale: Rescale = "l1") -> Tensor:
    """Keep each entry of `d` with probability `density` (DARE's random drop)."""
    if density >= 1:
        return d
    mask = torch.bernoulli(torch.full_like(d, density), generator=generator)
    return rescale_masked(d, mask, rescale, density)


def above_threshold(d: Tensor, threshold: float) -> Tensor:
    """Keep the entries with `|d| >= threshold` (TIES trimmed over the whole model)."""
    return d * (d.abs().float() >= threshold).to(d.dtype)
