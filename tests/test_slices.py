"""The partitioned reduction's pure half (p2pmodel.partition): slice plans, owners, slice merges.

What a partitioned round will rely on: every entry in exactly one slice; a slice's merge equal,
bit for bit, to that slice of the whole merge; a slice encoded alone decodes to the same values
as in the whole delta; owners that stay put when a peer leaves.
"""

from __future__ import annotations

import math

import pytest
import torch

from p2pmodel.partition import PartitionError, SlicePlan, merge_slice, slice_owners
from p2pmodel.protocols.codec import CodecConfig, DeltaCodec
from p2pmodel.tasks import load_task
from p2pmodel.versioning import Contribution, merge_contributions

CHARLM = {k: tuple(v.shape) for k, v in load_task("charlm").build_model().state_dict().items()}


def _random_model(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}


@pytest.mark.parametrize("count", [1, 2, 3, 8, 16, 64, 256])
def test_every_entry_is_in_exactly_one_slice_and_cuts_fall_on_blocks(count):
    plan = SlicePlan.of(CHARLM, count, align=1024)
    assert plan.count == count
    seen = {name: torch.zeros(math.prod(shape), dtype=torch.int32) for name, shape in CHARLM.items()}
    for s in range(count):
        for p in plan.pieces(s):
            seen[p.name][p.start : p.stop] += 1
            numel = math.prod(CHARLM[p.name])
            assert p.start % 1024 == 0 or p.start == 0
            assert p.stop % 1024 == 0 or p.stop == numel  # a cut inside a tensor is on a block
    assert all(bool((v == 1).all()) for v in seen.values())


@pytest.mark.parametrize("count", [2, 8, 64])
def test_slices_are_equal_shares_within_a_block(count):
    sizes = SlicePlan.of(CHARLM, count, align=1024).sizes()
    share = sum(sizes) / count
    assert max(abs(n - share) for n in sizes) <= 1024


def test_the_plan_depends_on_the_layout_not_on_dict_order():
    reordered = dict(reversed(list(CHARLM.items())))
    assert SlicePlan.of(CHARLM, 16) == SlicePlan.of(reordered, 16)


def test_take_then_assemble_gives_back_the_model_bit_for_bit():
    model = _random_model(CHARLM, 0)
    plan = SlicePlan.of(CHARLM, 7, align=256)
    back = plan.assemble([plan.take(model, s) for s in range(plan.count)])
    assert back.keys() == model.keys()
    assert all(torch.equal(back[k], model[k]) for k in model)


def test_a_tensor_missing_from_a_delta_is_zero_in_every_slice():
    delta = _random_model(CHARLM, 1)
    del delta["tok_emb.weight"]
    plan = SlicePlan.of(CHARLM, 8)
    back = plan.assemble([plan.take(delta, s) for s in range(plan.count)])
    assert not back["tok_emb.weight"].any()


def test_bad_plans_and_pieces_are_refused():
    with pytest.raises(PartitionError, match="positive integer"):
        SlicePlan.of(CHARLM, 0)
    with pytest.raises(PartitionError, match="no entries"):
        SlicePlan.of({"w": (0, 4)}, 2)
    plan = SlicePlan.of({"w": (4, 4)}, 2, align=4)
    with pytest.raises(PartitionError, match="out of range"):
        plan.pieces(2)
    with pytest.raises(PartitionError, match="needs 2 slices"):
        plan.assemble([{}])
    with pytest.raises(PartitionError, match="holds 3 entries of w, the plan 8"):
        plan.assemble([{"w": torch.zeros(3)}, {}])


@pytest.mark.parametrize(
    "method, params",
    [("linear", {}), ("task_arithmetic", {"lambda_": 0.5}), ("median", {}), ("trimmed_mean", {"trim": 1})],
)
def test_a_slice_merge_is_that_slice_of_the_whole_merge_bit_for_bit(method, params):
    base = _random_model(CHARLM, 2)
    deltas = [_random_model(CHARLM, 10 + i) for i in range(5)]
    weights = [3.0, 1.0, 2.0, 5.0, 4.0]
    whole = merge_contributions(
        method, base, [Contribution(f"p{i}", f"h{i}", w, d) for i, (d, w) in enumerate(zip(deltas, weights))], seed=7, params=params
    )
    plan = SlicePlan.of(CHARLM, 9)
    parts = []
    for s in range(plan.count):
        sliced = [Contribution(f"p{i}", f"h{i}", w, plan.take(d, s)) for i, (d, w) in enumerate(zip(deltas, weights))]
        parts.append(merge_slice(plan, s, method, base, sliced, seed=7, params=params))
    assembled = plan.assemble(parts)
    assert all(torch.equal(assembled[k], whole[k]) for k in whole)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "centered_clip"])
def test_methods_that_need_whole_tensors_are_refused_by_slice(method):
    plan = SlicePlan.of(CHARLM, 4)
    base = _random_model(CHARLM, 3)
    with pytest.raises(PartitionError, match="needs whole tensors"):
        merge_slice(plan, 0, method, base, [Contribution("p", "h", 1.0, plan.take(base, 0))], seed=0, params={})


