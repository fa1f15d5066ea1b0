"""`merge_checkpoints` streams whole checkpoints through the methods, and bad input writes nothing.

Guarantees: the output folder holds, for every tensor, exactly what `merge_tensor` gives for
that tensor (so the per-method references in test_merge_methods.py carry over), in the
inputs' dtype, sharded when large, with the base's config.json; TIES' whole-model trim
matches a reference over the concatenated task vector; DARE's result for a tensor does not
depend on the other tensors; missing tensors follow mergekit's rule only when asked; and every
bad input raises a typed error and leaves no folder (and no temp folder) behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from p2pmodel.merge import (
    BaseRequired,
    DtypeMismatch,
    InputError,
    OutputExists,
    ShapeMismatch,
    TensorMissing,
    UnmergeableTensor,
    merge_checkpoints,
    merge_tensor,
)

LAYOUT = {
    "embed.weight": (32, 8),
    "layers.0.attn.weight": (8, 8),
    "layers.0.attn.bias": (8,),
    "layers.1.mlp.weight": (16, 8),
    "norm.weight": (8,),
}


def make_model(folder: Path, seed: int, *, base: dict | None = None, scale: float = 0.1,
               dtype=torch.float32, config: dict | None = None, drop: str | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in LAYOUT.items():
        t = torch.randn(shape, generator=g)
        tensors[name] = (base[name] + scale * t) if base else t
    tensors = {k: v.to(dtype) for k, v in tensors.items() if k != drop}
    tensors["position_ids"] = torch.arange(8)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "tiny", "seed": seed}))
    return tensors


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture
def zoo(tmp_path):
    """A base and three fine-tunes of it, as folders."""
    base = make_model(tmp_path / "base", 0, config={"model_type": "tiny", "from": "base"})
    models = [make_model(tmp_path / f"m{i}", i, base=base, scale=0.05 * i) for i in (1, 2, 3)]
    return tmp_path, base, models


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": [0.3, 0.5, 0.7], "weights": [1, 0.5, 0.5]}),
    ("dare_ties", {"density": 0.5, "seed": 11}),
    ("linear", {"weights": [2, 1, 1]}),
    ("centered_clip", {"tau": 0.1}),
])
def test_each_tensor_is_what_merge_tensor_gives(zoo, method, params):
    root, base, models = zoo
    seed = params.pop("seed", 0)
    paths = [root / f"m{i}" for i in (1, 2, 3)]
    merge_checkpoints(method, paths, base=None if method == "linear" else root / "base",
                      output=root / "out", seed=seed, **params)
    out = read_folder(root / "out")
    for name in LAYOUT:
        want = merge_tensor(method, [m[name] for m in models], None if method == "linear" else base[name],
                            seed=seed, name=name, **params)
        torch.testing.assert_close(out[name], want, rtol=0, atol=0)


def test_config_json_comes_from_the_base(zoo):
    root, _, _ = zoo
    merge_checkpoints("ties", [root / "m1", root / "m2"], base=root / "base", output=root / "out")
    assert json.loads((root / "out" / "config.json").read_text())["from"] == "base"


def test_output_keeps_the_inputs_dtype(tmp_path):
    base = make_model(tmp_path / "base", 0, dtype=torch.bfloat16)
    for i in (1, 2):
        make_model(tmp_path / f"m{i}", i, base=base, dtype=torch.bfloat16)
    merge_checkpoints("task_arithmetic", [tmp_path / "m1", tmp_path / "m2"], base=tmp_path / "base",
                      output=tmp_path / "out")
    assert read_folder(tmp_path / "out")["layers.0.attn.weight"].dtype == torch.bfloat16


def test_large_outputs_are_sharded_with_an_index(zoo):
    root, base, models = zoo
    merge_checkpoints("linear", [root / "m1", root / "m2"], output=root / "out", max_shard_bytes=600)
    index = json.loads((root / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    want = merge_tensor("linear", [models[0]["embed.weight"], models[1]["embed.weight"]], None)
    torch.testing.assert_close(read_folder(root / "out")["embed.weight"], want, rtol=0, atol=0)


def test_integer_tensors_are_copied(zoo):
    root, _, _ = zoo
    merge_checkpoints("median", [root / "m1", root / "m2", root / "m3"], output=root / "out")
    assert torch.equal(read_folder(root / "out")["position_ids"], torch.arange(8))


def test_ties_model_scope_trims_over_the_whole_task_vector(zoo):
    root, base, models = zoo
    density = 0.2
    # reference: per model, keep the int(density * N) largest |delta| over all float tensors
    trimmed = []
    for m in models:
        flat = torch.cat([(m[n] - base[n]).reshape(-1) for n in LAYOUT])
        k = int(density * flat.numel())
        threshold = flat.abs().sort(descending=True).values[k - 1]
        trimmed.append({n: torch.where((m[n] - base[n]).abs() >= threshold, m[n] - base[n], 0.0) for n in LAYOUT})
    merge_checkpoints("ties", [root / f"m{i}" for i in (1, 2, 3)], base=root / "base", output=root / "out",
                      density=density, scope="model")
    out = read_folder(root / "out")
    for n in LAYOUT:
        want = merge_tensor("ties", [base[n] + t[n] for t in trimmed], base[n])  # density 1: no more trim
        torch.testing.assert_close(out[n], want, rtol=1e-6, atol=1e-6)


def test_dare_result_for_a_tensor_does_not_depend_on_the_other_tensors(zoo, tmp_path):
    root, base, models = zoo
    name = "layers.1.mlp.weight"
    lone = tmp_path / "lone"
    lone.mkdir()
    for i, m in enumerate([base, *models]):
        save_file({name: m[name]}, str(lone / f"{i}.safetensors"))
    merge_checkpoints("dare_linear", [lone / f"{i}.safetensors" for i in (1, 2, 3)], base=lone / "0.safetensors",
                      output=tmp_path / "a", density=0.5, seed=5)
    merge_checkpoints("dare_linear", [root / f"m{i}" for i in (1, 2, 3)], base=root / "base",
                      output=tmp_path / "b", density=0.5, seed=5)
    assert torch.equal(read_folder(tmp_path / "a")[name], read_folder(tmp_path / "b")[name])


def test_missing_tensor_names_the_tensor_and_the_model_and_writes_nothing(zoo):
    root, base, _ = zoo
    make_model(root / "holey", 4, base=base, drop="norm.weight")
    with pytest.raises(TensorMissing) as e:
        merge_checkpoints("ties", [root / "m1", root / "holey"], base=root / "base", output=root / "out")
    assert e.value.tensor == "norm.weight" and e.value.model.endswith("holey")
    assert not (root / "out").exists() and leftovers(root) == []


def test_allow_missing_merges_over_the_models_that_have_the_tensor(zoo):
    root, base, models = zoo
    holey = make_model(root / "holey", 4, base=base, drop="norm.weight")
    report = merge_checkpoints("ties", [root / "m1", root / "holey"], base=root / "base", output=root / "out",
                               weights=[1, 3], allow_missing=True)
    out = read_folder(root / "out")
    torch.testing.assert_close(out["norm.weight"], merge_tensor("ties", [models[0]["norm.weight"]], base["norm.weight"],
                                                                weights=[1]), rtol=0, atol=0)
    n = "embed.weight"
    torch.testing.assert_close(out[n], merge_tensor("ties", [models[0][n], holey[n]], base[n], weights=[1, 3]),
                               rtol=0, atol=0)
    assert report.partial == {"norm.weight": [str(root / "holey")]}


def test_shape_mismatch_is_rejected_and_nothing_written(zoo):
    root, _, _ = zoo
    odd = dict(load_file(str(root / "m2" / "model.safetensors")))
    odd["embed.weight"] = odd["embed.weight"][:16]
    (root / "odd").mkdir()
    save_file(odd, str(root / "odd" / "model.safetensors"))
    with pytest.raises(ShapeMismatch, match="embed.weight"):
        merge_checkpoints("linear", [root / "m1", root / "odd"], output=root / "out")
    assert not (root / "out").exists() and leftovers(root) == []


def test_dtype_mismatch_is_rejected(zoo):
    root, _, _ = zoo
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(root / "m2" / "model.safetensors")).items()}
    (root / "half").mkdir()
    save_file(half, str(root / "half" / "model.safetensors"))
    with pytest.raises(DtypeMismatch):
        merge_checkpoints("linear", [root / "m1", root / "half"], output=root / "out")
    assert not (root / "out").exists()


def test_differing_integer_tensors_fail_and_leave_no_temp_folder(zoo):
    root, _, _ = zoo
    other = dict(load_file(str(root / "m2" / "model.safetensors")))
    other["position_ids"] = torch.arange(8).flip(0)
    (root / "other").mkdir()
    save_file(other, str(root / "other" / "model.safetensors"))
    with pytest.raises(UnmergeableTensor, match="position_ids"):
        merge_checkpoints("linear", [root / "m1", root / "other"], output=root / "out")
    assert not (root / "out").exists() and leftovers(root) == []


def test_existing_output_is_refused_without_force(zoo):
    root, _, _ = zoo
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExists):
        merge_checkpoints("linear", [root / "m1", root / "m2"], output=root / "out")
    assert (root / "out" / "keep.txt").read_text() == "mine"


def test_force_replaces_the_output(zoo):
    root, _, _ = zoo
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("old")
    merge_checkpoints("linear", [root / "m1", root / "m2"], output=root / "out", force=True)
    assert not (root / "out" / "keep.txt").exists() and (root / "out" / "model.safetensors").exists()


def test_output_may_not_be_an_input_even_with_force(zoo):
    root, _, _ = zoo
    with pytest.raises(OutputExists, match="input"):
        merge_checkpoints("linear", [root / "m1", root / "m2"], output=root / "m2", force=True)
    assert (root / "m2" / "model.safetensors").exists()


def test_pickle_input_is_refused(zoo):
    root, _, _ = zoo
    (root / "pickled").mkdir()
    (root / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(InputError, match="pickle"):
        merge_checkpoints("linear", [root / "m1", root / "pickled"], output=root / "out")


def test_ties_without_base_is_refused_before_reading(zoo):
    root, _, _ = zoo
    with pytest.raises(BaseRequired):
        merge_checkpoints("ties", [root / "m1", root / "m2"], output=root / "out")
