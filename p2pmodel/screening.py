"""Which of a round's deltas the merge leaves out: a pure function of the listed deltas.

A delta that passed the wire checks (decoded, finite, norm not absurd) can still be a lie: a
sign-flipped update, noise of an honest norm, an empty delta announced with samples. The merge
screens them out by comparing each delta with the round's *coordinate-wise median* delta, a
reference that fewer than half of the deltas cannot move far (a mean is dragged by one liar x100):

- its L2 norm must be non-zero and at most `max_norm_ratio` x the median norm;
- its cosine with the median delta must be at least `min_cosine` (honest deltas point the same
  way as the median; a flipped one points away, noise is orthogonal).

Every honest peer runs this on the same decoded deltas in the same order, so all derive the
same kept set and the same version id; the excluded peers and the reasons go into the version
(`merge["screened"]`). At most ``(n - 1) // 2`` deltas are excluded (the worst first): the
screen assumes an honest majority among a round's deltas and never lets a minority's view
overrule it. Below `min_deltas` there is no majority to compare with and nothing is screened.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

__all__ = ["DeltaScreen", "ScreenResult", "screen_deltas"]


@dataclass(frozen=True)
class DeltaScreen:
    """The event's screening rule (part of the event's identity: every peer must apply the same)."""

    # Chosen by measurement (bench task, default 2-bit codec, 3/4/8 peers, H 10-50, rounds 0-5;
    # docs/ARCHITECTURE.md "Screening"): honest deltas have cosine 0.64-0.93 with the median
    # delta, sign-flipped ones -0.28 to -0.84, noise of an honest norm 0.05-0.29.
    min_cosine: float = 0.3
    max_norm_ratio: float = 4.0
    min_deltas: int = 3


@dataclass(frozen=True)
class ScreenResult:
    """Indices of the deltas kept, and (index, reason) of those left out."""

    kept: tuple[int, ...]
    excluded: tuple[tuple[int, str], ...]
    cosines: tuple[float, ...]
    norms: tuple[float, ...]


def screen_deltas(deltas: Sequence[Mapping[str, torch.Tensor]], rule: DeltaScreen) -> ScreenResult:
    """Screen `deltas` (decoded, same tensor names; a missing tensor is zero) against their median."""
    n = len(deltas)
    names = sorted({name for d in deltas for name in d})
    sq = [0.0] * n
    dots = [0.0] * n
    ref_sq = 0.0
    for name in names:
        like = next(d[name] for d in deltas if name in d)
        parts = [(d[name] if name in d else torch.zeros_like(like)).to(torch.float32).reshape(-1) for d in deltas]
        stacked = torch.stack(parts)
        if n >= rule.min_deltas:
            # torch.median takes the lower middle for an even count; the mean of both middles is
            # the textbook median and no more expensive.
            s = stacked.sort(dim=0).values
            ref = s[(n - 1) // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
            dots_t = (stacked.double() @ ref.double()).tolist()
            ref_sq += float(ref.double().square().sum())
            for i in range(n):
                dots[i] += dots_t[i]
        sq_t = stacked.double().square().sum(dim=1).tolist()
        for i in range(n):
            sq[i] += sq_t[i]
    norms = tuple(math.sqrt(x) for x in sq)
    if n < rule.min_deltas:
        return ScreenResult(tuple(range(n)), (), tuple(math.nan for _ in range(n)), norms)
    ref_norm = math.sqrt(ref_sq)
    cosines = tuple(dots[i] / (norms[i] * ref_norm) if norms[i] > 0 and ref_norm > 0 else 0.0 for i in range(n))
    med_norm = statistics.median(norms)
    reasons: dict[int, tuple[float, str]] = {}  # index -> (badness for ordering, reason)
    for i in range(n):
        if norms[i] == 0.0:
            reasons[i] = (math.inf, "empty delta")
        elif norms[i] > rule.max_norm_ratio * med_norm:
            reasons[i] = (norms[i] / med_norm, f"norm {norms[i]:.3g} over {rule.max_norm_ratio:g} x the median {med_norm:.3g}")
        elif cosines[i] < rule.min_cosine:
            reasons[i] = (1.0 - cosines[i], f"cosine {cosines[i]:.2f} with the median delta under {rule.min_cosine:g}")
    worst = sorted(reasons, key=lambda i: (-reasons[i][0], i))[: (n - 1) // 2]
    excluded = tuple((i, reasons[i][1]) for i in sorted(worst))
    kept = tuple(i for i in range(n) if i not in set(worst))
    return ScreenResult(kept, excluded, cosines, norms)
