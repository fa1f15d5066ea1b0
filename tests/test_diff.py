"""The diff of two versions (p2pmodel.lineage.diff).

Guarantees: per-tensor L2 change, relative change and changed fraction equal an independent
computation; unchanged (equal oid), added and removed tensors are classified without loading
anything; totals aggregate the changed tensors as one vector; odd values (NaN, -0.0, huge
integers, reshaped tensors) are handled as documented; `diff_versions` works on a store.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import pytest
import torch

from p2pmodel.lineage.diff import compare_tensors, diff_manifests


@dataclass(frozen=True)
class Entry:
    oid: str
    dtype: str
    shape: tuple[int, ...]


def _entry(t: torch.Tensor) -> Entry:
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return Entry(hashlib.sha256(repr((t.dtype, tuple(t.shape))).encode() + raw).hexdigest(),
                 str(t.dtype), tuple(t.shape))


def _diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    loaded = []

    def loader(side):
        def load(name):
            loaded.append(name)
            return side[name]
        return load

    report = diff_manifests({k: _entry(v) for k, v in a.items()}, {k: _entry(v) for k, v in b.items()},
                            loader(a), loader(b))
    return report, loaded


def test_changed_tensor_figures_match_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50, 20, generator=g)
    b = a.clone()
    b[::3] += torch.randn(17, 20, generator=g)
    report, _ = _diff({"w": a}, {"w": b})
    (line,) = report.tensors
    d = (b.double() - a.double())
    assert line.status == "changed"
    assert line.l2_change == pytest.approx(d.norm().item(), rel=1e-12)
    assert line.relative_change == pytest.approx(d.norm().item() / a.double().norm().item(), rel=1e-12)
    assert line.changed_fraction == pytest.approx((a != b).double().mean().item())


def test_unchanged_added_and_removed_tensors_are_never_loaded():
    x = torch.ones(3)
    report, loaded = _diff({"same": x, "gone": x}, {"same": x.clone(), "new": x})
    assert loaded == []
    assert {t.name: t.status for t in report.tensors} == {"gone": "removed", "new": "added", "same": "unchanged"}
    assert report.totals.counts == {"added": 1, "removed": 1, "changed": 0, "unchanged": 1}


def test_changed_tensors_are_loaded_once_per_side():
    report, loaded = _diff({"a": torch.zeros(2), "b": torch.zeros(2)}, {"a": torch.ones(2), "b": torch.zeros(2)})
    assert loaded == ["a", "a"]


def test_totals_treat_the_changed_tensors_as_one_vector():
    a = {"x": torch.tensor([3.0, 0.0]), "y": torch.tensor([0.0, 4.0]), "z": torch.tensor([1.0])}
    b = {"x": torch.tensor([3.0, 1.0]), "y": torch.tensor([0.0, 6.0]), "z": torch.tensor([1.0])}
    t = _diff(a, b)[0].totals
    assert t.l2_change == pytest.approx(math.sqrt(1 + 4))
    assert t.norm_a == pytest.approx(5.0)
    assert t.relative_change == pytest.approx(math.sqrt(5) / 5)
    assert (t.changed_entries, t.compared_entries) == (2, 5)


def test_nan_in_the_same_place_counts_as_unchanged_entry():
    a = torch.tensor([float("nan"), 1.0, 2.0])
    b = torch.tensor([float("nan"), 1.0, 5.0])
    (line,) = _diff({"w": a}, {"w": b})[0].tensors
    assert line.changed_entries == 1 and line.l2_change == pytest.approx(3.0)


def test_negative_zero_differs_in_bytes_but_not_in_value():
    (line,) = _diff({"w": torch.tensor([0.0])}, {"w": torch.tensor([-0.0])})[0].tensors
    assert line.status == "changed" and line.changed_entries == 0 and line.l2_change == 0.0


def test_integers_beyond_float64_precision_are_compared_exactly():
    big = 2**60
    (line,) = _diff({"i": torch.tensor([big])}, {"i": torch.tensor([big + 1])})[0].tensors
    assert line.changed_entries == 1


def test_relative_change_from_a_zero_tensor_is_infinite():
    (line,) = _diff({"w": torch.zeros(2)}, {"w": torch.ones(2)})[0].tensors
    assert line.relative_change == math.inf
    assert line.to_json()["relative_change"] == "inf"


def test_reshaped_tensor_is_changed_everywhere_without_a_norm():
    report, loaded = _diff({"w": torch.zeros(2, 3)}, {"w": torch.zeros(3, 2)})
    (line,) = report.tensors
    assert line.reshaped and line.l2_change is None and line.changed_fraction == 1.0
    assert loaded == []


def test_dtype_change_compares_values():
    a = torch.tensor([1.0, 2.5])
    (line,) = _diff({"w": a}, {"w": a.to(torch.float16)})[0].tensors
    assert line.status == "changed" and line.changed_entries == 0


def test_compare_tensors_chunks_give_the_same_result_as_one_pass(monkeypatch):
    import p2pmodel.lineage.diff as diff

    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    whole = compare_tensors(a, b)
    monkeypatch.setattr(diff, "_CHUNK", 7)
    chunked = compare_tensors(a, b)
    assert chunked[3] == whole[3]
    assert chunked[:3] == pytest.approx(whole[:3], rel=1e-12)


def test_json_form_has_the_documented_fields():
    j = _diff({"w": torch.zeros(2)}, {"w": torch.tensor([0.0, 1.0])})[0].to_json()
    assert set(j) == {"a", "b", "tensors", "totals", "files"}
    assert set(j["tensors"][0]) == {
        "name", "status", "dtype_a", "dtype_b", "shape_a", "shape_b", "l2_change", "norm_a", "norm_b",
        "relative_change", "changed_entries", "changed_fraction", "numel", "reshaped"}
    assert set(j["totals"]) == {"counts", "l2_change", "norm_a", "relative_change", "changed_entries",
                                "compared_entries", "changed_fraction"}


def test_diff_versions_on_a_store_loads_only_changed_tensors(tmp_path, monkeypatch):
    from p2pmodel.lineage import LineageStore
    from p2pmodel.lineage.diff import diff_versions

    store = LineageStore.init(tmp_path / "repo", durable=False)
    a = {"keep": torch.ones(4), "move": torch.zeros(3)}
    store.commit(a, message="a", files={"config.json": b"{}"})
    store.commit(a | {"move": torch.tensor([0.0, 3.0, 4.0])}, message="b", files={"config.json": b"{ }"})
    loaded = []
    real = store.get_tensor
    monkeypatch.setattr(store, "get_tensor", lambda e, needed_by=None: loaded.append(e.oid) or real(e, needed_by))
    report = diff_versions(store, "main~1", "main")
    assert len(loaded) == 2 and {t.name: t.status for t in report.tensors} == {"keep": "unchanged", "move": "changed"}
    assert report.totals.l2_change == pytest.approx(5.0)
    assert report.files == {"config.json": "changed"}
    assert (report.a, report.b) == (store.resolve("main~1"), store.resolve("main"))
