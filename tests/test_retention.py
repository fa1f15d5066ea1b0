"""Retention: old versions are pruned to their records, so a long event does not fill a disk.

Guarantees: the policy (pure) keeps the newest K versions of every branch and tag, every Nth
round's version, every tip, every root and whatever the caller protects, and nothing else
that a ref reaches; a pruned version keeps its record, metrics, certificate and place in
`log`, `verify` passes without its tensors but still checks its record, `gc` frees what only
pruned versions needed and keeps what others share; reading a pruned version's tensors raises
VersionPruned (an ObjectMissing) naming it; a joiner can index records without objects
(`put_version(pruned=True)`) and make one whole again later; `gc --prune` reports what it
freed and `log` marks pruned versions.
"""

from __future__ import annotations

import json
import os
import sqlite3

import pytest
import torch

from p2pmodel.cli import main
from p2pmodel.lineage import (
    InvalidRetention,
    LineageStore,
    ObjectMissing,
    PruneRefused,
    RetentionPolicy,
    VersionPruned,
    apply_retention,
    plan_pruning,
)
from p2pmodel.lineage.retention import VersionFacts

# --------------------------------------------------------------------------- the policy (pure)


def _chain(n: int, prefix: str = "v", root: str | None = None, first_round: int = 0) -> list[VersionFacts]:
    """A round chain: ids prefix0..prefix{n-1}, each the parent of the next, rounds counting up."""
    out, parent = [], root
    for i in range(n):
        vid = f"{prefix}{i}"
        out.append(VersionFacts(vid, (parent,) if parent else (), first_round + i))
        parent = vid
    return out


def test_a_chain_keeps_its_newest_k_versions_and_its_root():
    versions = _chain(10)
    pruned = plan_pruning(versions, ["v9"], RetentionPolicy(keep_last=3, keep_every=0))
    assert pruned == sorted(f"v{i}" for i in range(1, 7))


def test_every_nth_rounds_version_is_a_checkpoint():
    versions = _chain(10)
    pruned = plan_pruning(versions, ["v9"], RetentionPolicy(keep_last=2, keep_every=4))
    assert "v4" not in pruned and "v0" not in pruned
    assert set(pruned) == {"v1", "v2", "v3", "v5", "v6", "v7"}


def test_every_branch_and_tag_keeps_its_own_newest_versions():
    main = _chain(10)
    side = _chain(3, prefix="s", root="v2", first_round=100)  # a branch forked at v2
    pruned = plan_pruning(main + side, ["v9", "s2"], RetentionPolicy(keep_last=2, keep_every=0))
    assert {"s2", "s1", "v9", "v8"}.isdisjoint(pruned)
    assert "s0" in pruned and "v2" in pruned


def test_protected_versions_stay_whole():
    pruned = plan_pruning(_chain(10), ["v9"], RetentionPolicy(keep_last=2, keep_every=0), protect=["v5"])
    assert "v5" not in pruned and "v4" in pruned


def test_keep_last_zero_turns_retention_off():
    assert plan_pruning(_chain(50), ["v49"], RetentionPolicy(keep_last=0, keep_every=0)) == []


def test_already_pruned_and_unreachable_versions_are_not_planned():
    versions = _chain(6) + [VersionFacts("orphan", ("v1",), 99)]
    versions[2] = VersionFacts("v2", ("v1",), 2, pruned=True)
    pruned = plan_pruning(versions, ["v5"], RetentionPolicy(keep_last=2, keep_every=0))
    assert pruned == ["v1", "v3"]


@pytest.mark.parametrize("kw", [{"keep_last": 1}, {"keep_last": -1}, {"keep_every": -5}])
def test_a_setting_that_cannot_work_is_refused(kw):
    with pytest.raises(InvalidRetention):
        RetentionPolicy(**kw)


# --------------------------------------------------------------------------- pruned versions in the store


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # "shared" never changes: its object is needed by every version, pruned or not
    return {"w": torch.randn(64, 8, generator=g), "shared": torch.arange(32, dtype=torch.float32)}


@pytest.fixture
def store(tmp_path):
    s = LineageStore.init(tmp_path / "repo", durable=False)
    for r in range(8):
        s.commit(_model(r), message=f"round {r}", round=r, time=float(r), metrics={"eval_loss": 3.0 - r / 10},
                 certificate={"round": r, "votes": [b"vote"]}, optimizer_state={"m": torch.full((4,), float(r))})
    yield s
    s.close()


def _prune_old(s: LineageStore) -> tuple[str, ...]:
    return apply_retention(s, RetentionPolicy(keep_last=2, keep_every=0), full_gc=True).pruned


