"""The merge's screen (p2pmodel/screening.py): deltas that point away from the round's median
delta, are empty, or are far larger than the median are left out; an honest majority is kept,
also late in an event, when honest deltas agree less."""

from __future__ import annotations

import torch

from p2pmodel.screening import DeltaScreen, screen_deltas

RULE = DeltaScreen(min_cosine=0.3, max_norm_ratio=4.0)


def honest(n: int, seed: int = 0, spread: float = 0.5) -> list[dict[str, torch.Tensor]]:
    """n deltas sharing a direction, each with its own noise `spread` x the shared part (0.5:
    cosine ~0.8 with each other, as in an event's first rounds; 2.5: ~0.35, as later)."""
    g = torch.Generator().manual_seed(seed)
    common = {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}
    return [{k: v + spread * torch.randn(v.shape, generator=g) for k, v in common.items()} for _ in range(n)]


def noise_like(delta: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * v.norm() / v.numel() ** 0.5 for k, v in delta.items()}


def test_honest_deltas_are_all_kept_with_a_high_cosine():
    r = screen_deltas(honest(4), RULE)
    assert r.kept == (0, 1, 2, 3) and r.excluded == ()
    assert min(r.cosines) > 0.7


def test_a_sign_flipped_delta_is_left_out_with_its_cosine():
    ds = honest(4)
    ds[2] = {k: -10 * v for k, v in ds[2].items()}
    r = screen_deltas(ds, RULE)
    assert r.kept == (0, 1, 3)
    assert [i for i, _ in r.excluded] == [2] and "norm" in r.excluded[0][1]
    ds = honest(4)
    ds[1] = {k: -v for k, v in ds[1].items()}  # same norm, opposite direction
    r = screen_deltas(ds, RULE)
    assert r.kept == (0, 2, 3) and "cosine" in r.excluded[0][1] and r.cosines[1] < 0


def test_noise_of_an_honest_norm_and_an_empty_delta_are_left_out():
    ds = honest(5)
    ds[0] = noise_like(ds[0], seed=9)
    ds[4] = {k: torch.zeros_like(v) for k, v in ds[4].items()}
    r = screen_deltas(ds, RULE)
    assert r.kept == (1, 2, 3)
    reasons = dict(r.excluded)
    assert "cosine" in reasons[0] and reasons[4] == "empty delta"


def test_honest_deltas_that_agree_less_late_in_an_event_are_all_kept():
    ds = honest(6, spread=2.5)
    r = screen_deltas(ds, RULE)
    assert r.excluded == () and max(r.cosines) < 0.45
    fixed = screen_deltas(ds, DeltaScreen(min_cosine=0.3, relative_cosine=0.0))  # the rule before 2026-12-02
    assert fixed.excluded, "a fixed floor of 0.3 left out honest deltas here"


def test_late_in_an_event_a_flipped_delta_and_noise_are_still_left_out():
    for bad in ("flip", "noise"):
        ds = honest(7, spread=2.5)  # the liar's own delta, which it flips or replaces
        ds[6] = {k: -v for k, v in ds[6].items()} if bad == "flip" else noise_like(ds[6], seed=4)
        r = screen_deltas(ds, RULE)
        assert [i for i, _ in r.excluded] == [6], bad
        assert "cosine" in r.excluded[0][1]


def test_a_liars_size_does_not_move_the_reference_of_the_others():
    # each delta is one vote per coordinate (its sign), whatever its size, as in signSGD's vote
    small, big = honest(6), honest(6)
    small[5] = {k: -v for k, v in small[5].items()}
    big[5] = {k: -1000 * v for k, v in big[5].items()}
    a, b = screen_deltas(small, RULE), screen_deltas(big, RULE)
    assert a.cosines[:5] == b.cosines[:5]
    assert [i for i, _ in a.excluded] == [i for i, _ in b.excluded] == [5]


def test_sparse_deltas_that_share_little_support_are_kept_and_a_flip_is_not():
    # top-k deltas: each peer keeps its own 5% of coordinates, so most coordinates are zero in
    # most deltas and a coordinate-wise median is ~0 (the reference used before 2026-12-02)
    g = torch.Generator().manual_seed(1)
    common = torch.randn(20_000, generator=g)

    def topk(x: torch.Tensor) -> dict[str, torch.Tensor]:
        keep = x.abs().topk(1000).indices
        return {"w": torch.zeros_like(x).index_put_((keep,), x[keep])}

    ds = [topk(common + 3 * torch.randn(20_000, generator=g)) for _ in range(7)]
    ds[6] = {"w": -ds[6]["w"]}
    r = screen_deltas(ds, RULE)
    assert [i for i, _ in r.excluded] == [6]
    assert min(r.cosines[:6]) > 0.5 * max(r.cosines[:6]) > 0 > r.cosines[6]


def test_the_cosine_floor_is_a_quarter_of_the_rounds_median_cosine_capped_at_min_cosine():
    assert DeltaScreen().cosine_floor([0.9, 0.8, 0.85]) == 0.25 * 0.85
    assert DeltaScreen().cosine_floor([0.3, 0.4, 0.5, -0.2]) == 0.25 * 0.35
    assert DeltaScreen().cosine_floor([2.0, 2.0, 2.0]) == 0.3
    assert DeltaScreen(relative_cosine=0.0).cosine_floor([0.1, 0.2]) == 0.3


def test_a_tensor_missing_from_a_delta_counts_as_zero():
    ds = honest(3)
    del ds[0]["b"]
    r = screen_deltas(ds, RULE)
    assert r.kept == (0, 1, 2)


def test_never_more_than_a_minority_is_left_out_worst_first():
    ds = honest(4)
    for i in (0, 1, 2):  # a "majority" of liars: the screen only trusts a majority, so it
        ds[i] = {k: -(i + 1) * v for k, v in ds[i].items()}  # leaves out at most (n - 1) // 2
    r = screen_deltas(ds, RULE)
    assert len(r.excluded) <= 1


def test_below_min_deltas_nothing_is_screened():
    ds = honest(2)
    ds[1] = {k: -v for k, v in ds[1].items()}
    r = screen_deltas(ds, RULE)
    assert r.kept == (0, 1) and r.excluded == ()


def test_the_result_does_not_depend_on_anything_but_the_deltas():
    ds = honest(6, seed=3)
    ds[5] = {k: -v for k, v in ds[5].items()}
    assert screen_deltas(ds, RULE) == screen_deltas([{k: v.clone() for k, v in d.items()} for d in ds], RULE)
