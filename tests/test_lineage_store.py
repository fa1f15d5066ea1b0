"""The lineage store keeps tensors losslessly, once per content, and never returns damaged data.

Guarantees checked here: commit/read round trips are bit-exact for every stored dtype and
shape (scalars, empty tensors, bf16); an unchanged tensor costs nothing in a new version;
a version's id covers its core and not its annotations, and garbage never decodes as a
version; every kind of on-disk damage (flipped byte, truncation, deletion) is caught on
read with an error naming the object and the version that needs it, and listed by verify;
gc frees exactly what no ref reaches.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pmodel.errors import P2PModelError
from p2pmodel.lineage import (
    DTYPES,
    InvalidObject,
    LineageError,
    LineageStore,
    ObjectCorrupt,
    ObjectMissing,
    RepositoryNotFound,
    TensorEntry,
    Version,
    tensor_oid,
)
from p2pmodel.lineage.maintenance import iter_object_files


def _tensor_from_bytes(dtype: str, shape: tuple[int, ...], raw: bytes) -> torch.Tensor:
    td = DTYPES[dtype]
    if not raw:
        return torch.empty(shape, dtype=td)
    if dtype == "BOOL":
        raw = bytes(b & 1 for b in raw)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(td).reshape(shape).clone()


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """Any stored dtype, any small shape (scalar and empty included), arbitrary bit patterns (NaNs too)."""
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    n = itemsize * int(torch.tensor(shape, dtype=torch.int64).prod()) if shape else itemsize
    return _tensor_from_bytes(dtype, shape, draw(st.binary(min_size=n, max_size=n)))


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _tensor_objects(store: LineageStore) -> set[str]:
    out = set()
    for name, path in iter_object_files(store):
        with open(path, "rb") as f:
            if f.read(7) == b"tensor ":
                out.add(name)
    return out


@pytest.fixture
def store(tmp_path) -> LineageStore:
    s = LineageStore.init(tmp_path / "repo")
    yield s
    s.close()


def _model(seed: int = 0, n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(8, 4, generator=g) for i in range(n)}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(min_size=1, max_size=12), tensors(), max_size=5))
def test_commit_then_read_is_bit_exact_for_every_dtype_and_shape(sd: dict[str, torch.Tensor]) -> None:
    with tempfile.TemporaryDirectory() as d, LineageStore.init(d, durable=False) as store:
        v = store.commit(sd, message="property")
        out = LineageStore.open(d).state_dict(v.id)
        assert set(out) == set(sd)
        for name, t in sd.items():
            assert out[name].dtype == t.dtype and tuple(out[name].shape) == tuple(t.shape)
            assert _bits(out[name]) == _bits(t)


@settings(max_examples=25, deadline=None)
@given(tensors())
def test_tensor_oid_is_the_stored_id_and_ignores_memory_layout(t: torch.Tensor) -> None:
    with tempfile.TemporaryDirectory() as d, LineageStore.init(d, durable=False) as store:
        entry = store.put_tensor(t)
        assert entry.oid == tensor_oid(t)
        if t.dim() == 2:  # a non-contiguous view with the same values has the same id
            assert tensor_oid(t.t().contiguous().t()) == tensor_oid(t)
        assert _bits(store.get_tensor(entry)) == _bits(t)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.data())
def test_a_tensor_unchanged_between_versions_is_stored_once(n_changed: int, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as d, LineageStore.init(d, durable=False) as store:
        base = _model(n=6)
        store.commit(base, message="base")
        before = _tensor_objects(store)
        changed = data.draw(st.sets(st.sampled_from(sorted(base)), min_size=n_changed, max_size=n_changed))
        nxt = {k: (t + 1 if k in changed else t.clone()) for k, t in base.items()}
        store.commit(nxt, message="next")
        assert len(_tensor_objects(store) - before) == len(changed)


def test_recommitting_identical_tensors_rewrites_no_object(store: LineageStore) -> None:
    sd = _model()
    store.commit(sd, message="a")
    mtimes = {p: os.stat(p).st_mtime_ns for _, p in iter_object_files(store)}
    store.commit(sd, message="b")
    assert all(os.stat(p).st_mtime_ns == m for p, m in mtimes.items())


def test_bf16_is_stored_without_loss(store: LineageStore) -> None:
    t = torch.randn(64, dtype=torch.float32).to(torch.bfloat16)
    v = store.commit({"w": t}, message="bf16")
    got = store.state_dict(v.id)["w"]
    assert got.dtype == torch.bfloat16 and _bits(got) == _bits(t)


def test_version_id_is_sha256_of_its_bytes_and_round_trips(store: LineageStore) -> None:
    import hashlib

    v = store.commit(_model(), message="m", round=3, merge={"method": "ties", "density": 0.2, "weights": [0.5, 0.5]},
                     contributors=["peerA", "peerB"], files={"config.json": b'{"n": 1}'}, optimizer_state={"m": torch.ones(3)})
    assert hashlib.sha256(v.to_bytes()).hexdigest() == v.id
    assert Version.from_bytes(v.to_bytes()) == v
    assert store.get_version(v.id).merge == {"method": "ties", "density": 0.2, "weights": (0.5, 0.5)}


def test_version_id_does_not_depend_on_mapping_order() -> None:
    e = {k: TensorEntry("a" * 64, "F32", (2,)) for k in "xyz"}
    v1 = Version(parents=(), tensors=e, message="m", time=1.0, merge={"b": 1, "a": 2})
    v2 = Version(parents=(), tensors=dict(reversed(e.items())), message="m", time=1.0, merge={"a": 2, "b": 1})
    assert v1.id == v2.id


def test_version_id_changes_when_a_parent_changes() -> None:
    e = {"w": TensorEntry("a" * 64, "F32", (2,))}
    assert Version(parents=("b" * 64,), tensors=e, message="m", time=1.0).id != Version(parents=("c" * 64,), tensors=e, message="m", time=1.0).id


def test_annotations_do_not_change_the_id(store: LineageStore) -> None:
    v = store.commit(_model(), message="m", metrics={"eval_loss": 2.0})
    store.annotate(v.id, metrics={"eval_loss": 1.5}, certificate={"votes": [b"sig"]})
    assert store.resolve("main") == v.id and store.get_version(v.id).id == v.id
    ann = store.annotations(v.id)
    assert ann.metrics == {"eval_loss": 1.5} and ann.certificate == {"votes": [b"sig"]}


def test_version_fields_are_immutable(store: LineageStore) -> None:
    v = store.commit(_model(), message="m", merge={"method": "linear"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.message = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        v.tensors["new"] = next(iter(v.tensors.values()))  # type: ignore[index]
    with pytest.raises(TypeError):
        v.merge["method"] = "ties"  # type: ignore[index]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_decodes_as_a_version(data: bytes) -> None:
    with pytest.raises(InvalidObject):
        Version.from_bytes(b"version %d\0" % len(data) + data)


def test_a_non_canonical_record_is_rejected() -> None:
    import msgpack

    v = Version(parents=(), tensors={}, message="m", time=1.0)
    body = v.to_bytes().split(b"\0", 1)[1]
    core = msgpack.unpackb(body)
    shuffled = msgpack.packb(dict(reversed(list(core.items()))))
    with pytest.raises(InvalidObject):
        Version.from_bytes(b"version %d\0" % len(shuffled) + shuffled)


def _damage(store: LineageStore, oid: str, how: str) -> None:
    path = os.path.join(store.objects_dir, oid[:2], oid[2:])
    if how == "delete":
        os.unlink(path)
        return
    with open(path, "r+b") as f:
        if how == "truncate":
            f.truncate(os.path.getsize(path) - 3)
        else:  # flip one bit of the last byte (inside the tensor data)
            f.seek(-1, os.SEEK_END)
            b = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("how,error", [("flip", ObjectCorrupt), ("truncate", ObjectCorrupt), ("delete", ObjectMissing)])
def test_damaged_tensor_raises_a_typed_error_naming_object_and_version(store: LineageStore, how: str, error: type) -> None:
    v = store.commit(_model(), message="m")
    oid = v.tensors["layer2.weight"].oid
    _damage(store, oid, how)
    with pytest.raises(error) as info:
        store.state_dict("main")
    assert info.value.oid == oid and info.value.needed_by == v.id
    assert oid in str(info.value) and v.id in str(info.value)
    assert isinstance(info.value, P2PModelError)


@pytest.mark.parametrize("how,kind", [("flip", "corrupt"), ("truncate", "corrupt"), ("delete", "missing")])
def test_verify_lists_each_damaged_object_with_the_versions_that_need_it(store: LineageStore, how: str, kind: str) -> None:
    sd = _model()
    v1 = store.commit(sd, message="one")
    v2 = store.commit({**sd, "layer0.weight": sd["layer0.weight"] * 2}, message="two")
    shared = v1.tensors["layer3.weight"].oid
    assert store.verify().ok
    _damage(store, shared, how)
    report = store.verify()
    assert [(p.oid, p.kind, p.versions) for p in report.problems] == [(shared, kind, tuple(sorted([v1.id, v2.id])))]


def test_a_damaged_version_record_is_reported_on_read(store: LineageStore) -> None:
    v = store.commit(_model(), message="m")
    _damage(store, v.id, "flip")
    with pytest.raises(ObjectCorrupt) as info:
        store.get_version("main")
    assert info.value.oid == v.id


def test_write_object_refuses_bytes_that_do_not_match_the_id(store: LineageStore) -> None:
    v = store.commit(_model(), message="m")
    data = bytearray(store.read_object(v.tensors["layer0.weight"].oid))
    data[-1] ^= 0xFF
    with pytest.raises(InvalidObject):
        store.write_object(v.tensors["layer0.weight"].oid, bytes(data))


def test_objects_copied_to_another_store_make_the_same_version(store: LineageStore, tmp_path) -> None:
    v = store.commit(_model(), message="m", files={"config.json": b"{}"})
    with LineageStore.init(tmp_path / "other") as other:
        for oid in list(v.referenced_objects()) + [v.id]:
            other.write_object(oid, store.read_object(oid))
        assert other.put_version(Version.from_bytes(other.read_object(v.id)), branch="main") == v.id
        assert other.get_file(v.files["config.json"]) == b"{}"
        assert other.verify().ok


def test_put_version_refuses_a_version_whose_objects_are_absent(store: LineageStore) -> None:
    missing = TensorEntry("d" * 64, "F32", (1,))
    with pytest.raises(ObjectMissing) as info:
        store.put_version(Version(parents=(), tensors={"w": missing}, message="m", time=1.0))
    assert info.value.oid == missing.oid


def test_gc_frees_unreachable_objects_and_keeps_reachable_ones(store: LineageStore) -> None:
    sd = _model()
    keep = store.commit(sd, message="keep", files={"config.json": b"{}"}, optimizer_state={"momentum": torch.ones(4)})
    store.set_ref("experiment", keep.id, None)
    gone = store.commit({"only_here": torch.arange(1000.0)}, parents=[keep.id], message="gone", branch="experiment")
    store.set_ref("experiment", None, gone.id)
    report = store.gc()
    assert report.removed_objects == 2 and report.removed_versions == 1  # the record and its one new tensor
    assert report.bytes_freed >= 4000
    assert not store.has_object(gone.id) and not store.has_object(gone.tensors["only_here"].oid)
    assert all(store.has_object(o) for o in keep.referenced_objects())
    assert store.verify().ok and torch.equal(store.state_dict("main")["layer0.weight"], sd["layer0.weight"])


def test_open_refuses_a_folder_that_is_not_a_repository(tmp_path) -> None:
    with pytest.raises(RepositoryNotFound):
        LineageStore.open(tmp_path)


def test_lineage_errors_share_one_base(store: LineageStore) -> None:
    with pytest.raises(LineageError):
        store.read_object("0" * 64)


def test_concurrent_commits_from_threads_all_land(store: LineageStore) -> None:
    import threading

    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            store.commit(_model(seed=i), message=f"t{i}", branch=f"b{i}")
        except BaseException as e:  # reported below; a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and set(store.branches()) == {"b0", "b1", "b2", "b3"}
    assert store.verify().ok


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_writing_the_good_bytes_again_repairs_a_damaged_object(store: LineageStore, how: str) -> None:
    sd = _model()
    v = store.commit(sd, message="a")
    oid = v.tensors[next(iter(v.tensors))].oid
    good = store.read_object(oid)
    _damage(store, oid, how)
    assert not store.has_intact_object(oid)
    store.write_object(oid, good)  # what sync does with a copy fetched from a peer
    assert store.has_intact_object(oid) and store.verify().ok
    _damage(store, oid, how)
    store.commit(sd, message="b")  # a local merge producing the same tensor repairs it too
    assert store.verify().ok