def test_a_pruned_version_keeps_its_record_metrics_certificate_and_place_in_the_log(store):
    old = store.resolve("main~3")
    assert old in _prune_old(store)
    assert store.get_version(old).round == 4
    ann = store.annotations(old)
    assert ann.metrics == {"eval_loss": pytest.approx(2.6)} and ann.certificate == {"round": 4, "votes": [b"vote"]}
    infos = store.log_info()
    assert len(infos) == 8 and [i.pruned for i in infos] == [False, False, True, True, True, True, True, False]


def test_verify_passes_after_pruning_and_gc(store):
    _prune_old(store)
    report = store.verify()
    assert report.ok and report.unreferenced_objects == 0


def test_verify_still_checks_a_pruned_versions_record(store):
    old = store.resolve("main~3")
    _prune_old(store)
    os.unlink(store._path(old))
    assert [(p.oid, p.kind) for p in store.verify().problems] == [(old, "missing")]


def test_gc_frees_what_only_pruned_versions_needed_and_keeps_shared_objects(store):
    old = store.get_version("main~3")
    result = apply_retention(store, RetentionPolicy(keep_last=2, keep_every=0), full_gc=True)
    # five versions pruned: each had its own "w" and optimizer state
    assert result.freed.removed_objects == 10 and result.freed.bytes_freed > 5 * 64 * 8 * 4
    assert not store.has_object(old.tensors["w"].oid) and not store.has_object(old.optimizer_state["m"].oid)
    assert store.has_object(old.tensors["shared"].oid)


def test_reading_a_pruned_versions_tensors_raises_version_pruned(store):
    old = store.resolve("main~3")
    _prune_old(store)
    with pytest.raises(VersionPruned) as err:
        store.state_dict(old)
    assert err.value.version_id == old and isinstance(err.value, ObjectMissing)
    assert f"version {old[:12]} is pruned" in str(err.value) and "fetch it from a peer" in str(err.value)
    with pytest.raises(VersionPruned):
        store.get_tensor(store.get_version(old).tensors["w"], needed_by=old)


def test_a_branch_or_tag_tip_cannot_be_pruned(store):
    store.set_ref("refs/tags/v1", "main~5")
    with pytest.raises(PruneRefused):
        store.prune([store.resolve("v1")])
    assert store.resolve("main~5") not in _prune_old(store)


def test_a_record_without_its_objects_can_be_indexed_as_pruned_and_made_whole_later(store, tmp_path):
    joiner = LineageStore.init(tmp_path / "joiner", durable=False)
    chain = list(reversed(store.log()))
    root = chain[0]
    for oid in root.referenced_objects():  # the seed: whole
        joiner.write_object(oid, store.read_object(oid))
    joiner.put_version(root)
    for v in chain[1:-1]:  # the history: records only
        joiner.put_version(v, store.annotations(v.id), pruned=True)
    head = chain[-1]
    for oid in head.referenced_objects():
        joiner.write_object(oid, store.read_object(oid))
    joiner.put_version(head, branch="main")
    assert joiner.verify().ok
    assert [i.pruned for i in joiner.log_info()] == [False] + [True] * 6 + [False]
    assert joiner.annotations(chain[3].id).certificate == store.annotations(chain[3].id).certificate
    # history on demand: the objects of one old version fetched, it is whole again
    for oid in chain[3].referenced_objects():
        joiner.write_object(oid, store.read_object(oid))
    joiner.put_version(chain[3])
    assert not joiner.is_pruned(chain[3].id)
    torch.testing.assert_close(joiner.state_dict(chain[3].id)["w"], store.state_dict(chain[3].id)["w"])
    joiner.close()


def test_a_branch_cannot_point_at_a_version_indexed_as_pruned(store, tmp_path):
    joiner = LineageStore.init(tmp_path / "joiner", durable=False)
    root = store.log()[-1]
    with pytest.raises(PruneRefused):
        joiner.put_version(root, pruned=True, branch="main")
    joiner.close()


def test_free_pruned_leaves_unreachable_and_unindexed_versions_alone(store):
    synced = store.commit(_model(99), message="synced, not yet committed", branch=None, round=8, time=8.0)
    staged = store.put_tensor(torch.ones(3))  # an object a sync is still fetching
    result = apply_retention(store, RetentionPolicy(keep_last=2, keep_every=0))  # the node's way: no full gc
    assert result.freed.removed_objects == 10
    assert store.index.has_version(synced.id) and store.has_object(synced.tensors["w"].oid)
    assert store.has_object(staged.oid)