@pytest.mark.parametrize("config", [{"encoder": "lowbit", "value_bits": 2, "block_size": 1024}, {"encoder": "int8", "block_size": 256}])
def test_a_slice_encoded_alone_decodes_to_the_same_values_as_in_the_whole_delta(config):
    """Cuts on block boundaries: a slice's blocks and scales are the whole tensor's, so owners
    can be sent slices of a delta at no loss beyond the codec's own."""
    codec = DeltaCodec(CodecConfig(**config))
    delta = _random_model(CHARLM, 4)
    manifest = {k: ("F32", shape) for k, shape in CHARLM.items()}
    whole = codec.decode(codec.encode_without_feedback(delta), manifest)
    plan = SlicePlan.of(CHARLM, 12, align=1024)
    parts = []
    for s in range(plan.count):
        piece = plan.take(delta, s)
        parts.append(codec.decode(codec.encode_without_feedback(piece), {k: ("F32", (v.numel(),)) for k, v in piece.items()}))
    assembled = plan.assemble(parts)
    assert all(torch.equal(assembled[k], whole[k]) for k in whole)


MEMBERS = [f"peer{i:02d}" for i in range(8)]


def test_every_slice_has_distinct_owners_from_the_members_and_the_same_on_every_peer():
    owners = slice_owners(64, MEMBERS, "event-1", replicas=2)
    assert len(owners) == 64
    assert all(len(set(o)) == 2 and set(o) <= set(MEMBERS) for o in owners)
    assert owners == slice_owners(64, list(reversed(MEMBERS)), "event-1", replicas=2)
    load = {m: sum(m in o for o in owners) for m in MEMBERS}
    assert min(load.values()) >= 6 and max(load.values()) <= 28  # 16 each on average


def test_a_peer_that_leaves_moves_only_the_slices_it_owned():
    before = slice_owners(64, MEMBERS, "event-1", replicas=2)
    after = slice_owners(64, MEMBERS[1:], "event-1", replicas=2)
    for b, a in zip(before, after):
        if MEMBERS[0] not in b:
            assert a == b
        else:  # the other owner stays; one new owner steps in
            assert set(b) - {MEMBERS[0]} <= set(a)


def test_fewer_members_than_replicas_all_own_every_slice_and_no_members_is_refused():
    assert slice_owners(3, ["a"], "k", replicas=2) == (("a",),) * 3
    with pytest.raises(PartitionError, match="no members"):
        slice_owners(3, [], "k", replicas=2)


def test_the_screen_decides_the_same_from_slice_sums_as_from_whole_deltas():
    """Owners each sum their slices; the totals give the whole model's screen (a flipped delta
    and noise of an honest norm are left out either way)."""
    from p2pmodel.screening import DeltaScreen, screen_deltas, screen_from_sums, screen_sums

    g = torch.Generator().manual_seed(5)
    signal = {k: torch.randn(shape, generator=g) for k, shape in CHARLM.items()}
    honest = [{k: v + 1.5 * torch.randn(v.shape, generator=g) for k, v in signal.items()} for _ in range(6)]
    flipped = {k: -3 * v for k, v in honest.pop().items()}  # an honest delta the liar trained, sent flipped
    noise = {k: torch.randn(v.shape, generator=g) * float(v.norm()) / math.sqrt(v.numel()) for k, v in honest[1].items()}
    deltas = honest + [flipped, noise]
    rule = DeltaScreen()
    whole = screen_deltas(deltas, rule)
    plan = SlicePlan.of(CHARLM, 6)
    per_slice = [screen_sums([plan.take(d, s) for d in deltas], rule) for s in range(plan.count)]
    total = per_slice[0]
    for part in per_slice[1:]:
        total = total + part
    sliced = screen_from_sums(total, rule)
    assert sliced.kept == whole.kept == (0, 1, 2, 3, 4)
    assert [i for i, _ in sliced.excluded] == [i for i, _ in whole.excluded] == [5, 6]
    assert sliced.cosines == pytest.approx(whole.cosines, rel=1e-9)
    assert sliced.norms == pytest.approx(whole.norms, rel=1e-12)


def test_a_round_merged_slice_by_slice_commits_the_same_version_id(tmp_path):
    """The reference a distributed round must match: screen sums per slice, the screen on their
    totals, each slice merged, assembled; then the outer step gives the whole merge's version."""
    from p2pmodel.lineage import LineageStore
    from p2pmodel.partition import merge_round_by_slices
    from p2pmodel.screening import DeltaScreen
    from p2pmodel.versioning import OuterOptimizer, RoundSpec, build_round_version, version_of_merge

    g = torch.Generator().manual_seed(8)
    signal = {k: 0.01 * torch.randn(shape, generator=g) for k, shape in CHARLM.items()}
    deltas = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in signal.items()} for _ in range(4)]
    deltas.append({k: -5 * v for k, v in signal.items()})  # a liar, left out by the screen
    contributions = [Contribution(f"p{i}", f"d{i}", float(100 + i), d) for i, d in enumerate(deltas)]
    outer = OuterOptimizer(lr=0.7, momentum=0.8)
    with LineageStore.init(tmp_path / "repo") as store:
        base_id = store.commit(_random_model(CHARLM, 9), parents=(), message="seed", time=0.0).id
        spec = RoundSpec(round=3, base_version=base_id, proposer="p0", time=1.0, method="linear",
                         members=tuple(c.peer_id for c in contributions), proposal_hash="ab" * 32)  # fmt: skip
        whole, _ = build_round_version(store, spec, contributions, outer, DeltaScreen())
        merge = merge_round_by_slices(SlicePlan.of(CHARLM, 5), store.state_dict(base_id), spec, contributions, DeltaScreen())
        sliced, _ = version_of_merge(store, spec, merge, outer)
    assert [p for p, _ in merge.screened] == ["p4"]
    assert sliced.id == whole.id
