"""Checkpoint reading and writing (p2pmodel.checkpoint).

Guarantees: a `.safetensors` file or folder (sharded, with or without an index) reads back
exactly what was written, lazily; broken inputs (corrupt headers, missing shards, duplicate
names, pickles) raise typed errors that name the file and never load a pickle; writers
produce files the safetensors library reads, atomically, streaming from mappings, iterators
or a layout known in advance, and HF folders handle tied embeddings as transformers does.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from p2pmodel.checkpoint import (
    INDEX_NAME,
    CheckpointNotFound,
    CorruptCheckpoint,
    DuplicateTensor,
    LayoutMismatch,
    MissingShard,
    OutputExists,
    PickleCheckpointRefused,
    ShardIndexMismatch,
    UnknownTensor,
    WriteFailed,
    dtype_name,
    open_checkpoint,
    write_hf_folder,
    write_safetensors,
)
from p2pmodel.errors import P2PModelError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(4, 3, generator=g),
        "b16": torch.randn(5, generator=g).to(torch.bfloat16),
        "h16": torch.randn(2, 2, generator=g).to(torch.float16),
        "ids": torch.arange(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
    }


def _layout(sd: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {k: (dtype_name(v.dtype), tuple(v.shape)) for k, v in sd.items()}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- reading


def test_file_reads_back_every_dtype_exactly(tmp_path):
    sd = _tensors()
    save_file(sd, tmp_path / "m.safetensors", metadata={"format": "pt"})
    with open_checkpoint(tmp_path / "m.safetensors") as r:
        assert r.names() == sorted(sd)
        _assert_same(dict(r.items()), sd)
        assert r.metadata == {"format": "pt"}


def test_meta_reports_dtype_and_shape_from_the_header(tmp_path):
    save_file(_tensors(), tmp_path / "m.safetensors")
    with open_checkpoint(tmp_path / "m.safetensors") as r:
        assert r.meta("b16") == ("BF16", (5,))
        assert r.meta("scalar") == ("F32", ())
        assert r.nbytes("w") == 4 * 3 * 4


def test_unknown_tensor_name_is_a_typed_error(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "m.safetensors")
    with open_checkpoint(tmp_path / "m.safetensors") as r, pytest.raises(UnknownTensor, match="'nope'"):
        r.get("nope")


def test_folder_of_unindexed_files_is_read_as_one_model_with_side_files(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "part1.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "part2.safetensors")
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "tokenizer.json").write_text("{}")
    with open_checkpoint(tmp_path) as r:
        assert r.names() == ["a", "b"]
        assert r.extra_files() == {"config.json": b'{"model_type": "gpt2"}', "tokenizer.json": b"{}"}


def test_pickle_and_other_weight_files_in_a_folder_are_not_kept_as_side_files(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    (tmp_path / "training_args.bin").write_bytes(b"\x80\x04junk")
    (tmp_path / "model.onnx").write_bytes(b"x")
    with open_checkpoint(tmp_path) as r:
        assert r.extra_files() == {}
        assert sorted(r.skipped_files) == ["model.onnx", "training_args.bin"]


def test_sharded_folder_with_index_reads_every_tensor_once(tmp_path):
    sd = _tensors()
    write_hf_folder(tmp_path / "out", sd, {"config.json": b"{}"}, max_shard_bytes=40)
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "out" / INDEX_NAME).is_file()
    with open_checkpoint(tmp_path / "out") as r:
        _assert_same(dict(r.items()), sd)


def test_index_naming_a_missing_shard_is_an_error_naming_it(tmp_path):
    write_hf_folder(tmp_path / "out", _tensors(), max_shard_bytes=40)
    victim = sorted((tmp_path / "out").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(MissingShard, match=victim.name):
        open_checkpoint(tmp_path / "out")


def test_index_disagreeing_with_shard_contents_is_an_error(tmp_path):
    write_hf_folder(tmp_path / "out", _tensors(), max_shard_bytes=40)
    index_path = tmp_path / "out" / INDEX_NAME
    index = json.loads(index_path.read_text())
    other = next(f for f in index["weight_map"].values() if f != index["weight_map"]["w"])
    index["weight_map"]["w"] = other
    index_path.write_text(json.dumps(index))
    with pytest.raises(ShardIndexMismatch, match="'w'"):
        open_checkpoint(tmp_path / "out")


def test_duplicate_tensor_across_files_names_both_files(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "x.safetensors")
    save_file({"a": torch.zeros(2)}, tmp_path / "y.safetensors")
    with pytest.raises(DuplicateTensor) as e:
        open_checkpoint(tmp_path)
    assert "x.safetensors" in str(e.value) and "y.safetensors" in str(e.value)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda raw: raw[:5], id="truncated-length"),
        pytest.param(lambda raw: struct.pack("<Q", 10**6) + raw[8:], id="length-too-big"),
        pytest.param(lambda raw: raw[:8] + b"{not json" + raw[17:], id="garbage-json"),
        pytest.param(lambda raw: raw[:-3], id="truncated-data"),
        pytest.param(lambda raw: raw + b"xyz", id="trailing-bytes"),
    ],
)
def test_corrupt_file_raises_corrupt_checkpoint_naming_the_file(tmp_path, damage):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(2)}, path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptCheckpoint, match="m.safetensors"):
        open_checkpoint(path)


def test_header_with_wrong_byte_count_for_shape_is_corrupt(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CorruptCheckpoint, match="'a'"):
        open_checkpoint(path)


def test_pickle_file_is_refused_with_a_conversion_hint_and_never_loaded(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    torch.save({"a": torch.ones(2)}, path)

    def no_unpickling(*a, **k):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(PickleCheckpointRefused) as e:
        open_checkpoint(path)
    msg = str(e.value)
    assert "weights_only=True" in msg and "save_file" in msg and str(path) in msg


def test_pickle_disguised_as_safetensors_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"a": torch.ones(2)}, path)
    with pytest.raises(PickleCheckpointRefused):
        open_checkpoint(path)


def test_folder_holding_only_pickles_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PickleCheckpointRefused, match="pickle"):
        open_checkpoint(tmp_path)


def test_missing_path_and_empty_folder_are_not_found(tmp_path):
    with pytest.raises(CheckpointNotFound):
        open_checkpoint(tmp_path / "nothing")
    with pytest.raises(CheckpointNotFound, match="no \\*.safetensors"):
        open_checkpoint(tmp_path)


def test_checkpoint_errors_are_p2pmodel_errors():
    assert issubclass(CorruptCheckpoint, P2PModelError) and issubclass(PickleCheckpointRefused, P2PModelError)


# ----------------------------------------------------------------------------- writing


def test_written_file_loads_with_the_safetensors_library(tmp_path):
    sd = _tensors()
    write_safetensors(tmp_path / "o.safetensors", sd, {"note": "x"})
    _assert_same(load_file(tmp_path / "o.safetensors"), sd)
    with open_checkpoint(tmp_path / "o.safetensors") as r:
        assert r.metadata == {"note": "x"}


def test_writing_from_an_iterator_equals_writing_from_a_mapping(tmp_path):
    sd = _tensors()
    write_safetensors(tmp_path / "a.safetensors", sd)
    write_safetensors(tmp_path / "b.safetensors", iter(sd.items()))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert _leftovers(tmp_path) == []


def test_writing_with_a_layout_accepts_tensors_in_any_order(tmp_path):
    sd = _tensors()
    write_safetensors(tmp_path / "o.safetensors", reversed(list(sd.items())), layout=_layout(sd))
    _assert_same(load_file(tmp_path / "o.safetensors"), sd)


def test_tensors_sharing_storage_are_written_as_separate_copies(tmp_path):
    w = torch.randn(3, 2)
    write_safetensors(tmp_path / "o.safetensors", {"emb": w, "head": w, "view": w[1]})
    got = load_file(tmp_path / "o.safetensors")
    assert torch.equal(got["emb"], w) and torch.equal(got["head"], w) and torch.equal(got["view"], w[1])


def test_tensor_not_matching_the_layout_fails_and_leaves_nothing(tmp_path):
    sd = _tensors()
    lay = _layout(sd) | {"w": ("F32", (3, 4))}
    with pytest.raises(LayoutMismatch, match="'w'"):
        write_safetensors(tmp_path / "o.safetensors", sd, layout=lay)
    assert list(tmp_path.iterdir()) == []


def test_tensor_missing_from_the_stream_fails_and_leaves_nothing(tmp_path):
    sd = _tensors()
    lay = _layout(sd) | {"extra": ("F32", (2,))}
    with pytest.raises(LayoutMismatch, match="never arrived"):
        write_safetensors(tmp_path / "o.safetensors", sd, layout=lay)
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_through_an_hf_folder_leaves_no_output(tmp_path):
    def stream():
        yield "a", torch.ones(2)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_hf_folder(tmp_path / "out", stream())
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep")
    with pytest.raises(OutputExists):
        write_safetensors(out, {"a": torch.ones(1)})
    assert out.read_bytes() == b"keep"
    write_safetensors(out, {"a": torch.ones(1)}, overwrite=True)
    assert torch.equal(load_file(out)["a"], torch.ones(1))


def test_hf_folder_overwrite_replaces_the_old_contents(tmp_path):
    out = tmp_path / "out"
    write_hf_folder(out, {"a": torch.ones(1)}, {"old.txt": b"x"})
    with pytest.raises(OutputExists):
        write_hf_folder(out, {"a": torch.zeros(1)})
    write_hf_folder(out, {"a": torch.zeros(1)}, {"config.json": b"{}"}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert _leftovers(tmp_path) == []


def test_hf_shards_have_transformers_names_index_and_format_metadata(tmp_path):
    sd = _tensors()
    write_hf_folder(tmp_path / "out", sd, max_shard_bytes=40)
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    n = len(set(index["weight_map"].values()))
    assert set(index["weight_map"].values()) == {f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    with open_checkpoint(tmp_path / "out" / index["weight_map"]["w"]) as r:
        assert r.metadata == {"format": "pt"}


def test_tied_output_embedding_is_omitted_when_config_ties_it(tmp_path):
    w = torch.randn(10, 4)
    sd = {"transformer.wte.weight": w, "lm_head.weight": w.clone()}
    write_hf_folder(tmp_path / "tied", sd, {"config.json": b'{"tie_word_embeddings": true}'})
    write_hf_folder(tmp_path / "untied", sd, {"config.json": b'{"tie_word_embeddings": false}'})
    assert open_checkpoint(tmp_path / "tied").names() == ["transformer.wte.weight"]
    assert open_checkpoint(tmp_path / "untied").names() == ["lm_head.weight", "transformer.wte.weight"]


def test_side_file_names_cannot_escape_the_folder(tmp_path):
    with pytest.raises(LayoutMismatch):
        write_hf_folder(tmp_path / "out", {"a": torch.ones(1)}, {"../evil": b""})
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == []


def test_os_refusing_the_write_is_a_typed_error_naming_the_destination(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    dest = tmp_path / "file" / "o.safetensors"  # its parent is a file, so no folder can be made
    with pytest.raises(WriteFailed, match="o.safetensors"):
        write_safetensors(dest, {"a": torch.ones(1)})
    with pytest.raises(WriteFailed, match="out"):
        write_hf_folder(tmp_path / "file" / "out", {"a": torch.ones(1)})