def test_a_repository_made_before_pruning_existed_is_upgraded_when_opened(tmp_path):
    path = tmp_path / "old"
    s = LineageStore.init(path, durable=False)
    s.commit(_model(0), message="first")
    s.close()
    db = sqlite3.connect(path / "index.sqlite")
    db.execute("DROP TABLE pruned")
    db.commit()
    db.close()
    with LineageStore.open(path) as s:
        assert s.pruned() == set() and s.verify().ok


# --------------------------------------------------------------------------- the command line


def call(capsys, *args: str, repo) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--repo", str(repo), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def repo(store):
    return store.root


def test_gc_prune_reports_the_versions_pruned_and_the_bytes_freed(capsys, repo):
    code, out, _ = call(capsys, "gc", "--prune", "--keep-last", "2", "--keep-every", "4", "--json", repo=repo)
    report = json.loads(out)
    assert code == 0 and len(report["pruned_versions"]) == 4 and report["bytes_freed"] > 4 * 64 * 8 * 4
    code, out, _ = call(capsys, "gc", "--prune", "--keep-last", "2", repo=repo)
    assert code == 0 and out.startswith("pruned 1 versions") and "freed" in out


def test_log_marks_pruned_versions(capsys, repo):
    call(capsys, "gc", "--prune", "--keep-last", "2", "--keep-every", "0", repo=repo)
    _, out, _ = call(capsys, "log", "--json", repo=repo)
    assert [v["pruned"] for v in json.loads(out)] == [False, False, True, True, True, True, True, False]
    _, out, _ = call(capsys, "log", "--graph", repo=repo)
    lines = out.splitlines()
    assert "(pruned)" in lines[2] and "(pruned)" not in lines[0] and "(pruned)" not in lines[-1]


def test_exporting_a_pruned_version_is_one_line_naming_it(capsys, repo, tmp_path):
    call(capsys, "gc", "--prune", "--keep-last", "2", "--keep-every", "0", repo=repo)
    code, out, err = call(capsys, "export", "main~3", "-o", str(tmp_path / "x.safetensors"), repo=repo)
    assert code == 1 and "is pruned" in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("args", [("gc", "--keep-last", "4"), ("gc", "--prune", "--keep-last", "1")])
def test_retention_flags_that_cannot_work_are_refused(capsys, repo, args):
    code, _, err = call(capsys, *args, repo=repo)
    assert code != 0 and err.strip()


# --------------------------------------------------------------------------- the node: flags and shallow sync


@pytest.mark.parametrize("kw", [{"keep_last": 1}, {"keep_every": -1}])
def test_join_refuses_retention_flags_that_cannot_work(kw):
    import dataclasses

    from p2pmodel.daemon.config import ConfigError, NodeConfig, check_node_config

    with pytest.raises(ConfigError):
        check_node_config(dataclasses.replace(NodeConfig(device="cpu"), **kw))


class _Peers:
    """Stands in for the transport: peers that serve what their lineage holds, NOT_FOUND otherwise
    (as `Node._serve_lineage_object` does), asked in order; counts what was fetched."""

    def __init__(self, *stores: LineageStore):
        self.stores, self.fetched = stores, []

    async def fetch_from_any(self, peers, oid, *, max_size, kind="object", **_):
        from p2pmodel.daemon.transport import ObjectNotFound

        for s in self.stores:
            if s.has_object(oid):
                self.fetched.append(oid)
                return s.read_object(oid)
        raise ObjectNotFound("any", oid)


def test_sync_fetches_the_heads_tensors_and_only_the_records_of_older_versions(store, tmp_path):
    import asyncio

    from p2pmodel.daemon.sync import CertifiedVersion, sync_version

    chain = list(reversed(store.log()))
    joiner = LineageStore.init(tmp_path / "joiner", durable=False)
    for oid in chain[0].referenced_objects():  # the seed, fetched when the node started
        joiner.write_object(oid, store.read_object(oid))
    joiner.put_version(chain[0], branch="main")
    _prune_old(store)  # the serving peer pruned its history; its head and the seed are whole
    peers = _Peers(store)
    head = CertifiedVersion(chain[-1], 7, (), (), ())
    added = asyncio.run(sync_version(peers, joiner, head, ["p"]))
    assert added == 7 and joiner.resolve("main") == chain[-1].id
    held = set(chain[0].referenced_objects())  # the unchanged "shared" tensor
    assert set(peers.fetched) == {v.id for v in chain[1:-1]} | (set(chain[-1].referenced_objects()) - held)
    assert [i.pruned for i in joiner.log_info()] == [False] + [True] * 6 + [False]
    assert joiner.verify().ok
    joiner.close()
