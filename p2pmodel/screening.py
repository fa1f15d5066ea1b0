"""Which of a round's deltas the merge leaves out: a pure function of the listed deltas.

A delta that passed the wire checks (decoded, finite, norm not absurd) can still be a lie: a
sign-flipped update, noise of an honest norm, an empty delta announced with samples. The merge
screens them out by comparing each delta with the *coordinate-wise median of the other deltas*,
a reference that fewer than half of the deltas cannot move far (a mean is dragged by one liar
x100), and that the delta itself cannot pull its own way:

- its L2 norm must be non-zero and at most `max_norm_ratio` x the median norm;
- its cosine with that reference must not be low: under `min_cosine` *and* under
  `relative_cosine` x the round's median cosine (honest deltas point the way the others do; a
  flipped one points away, noise is orthogonal).

Why the others' median and a floor relative to the round (2026-12-02; before, the reference
was the median of all deltas and the floor a fixed 0.3): how well honest deltas agree falls as
an event trains (the shared signal shrinks against each peer's own noise) and depends on the
codec. `scripts/screen_study` (6 peers) measured honest cosines falling from 0.85 to 0.45 over
20 rounds of the default event and from 0.65 to 0.10 with top-k 5% deltas, so a fixed floor left
out honest deltas, each exclusion an offence (protocols/round.py): a 6-node swarm ended up
merging 2-3 deltas of 6. With itself in the median, noise reached cosines of 0.20, inside the
honest range late in an event; against the others it stays near 0.
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

__all__ = ["DeltaScreen", "ScreenResult", "others_median", "screen_deltas"]


@dataclass(frozen=True)
class DeltaScreen:
    """The event's screening rule (part of the event's identity: every peer must apply the same)."""

    # Chosen by measurement (bench task, default 2-bit codec, 3/4/8 peers, H 10-50, rounds 0-5;
    # docs/ARCHITECTURE.md "Screening"): honest deltas have cosine 0.64-0.93 with the median
    # delta, sign-flipped ones -0.28 to -0.84, noise of an honest norm 0.05-0.29.
    min_cosine: float = 0.3  # a cosine at or above this always passes ...
    relative_cosine: float = 0.5  # ... below it, a delta is left out under this x the round's median cosine (0: the fixed floor alone)
    max_norm_ratio: float = 4.0
    min_deltas: int = 3

    def cosine_floor(self, cosines: Sequence[float]) -> float:
        """The cosine under which a delta of the round is left out (the median cosine is an
        honest delta's: the screen assumes an honest majority)."""
        if self.relative_cosine <= 0:
            return self.min_cosine
        return min(self.min_cosine, self.relative_cosine * statistics.median(cosines))


@dataclass(frozen=True)
class ScreenResult:
    """Indices of the deltas kept, and (index, reason) of those left out."""

    kept: tuple[int, ...]
    excluded: tuple[tuple[int, str], ...]
    cosines: tuple[float, ...]
    norms: tuple[float, ...]


def others_median(stacked: torch.Tensor) -> torch.Tensor:
    """Row i: the coordinate-wise median of every row of `stacked` (n x m, n >= 3) but row i.

    One sort serves all n: removing the element of rank r from a sorted column leaves a middle
    that is one of three known pairs of the full column's middle elements. Ties give the same
    value whichever tied copy is removed, so the result depends on the values alone."""
    n = stacked.shape[0]
    s, order = stacked.sort(dim=0, stable=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(n).unsqueeze(1).expand_as(order))
    m = n // 2
    if n % 2 == 0:  # n - 1 left, odd: one middle element
        return torch.where(rank <= m - 1, s[m], s[m - 1])
    low, mid, high = (s[m] + s[m + 1]) / 2, (s[m - 1] + s[m + 1]) / 2, (s[m - 1] + s[m]) / 2  # n - 1 even: two
    return torch.where(rank < m, low, torch.where(rank == m, mid, high))


def screen_deltas(deltas: Sequence[Mapping[str, torch.Tensor]], rule: DeltaScreen) -> ScreenResult:
    """Screen `deltas` (decoded, same tensor names; a missing tensor is zero): each against the
    median of the others."""
    n = len(deltas)
    names = sorted({name for d in deltas for name in d})
    sq = [0.0] * n
    dots = [0.0] * n
    ref_sq = [0.0] * n
    for name in names:
        like = next(d[name] for d in deltas if name in d)
        parts = [(d[name] if name in d else torch.zeros_like(like)).to(torch.float32).reshape(-1) for d in deltas]
        stacked = torch.stack(parts)
        if n >= rule.min_deltas:
            # The reference leaves the delta itself out: with it in, a delta pulls the median its
            # own way, and noise showed cosines up to 0.28, the honest range late in an event.
            ref = others_median(stacked).double()
            dots_t = (stacked.double() * ref).sum(dim=1).tolist()
            ref_t = ref.square().sum(dim=1).tolist()
            for i in range(n):
                dots[i] += dots_t[i]
                ref_sq[i] += ref_t[i]
        sq_t = stacked.double().square().sum(dim=1).tolist()
        for i in range(n):
            sq[i] += sq_t[i]
    norms = tuple(math.sqrt(x) for x in sq)
    if n < rule.min_deltas:
        return ScreenResult(tuple(range(n)), (), tuple(math.nan for _ in range(n)), norms)
    cosines = tuple(dots[i] / (norms[i] * math.sqrt(ref_sq[i])) if norms[i] > 0 and ref_sq[i] > 0 else 0.0 for i in range(n))
    med_norm = statistics.median(norms)
    floor = rule.cosine_floor(cosines)
    reasons: dict[int, tuple[float, str]] = {}  # index -> (badness for ordering, reason)
    for i in range(n):
        if norms[i] == 0.0:
            reasons[i] = (math.inf, "empty delta")
        elif norms[i] > rule.max_norm_ratio * med_norm:
            reasons[i] = (norms[i] / med_norm, f"norm {norms[i]:.3g} over {rule.max_norm_ratio:g} x the median {med_norm:.3g}")
        elif cosines[i] < floor:
            reasons[i] = (1.0 - cosines[i], f"cosine {cosines[i]:.2f} with the median delta under {floor:.2g}")
    worst = sorted(reasons, key=lambda i: (-reasons[i][0], i))[: (n - 1) // 2]
    excluded = tuple((i, reasons[i][1]) for i in sorted(worst))
    kept = tuple(i for i in range(n) if i not in set(worst))
    return ScreenResult(kept, excluded, cosines, norms)
