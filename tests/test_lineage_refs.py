"""Revisions resolve as git users expect, refs move only by compare-and-swap, queries come from the index.

Covers: full ids, unique and ambiguous prefixes, branches, tags, HEAD, `~n`, `^n` and their
combinations; errors for every unresolvable form; CAS semantics of `set_ref` and of
`commit` on a branch that moved; log order (topological, newest first), children and
versions-with-metrics.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from p2pmodel.lineage import (
    AmbiguousRef,
    InvalidRefName,
    LineageStore,
    RefConflict,
    RefNotFound,
    TensorEntry,
    Version,
)


@pytest.fixture
def store(tmp_path) -> LineageStore:
    s = LineageStore.init(tmp_path / "repo", durable=False)
    yield s
    s.close()


def _commit(store: LineageStore, msg: str, t: float, **kw) -> str:
    return store.commit({"w": torch.full((2,), t)}, message=msg, time=t, **kw).id


@pytest.fixture
def history(store: LineageStore) -> dict[str, str]:
    """a - b - c - m (main), with x forking from a on `side` and m merging c and x."""
    a = _commit(store, "a", 1.0)
    b = _commit(store, "b", 2.0)
    c = _commit(store, "c", 3.0)
    store.set_ref("side", a, None)
    x = _commit(store, "x", 2.5, branch="side")
    m = _commit(store, "m", 4.0, parents=[c, x])
    return {"a": a, "b": b, "c": c, "x": x, "m": m}


def test_full_id_resolves_to_itself(store, history) -> None:
    assert store.resolve(history["b"]) == history["b"]


def test_unique_prefix_of_four_hex_digits_resolves(store, history) -> None:
    assert store.resolve(history["c"][:4]) == history["c"]  # ids are deterministic here (fixed times)


def test_prefix_shorter_than_four_digits_is_not_an_id(store, history) -> None:
    with pytest.raises(RefNotFound):
        store.resolve(history["c"][:3])


def test_ambiguous_prefix_lists_every_candidate(store) -> None:
    seen: dict[str, Version] = {}
    for i in itertools.count():  # ~300 tries until two ids share 4 hex digits (birthday bound)
        v = Version(parents=(), tensors={}, message=f"v{i}", time=0.0)
        if v.id[:4] in seen:
            break
        seen[v.id[:4]] = v
    first = seen[v.id[:4]]
    store.put_version(first)
    store.put_version(v)
    with pytest.raises(AmbiguousRef) as info:
        store.resolve(v.id[:4])
    assert info.value.candidates == sorted([first.id, v.id])
    assert store.resolve(v.id[:12]) == v.id


def test_branch_tag_and_head_resolve(store, history) -> None:
    store.set_ref("refs/tags/v1", history["b"], None)
    assert store.resolve("main") == history["m"]
    assert store.resolve("side") == history["x"]
    assert store.resolve("v1") == store.resolve("refs/tags/v1") == history["b"]
    assert store.resolve("HEAD") == history["m"]
    store.set_head("side")
    assert store.resolve("HEAD") == history["x"]


def test_tilde_follows_first_parents(store, history) -> None:
    assert store.resolve("main~1") == store.resolve("main~") == history["c"]
    assert store.resolve("main~3") == history["a"]


def test_caret_picks_the_nth_parent(store, history) -> None:
    assert store.resolve("main^") == store.resolve("main^1") == history["c"]
    assert store.resolve("main^2") == history["x"]
    assert store.resolve("main^0") == history["m"]


def test_suffixes_combine_left_to_right(store, history) -> None:
    assert store.resolve("main^2~1") == history["a"]
    assert store.resolve("HEAD~1^1") == history["b"]
    assert store.resolve(history["m"][:10] + "^2^") == history["a"]


@pytest.mark.parametrize("rev", ["main~4", "main^3", "nosuch", "main~x", "", "HEAD^2^2"])
def test_unresolvable_revisions_raise_ref_not_found(store, history, rev) -> None:
    with pytest.raises(RefNotFound):
        store.resolve(rev)


def test_head_of_an_empty_repository_is_not_found(store) -> None:
    with pytest.raises(RefNotFound):
        store.resolve("HEAD")


def test_set_ref_swaps_only_when_old_matches(store, history) -> None:
    assert not store.set_ref("main", history["a"], old=history["b"])
    assert store.resolve("main") == history["m"]
    assert store.set_ref("main", history["a"], old=history["m"])
    assert store.resolve("main") == history["a"]


def test_set_ref_with_old_none_only_creates(store, history) -> None:
    assert store.set_ref("feature", history["b"], None)
    assert not store.set_ref("feature", history["c"], None)
    assert store.branches()["feature"] == history["b"]


def test_set_ref_with_new_none_deletes(store, history) -> None:
    assert store.set_ref("side", None, history["x"])
    assert "side" not in store.branches()


def test_set_ref_refuses_a_target_that_is_not_a_version(store, history) -> None:
    with pytest.raises(RefNotFound):
        store.set_ref("main", "f" * 64)


@pytest.mark.parametrize("name", ["a..b", "bad name", "x~1", "HEAD", "end/", "q?"])
def test_invalid_ref_names_are_refused(store, history, name) -> None:
    with pytest.raises(InvalidRefName):
        store.set_ref(name, history["a"], None)


def test_commit_raises_ref_conflict_when_the_branch_moved_meanwhile(store, history) -> None:
    def tensors():
        store.set_ref("main", history["a"])  # another writer moves main while we store tensors
        yield "w", torch.zeros(2)

    with pytest.raises(RefConflict) as info:
        store.commit(tensors(), parents=[history["m"]], message="late")
    assert info.value.expected == history["m"] and info.value.actual == history["a"]
    assert store.resolve("main") == history["a"]


def test_log_is_topological_and_newest_first(store, history) -> None:
    order = [v.message for v in store.log("main")]
    assert order == ["m", "c", "x", "b", "a"]


def test_log_limit_keeps_the_newest(store, history) -> None:
    assert [v.message for v in store.log("main", limit=2)] == ["m", "c"]


def test_log_puts_children_before_parents_even_with_skewed_clocks(store) -> None:
    a = _commit(store, "a", 10.0)
    _commit(store, "b", 5.0)  # a peer with a slow clock
    assert [i.message for i in store.log_info("main")] == ["b", "a"]
    assert store.log_info("main")[1].id == a


def test_children_lists_every_child(store, history) -> None:
    assert set(store.children(history["a"])) == {history["b"], history["x"]}
    assert store.children(history["m"]) == []


def test_versions_with_metrics_lists_only_annotated_versions(store, history) -> None:
    store.annotate(history["b"], metrics={"eval_loss": 3.0})
    got = store.versions(with_metrics=True)
    assert [(i.id, i.metrics) for i in got] == [(history["b"], {"eval_loss": 3.0})]


def test_branches_and_tags_are_listed_by_short_name(store, history) -> None:
    store.set_ref("refs/tags/v1", history["a"], None)
    assert store.branches() == {"main": history["m"], "side": history["x"]}
    assert store.tags() == {"v1": history["a"]}


def test_a_tensor_entry_can_be_recommitted_without_its_tensor(store, history) -> None:
    entry = store.get_version("main").tensors["w"]
    v = store.commit({"w": entry}, message="reuse")
    assert isinstance(entry, TensorEntry) and v.tensors["w"] == entry and v.parents == (history["m"],)
