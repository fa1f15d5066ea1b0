"""A process killed with SIGKILL in the middle of a commit leaves the repository valid.

A real child process (tests/lineage_commit_child.py) commits a large multi-tensor version;
the test watches the objects folder and SIGKILLs the child once a chosen number of new
objects has appeared, at several points from the first object to the last. After each
kill the repository must verify clean, the new version must be either whole (indexed,
reachable, every tensor readable and equal) or absent, and the previous head must be intact.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from p2pmodel.lineage import LineageStore, Version

CHILD = Path(__file__).with_name("lineage_commit_child.py")
N_TENSORS = 48
ELEMENTS = 64 * 1024  # 256 KiB of float32 per tensor, 12 MiB per version
DEADLINE_S = 30.0

_spec = importlib.util.spec_from_file_location("lineage_commit_child", CHILD)
child_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child_module)  # type: ignore[union-attr]
make_model = child_module.make_model
NEW_PER_COMMIT = N_TENSORS - child_module.SHARED  # tensor objects a later commit adds


def _count_objects(objects_dir: str) -> int:
    n = 0
    for folder in os.scandir(objects_dir):
        n += sum(1 for e in os.scandir(folder.path) if not e.name.startswith(".tmp-"))
    return n


def _kill_after(repo: str, seed: int, new_objects: int) -> int:
    """Start a child commit, SIGKILL it once `new_objects` objects appeared; returns its exit code."""
    objects_dir = os.path.join(repo, "objects")
    start = _count_objects(objects_dir)
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), repo, str(seed), str(N_TENSORS), str(ELEMENTS)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + DEADLINE_S
        while _count_objects(objects_dir) - start < new_objects:
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("atomic") / "repo")
    with LineageStore.init(path) as store:
        store.commit(make_model(1, N_TENSORS, ELEMENTS), message="seed 1")
    return path


# (seed of the child's model, new objects seen before SIGKILL): the first tensor, half of
# them, every tensor (record not yet written), and the record (index possibly not yet
# written; the child may also win that race and finish, which must then leave it whole).
# Each point costs a child start (~2-4 s importing torch on a loaded 2-core machine).
KILL_POINTS = [(2, 1), (3, NEW_PER_COMMIT // 2), (4, NEW_PER_COMMIT), (5, NEW_PER_COMMIT + 1)]


@pytest.mark.parametrize("seed,new_objects", KILL_POINTS)
def test_kill_9_mid_commit_leaves_new_version_whole_or_absent(repo: str, seed: int, new_objects: int) -> None:
    with LineageStore.open(repo) as store:
        old_head = store.resolve("main")
        old_seed = int(store.get_version(old_head).message.split()[1])
    rc = _kill_after(repo, seed, new_objects)
    if new_objects <= NEW_PER_COMMIT:
        assert rc == -signal.SIGKILL, "the child finished before it could be killed; the test proved nothing"
    with LineageStore.open(repo) as store:
        report = store.verify()
        assert report.ok, [str(p) for p in report.problems]
        head = store.resolve("main")
        if head == old_head:  # absent: nothing indexed refers to the new version
            assert all(store.get_version(i).message != f"seed {seed}" for i in store.index.all_ids())
        else:  # whole: it sits on top of the old head and reads back exactly
            assert store.get_version(head).parents == (old_head,)
            _assert_same(store.state_dict(head), make_model(seed, N_TENSORS, ELEMENTS))
        _assert_same(store.state_dict(old_head), make_model(old_seed, N_TENSORS, ELEMENTS))


def test_gc_after_kills_removes_leftovers_and_keeps_history(repo: str) -> None:
    with LineageStore.open(repo) as store:
        heads = [i.id for i in store.log_info("main")]
        store.gc()
        report = store.verify()
        assert report.ok and report.stray_temp_files == 0 and report.unreferenced_objects == 0
        assert [i.id for i in store.log_info("main")] == heads
        for vid in heads:
            seed = int(store.get_version(vid).message.split()[1])
            _assert_same(store.state_dict(vid), make_model(seed, N_TENSORS, ELEMENTS))


def test_a_record_written_but_not_indexed_is_invisible_and_tolerated(tmp_path) -> None:
    with LineageStore.init(tmp_path / "r", durable=False) as store:
        base = store.commit({"w": torch.ones(3)}, message="base")
        entry = store.put_tensor(torch.zeros(3))
        orphan = Version(parents=(base.id,), tensors={"w": entry}, message="orphan", time=1.0)
        store.write_object(orphan.id, orphan.to_bytes())  # the state a kill just before the index leaves
        assert store.resolve("main") == base.id and not store.index.has_version(orphan.id)
        report = store.verify()
        assert report.ok and report.unreferenced_objects == 2
