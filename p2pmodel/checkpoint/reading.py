"""Reading checkpoints: a `.safetensors` file, or a folder of them (sharded or not).

Reading is lazy. `open_checkpoint(path)` parses only the safetensors headers (names, dtypes,
shapes, offsets), validates them, and loads a tensor when asked (`reader.get(name)`, through
`safetensors.safe_open`, memory-mapped), so walking a model costs about one tensor of memory.
A folder may be sharded: when `model.safetensors.index.json` is present it is the authority
(every shard it lists must exist and hold exactly the tensors it maps there). Small side files
(`config.json`, `generation_config.json`, tokenizer files) are kept as `extra_files`.

Pickle checkpoints (`.bin`, `.pt`, `.pth`, `.ckpt`, ...) are refused, never loaded: unpickling
runs arbitrary code. The error says how to convert them.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from p2pmodel.checkpoint.errors import (
    CheckpointError,
    CheckpointNotFound,
    CorruptCheckpoint,
    DuplicateTensor,
    MissingShard,
    PickleCheckpointRefused,
    ShardIndexMismatch,
    UnknownTensor,
)
from p2pmodel.checkpoint.format import INDEX_NAME, PICKLE_SUFFIXES, nbytes
from p2pmodel.dtypes import DTYPES

__all__ = ["CheckpointReader", "open_checkpoint", "MAX_EXTRA_FILE_BYTES"]

log = logging.getLogger(__name__)

# Files next to the weights that are weights in other formats: neither tensors nor side files.
_OTHER_WEIGHT_SUFFIXES = (".gguf", ".onnx", ".h5", ".msgpack", ".npz", ".npy")
MAX_EXTRA_FILE_BYTES = 64 * 2**20  # tokenizer.json of big vocabularies is ~20 MB
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


@dataclass(frozen=True)
class _Slot:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the data in the file
    nbytes: int


def _is_pickle(path: Path) -> bool:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError:
        return False
    # torch.save's zip container, or a raw pickle stream (protocol 2+ starts with 0x80).
    return magic == b"PK\x03\x04" or (len(magic) >= 2 and magic[0] == 0x80 and magic[1] <= 5)


def _read_header(path: Path) -> tuple[dict[str, _Slot], dict[str, str]]:
    """Parse and validate one safetensors header. Raises `CorruptCheckpoint` naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                if _is_pickle(path):
                    raise PickleCheckpointRefused(path)
                raise CorruptCheckpoint(path, f"file is {size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                if _is_pickle(path):
                    raise PickleCheckpointRefused(path)
                raise CorruptCheckpoint(path, f"header length {n} does not fit a {size}-byte file")
            raw = f.read(n)
    except OSError as e:
        raise CorruptCheckpoint(path, f"cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(path, f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpoint(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCheckpoint(path, "__metadata__ must map strings to strings")
    data_start, data_len = 8 + n, size - 8 - n
    slots: dict[str, _Slot] = {}
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = dtype in DTYPES and all(isinstance(d, int) and d >= 0 for d in shape)
            ok = ok and isinstance(b, int) and isinstance(e, int) and 0 <= b <= e <= data_len
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CorruptCheckpoint(path, f"bad header entry for tensor {name!r}: {info!r}"[:300])
        if e - b != nbytes(dtype, shape):
            raise CorruptCheckpoint(path, f"tensor {name!r}: {e - b} bytes for {dtype}{list(shape)}")
        slots[name] = _Slot(path, dtype, shape, data_start + b, e - b)
        spans.append((b, e))
    spans.sort()
    end = 0
    for b, e in spans:
        if b != end:  # the spec forbids holes and overlaps
            raise CorruptCheckpoint(path, f"data offsets overlap or leave a hole at byte {end}")
        end = e
    if end != data_len:
        raise CorruptCheckpoint(path, f"{data_len - end} trailing bytes after the last tensor")
    return slots, metadata


class CheckpointReader:
    """Lazy access to the tensors of a checkpoint. Build it with `open_checkpoint`.

    `names()` and `meta()` need only the headers; `get()` loads one tensor (memory-mapped).
    Use it as a context manager, or call `close()`, to release the open shard files.
    """

    def __init__(self, path: Path, slots: dict[str, _Slot], metadata: dict[str, str],
                 extra: dict[str, Path], skipped: list[str]):
        self.path = path
        self.metadata: dict[str, str] = metadata
        self.skipped_files: list[str] = skipped  # side files not kept (too big, other formats)
        self._slots = slots
        self._extra = extra
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        """Tensor names, sorted."""
        return sorted(self._slots)

    def __contains__(self, name: str) -> bool:
        return name in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def meta(self, name: str) -> tuple[str, tuple[int, ...]]:
        """`(dtype, shape)` of a tensor, from the header; dtype is a safetensors name ("F32")."""
        s = self._slot(name)
        return s.dtype, s.shape

    def layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """`{name: (dtype, shape)}` for every tensor, sorted by name."""
        return {n: (self._slots[n].dtype, self._slots[n].shape) for n in self.names()}

    def nbytes(self, name: str | None = None) -> int:
        """Bytes of one tensor's data, or of all tensors when `name` is None."""
        if name is not None:
            return self._slot(name).nbytes
        return sum(s.nbytes for s in self._slots.values())

    def file_of(self, name: str) -> Path:
        """The file that holds a tensor."""
        return self._slot(name).file

    def files(self) -> list[Path]:
        """The safetensors files read, sorted."""
        return sorted({s.file for s in self._slots.values()})

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor. Raises `UnknownTensor`, or `CorruptCheckpoint` if the file cannot be read."""
        from safetensors import SafetensorError, safe_open

        slot = self._slot(name)
        handle = self._handles.get(slot.file)
        try:
            if handle is None:
                handle = self._handles[slot.file] = safe_open(str(slot.file), framework="pt")
            return handle.get_tensor(name)  # type: ignore[attr-defined]
        except (SafetensorError, OSError) as e:
            raise CorruptCheckpoint(slot.file, f"reading tensor {name!r}: {e}") from None

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """`(name, tensor)` in name order, one tensor loaded at a time."""
        for name in self.names():
            yield name, self.get(name)

    def extra_files(self) -> dict[str, bytes]:
        """Side files kept with the weights (config.json, tokenizer files, ...): name -> bytes."""
        out = {}
        for name, p in sorted(self._extra.items()):
            try:
                out[name] = p.read_bytes()
            except OSError as e:
                raise CheckpointError(p, f"{p}: cannot read: {e.strerror or e}") from None
        return out

    def close(self) -> None:
        self._handles.clear()  # safe_open handles unmap when dropped

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _slot(self, name: str) -> _Slot:
        try:
            return self._slots[name]
        except KeyError:
            raise UnknownTensor(self.path, name) from None


def open_checkpoint(path: str | os.PathLike) -> CheckpointReader:
    """Open a `.safetensors` file or a folder of them (sharded or not) for lazy reading.

    Raises:
        CheckpointNotFound: nothing at `path`, or a folder without safetensors files.
        PickleCheckpointRefused: a pickle checkpoint (file, or folder holding only pickles).
        CorruptCheckpoint: a header that cannot be parsed or is inconsistent.
        MissingShard / ShardIndexMismatch: the index names a missing shard or disagrees with it.
        DuplicateTensor: one tensor name in two files.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFound(p)
    if p.is_file():
        if _is_pickle(p) and p.suffix.lower() != ".safetensors":
            raise PickleCheckpointRefused(p)
        slots, metadata = _read_header(p)
        return CheckpointReader(p, slots, metadata, {}, [])
    return _open_folder(p)


def _open_folder(folder: Path) -> CheckpointReader:
    entries = sorted(e for e in folder.iterdir() if e.is_file() and not e.name.startswith("."))
    weights = [e for e in entries if e.suffix == ".safetensors"]
    index_path = folder / INDEX_NAME
    if not weights:
        if any(e.suffix.lower() in PICKLE_SUFFIXES for e in entries):
            raise PickleCheckpointRefused(folder)
        raise CheckpointNotFound(folder, "no *.safetensors files in this folder")
    if index_path.is_file():
        shards = _shards_from_index(index_path, folder)
        unlisted = [w.name for w in weights if w not in shards]
        if unlisted:
            log.warning("%s: ignoring %s, not listed in %s", folder, ", ".join(unlisted), INDEX_NAME)
    else:
        shards = weights
    slots: dict[str, _Slot] = {}
    metadata: dict[str, str] = {}
    for shard in shards:
        shard_slots, shard_meta = _read_header(shard)
        for name, slot in shard_slots.items():
            if name in slots:
                raise DuplicateTensor(name, slots[name].file, shard)
            slots[name] = slot
        for k, v in shard_meta.items():
            metadata.setdefault(k, v)
    if index_path.is_file():
        _check_index(index_path, folder, slots)
    extra: dict[str, Path] = {}
    skipped: list[str] = []
    for e in entries:
        if e.suffix == ".safetensors" or e.name == INDEX_NAME:
            continue
        suffix = e.suffix.lower()
        if suffix in PICKLE_SUFFIXES or suffix in _OTHER_WEIGHT_SUFFIXES:
            skipped.append(e.name)
        elif e.stat().st_size > MAX_EXTRA_FILE_BYTES:
            skipped.append(e.name)
        else:
            extra[e.name] = e
    if skipped:
        log.warning("%s: not keeping %s (other weight formats or too large)", folder, ", ".join(skipped))
    return CheckpointReader(folder, slots, metadata, extra, skipped)


def _load_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text("utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise ShardIndexMismatch(index_path, "not a valid index (need a JSON object with a "
                                 "'weight_map' of tensor name -> shard file)") from None
    return weight_map


def _shards_from_index(index_path: Path, folder: Path) -> list[Path]:
    shards = []
    for shard in sorted(set(_load_index(index_path).values())):
        if Path(shard).name != shard:  # no paths outside the folder
            raise ShardIndexMismatch(index_path, f"shard name {shard!r} is not a plain file name")
        if not (folder / shard).is_file():
            raise MissingShard(index_path, shard)
        shards.append(folder / shard)
    return shards


def _check_index(index_path: Path, folder: Path, slots: dict[str, _Slot]) -> None:
    weight_map = _load_index(index_path)
    for name, shard in weight_map.items():
        if name not in slots:
            raise ShardIndexMismatch(index_path, f"tensor {name!r} is mapped to {shard}, which lacks it")
        if slots[name].file != folder / shard:
            raise ShardIndexMismatch(
                index_path, f"tensor {name!r} is mapped to {shard} but found in {slots[name].file.name}")
    extra = sorted(set(slots) - set(weight_map))
    if extra:
        raise ShardIndexMismatch(index_path, f"tensor {extra[0]!r} ({slots[extra[0]].file.name}) is not in the index")
