"""The merge's screen (p2pmodel/screening.py): deltas that point away from the round's median
delta, are empty, or are far larger than the median are left out; an honest majority is kept."""

from __future__ import annotations

import torch

from p2pmodel.screening import DeltaScreen, screen_deltas

RULE = DeltaScreen(min_cosine=0.3, max_norm_ratio=4.0)


def honest(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """n deltas sharing a direction (cosine ~0.8 with each other), each with its own noise."""
    g = torch.Generator().manual_seed(seed)
    common = {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}
    return [{k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in common.items()} for _ in range(n)]


def test_honest_deltas_are_all_kept_with_a_high_cosine():
    r = screen_deltas(honest(4), RULE)
    assert r.kept == (0, 1, 2, 3) and r.excluded == ()
    assert min(r.cosines) > 0.8


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
    g = torch.Generator().manual_seed(9)
    ds[0] = {k: torch.randn(v.shape, generator=g) * v.norm() / v.numel() ** 0.5 for k, v in ds[0].items()}
    ds[4] = {k: torch.zeros_like(v) for k, v in ds[4].items()}
    r = screen_deltas(ds, RULE)
    assert r.kept == (1, 2, 3)
    reasons = dict(r.excluded)
    assert "cosine" in reasons[0] and reasons[4] == "empty delta"


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
