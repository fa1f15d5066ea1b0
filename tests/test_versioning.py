"""The version a round commits (p2pmodel/versioning.py): a pure function of the base version and
the merged deltas, so every honest peer derives the same id."""

from __future__ import annotations

import pytest
import torch

from p2pmodel.lineage import LineageStore
from p2pmodel.screening import DeltaScreen
from p2pmodel.training import TrainingError, outer_step
from p2pmodel.versioning import Contribution, OuterOptimizer, RoundSpec, build_round_version

OUTER = OuterOptimizer(lr=0.7, momentum=0.9)


@pytest.fixture
def store(tmp_path):
    s = LineageStore.init(tmp_path / "repo")
    yield s
    s.close()


def seed(store) -> str:
    g = torch.Generator().manual_seed(0)
    return store.commit({"w": torch.randn(4, 3, generator=g), "b": torch.zeros(3)}, parents=(), message="seed", time=0.0).id


def spec(base: str, method: str = "linear", **kw) -> RoundSpec:
    return RoundSpec(round=0, base_version=base, proposer="p0", time=1.0, method=method,
                     members=("p0", "p1"), proposal_hash="ab" * 32, **kw)  # fmt: skip


def deltas():
    return [
        Contribution("p0", "d0", 3.0, {"w": torch.full((4, 3), 0.1), "b": torch.ones(3)}),
        Contribution("p1", "d1", 1.0, {"w": torch.full((4, 3), -0.1)}),  # "b" absent: a zero delta
    ]


def test_the_same_inputs_give_the_same_version_id(store, tmp_path):
    base = seed(store)
    v1, p1 = build_round_version(store, spec(base), deltas(), OUTER)
    with LineageStore.init(tmp_path / "other") as other:
        base2 = seed(other)
        v2, _ = build_round_version(other, spec(base2), deltas(), OUTER)
    assert base == base2 and v1.id == v2.id
    assert v1.contributors == ("p0", "p1") and [list(d) for d in v1.merge["deltas"]] == [["p0", "d0", 3.0], ["p1", "d1", 1.0]]


def test_it_is_the_weighted_merge_then_diloco_outer_step(store):
    base = seed(store)
    _, params = build_round_version(store, spec(base), deltas(), OUTER)
    state = store.state_dict(base)
    merged = {"w": torch.full((4, 3), (3 * 0.1 - 0.1) / 4), "b": torch.full((3,), 3 / 4)}
    want, _ = outer_step(state, merged, None, lr=0.7, mu=0.9)
    for k in want:
        torch.testing.assert_close(params[k], want[k], rtol=0, atol=1e-7)


def test_methods_without_weights_ignore_them_and_exclusions_are_recorded(store):
    base = seed(store)
    v, _ = build_round_version(store, spec(base, "median", excluded=(("p9", "norm 40x the median"),)), deltas(), OUTER)
    assert v.merge["method"] == "median" and [list(x) for x in v.merge["excluded"]] == [["p9", "norm 40x the median"]]


def test_a_non_finite_merge_raises_a_typed_error(store):
    base = seed(store)
    bad = [Contribution("p0", "d0", 1.0, {"w": torch.full((4, 3), float("nan"))})]
    with pytest.raises(TrainingError, match="not finite"):
        build_round_version(store, spec(base), bad, OUTER)
    with pytest.raises(TrainingError, match="nothing to merge"):
        build_round_version(store, spec(base), [], OUTER)


def test_no_outer_momentum_stores_no_optimizer_state(store):
    base = seed(store)
    v, _ = build_round_version(store, spec(base), deltas(), OuterOptimizer(lr=1.0, momentum=0.0))
    assert v.optimizer_state == {}


def test_rounds_of_the_outer_warm_up_average_and_the_momentum_starts_after_them(store):
    outer = OuterOptimizer(lr=0.7, momentum=0.9, warmup_rounds=2)
    v0 = seed(store)
    v1, p1 = build_round_version(store, spec(v0), deltas(), outer)  # round 0: averaging
    assert v1.merge["outer"] == {"lr": 1.0, "momentum": 0.0, "nesterov": True} and v1.optimizer_state == {}
    merged = {"w": torch.full((4, 3), (3 * 0.1 - 0.1) / 4), "b": torch.full((3,), 3 / 4)}
    want, _ = outer_step(store.state_dict(v0), merged, None, lr=1.0, mu=0.0)
    for k in want:
        torch.testing.assert_close(p1[k], want[k], rtol=0, atol=1e-7)
    store.put_version(v1)
    at2 = RoundSpec(round=2, base_version=v1.id, proposer="p0", time=2.0, method="linear", members=("p0", "p1"), proposal_hash="cd" * 32)
    v2, p2 = build_round_version(store, at2, deltas(), outer)  # round 2: momentum, from zero
    assert v2.merge["outer"] == {"lr": 0.7, "momentum": 0.9, "nesterov": True} and set(v2.optimizer_state) == {"w", "b"}
    want, _ = outer_step(p1, merged, None, lr=0.7, mu=0.9)
    for k in want:
        torch.testing.assert_close(p2[k], want[k], rtol=0, atol=1e-7)


def test_the_screen_leaves_out_a_flipped_delta_and_the_version_says_who_and_why(store):
    base = seed(store)
    g = torch.Generator().manual_seed(1)
    common = torch.randn(4, 3, generator=g)
    good = [Contribution(f"p{i}", f"d{i}", 1.0, {"w": common + 0.1 * torch.randn(4, 3, generator=g)}) for i in range(3)]
    liar = Contribution("p9", "d9", 1.0, {"w": -common})
    v, params = build_round_version(store, spec(base), good + [liar], OUTER, DeltaScreen())
    assert v.contributors == ("p0", "p1", "p2")
    assert [p for p, _ in v.merge["screened"]] == ["p9"] and "cosine" in v.merge["screened"][0][1]
    assert "1 screened out" in v.message
    _, honest_params = build_round_version(store, spec(base), good, OUTER, DeltaScreen())
    torch.testing.assert_close(params["w"], honest_params["w"], rtol=0, atol=0)
