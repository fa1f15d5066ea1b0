"""Reading and writing checkpoints: a `.safetensors` file, a folder of them, a Hugging Face folder.

Reading is lazy. `open_checkpoint(path)` parses only the safetensors headers (names, dtypes,
shapes, offsets), validates them, and loads a tensor when asked (`reader.get(name)`, through
`safetensors.safe_open`, memory-mapped), so walking a model costs about one tensor of memory.
A folder may be sharded: when `model.safetensors.index.json` is present it is the authority
(every shard it lists must exist and hold exactly the tensors it maps there). Small side files
(`config.json`, `generation_config.json`, tokenizer files) are kept as `extra_files`.

Pickle checkpoints (`.bin`, `.pt`, `.pth`, `.ckpt`, ...) are refused, never loaded: unpickling
runs arbitrary code. The error says how to convert them.

Writing streams. `write_safetensors` and `write_hf_folder` take tensors as a mapping or an
iterable of `(name, tensor)` pairs. With a `layout` (name -> (dtype, shape), e.g. from a
version's manifest) the headers are written first and each arriving tensor is written at its
offset, in any order; without one, an iterable is first spooled to a temporary file. Either
way memory stays near one tensor. Output appears atomically: a temp file or folder, fsync,
rename. Shard files carry `{"format": "pt"}` metadata because `transformers` requires it.

Tied weights: `transformers.save_pretrained` omits the output embedding when the config ties
it to the input embedding (GPT-2's `lm_head.weight`), and `from_pretrained` re-ties it on load,
overriding any stored copy. `write_hf_folder` does the same, so dropping it never changes the
loaded model; `write_safetensors` writes every name it is given (tensors sharing storage are
written as separate copies, losslessly).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Union

import torch

from p2pmodel.atomic import TMP_PREFIX, fsync_dir, replacing
from p2pmodel.dtypes import DTYPES, ITEMSIZE, UnsupportedDtype, dtype_name, torch_dtype
from p2pmodel.errors import P2PModelError

__all__ = [
    "CheckpointError",
    "CheckpointNotFound",
    "PickleCheckpointRefused",
    "CorruptCheckpoint",
    "MissingShard",
    "DuplicateTensor",
    "ShardIndexMismatch",
    "UnknownTensor",
    "OutputExists",
    "LayoutMismatch",
    "WriteFailed",
    "CheckpointReader",
    "open_checkpoint",
    "write_safetensors",
    "write_hf_folder",
    "DTYPES",
    "dtype_name",
    "torch_dtype",
    "INDEX_NAME",
    "SINGLE_NAME",
]

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Files next to the weights that are weights in other formats: neither tensors nor side files.
_OTHER_WEIGHT_SUFFIXES = (".gguf", ".onnx", ".h5", ".msgpack", ".npz", ".npy")
MAX_EXTRA_FILE_BYTES = 64 * 2**20  # tokenizer.json of big vocabularies is ~20 MB
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit

TensorSource = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]
Layout = Mapping[str, tuple[str, tuple[int, ...]]]
OnTensor = Callable[[str, int], None]  # called with (name, bytes written) after each tensor


# ----------------------------------------------------------------------------- errors


class CheckpointError(P2PModelError):
    """A checkpoint cannot be read or written as asked. `path` names the file or folder."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = str(path)
        super().__init__(message)


class CheckpointNotFound(CheckpointError):
    def __init__(self, path: str | os.PathLike, why: str = "no such file or folder"):
        super().__init__(path, f"{path}: {why}")


class PickleCheckpointRefused(CheckpointError):
    """A pickle checkpoint: refused because unpickling runs arbitrary code. Says how to convert."""

    def __init__(self, path: str | os.PathLike):
        p = Path(path)
        src = str(p if p.is_file() else p / "pytorch_model.bin")
        dst = str(p.with_suffix(".safetensors") if p.is_file() else p / SINGLE_NAME)
        self.hint = (
            "python -c \"import torch, safetensors.torch as st; "
            f"sd = torch.load({src!r}, map_location='cpu', weights_only=True); "
            f"st.save_file({{k: v.contiguous().clone() for k, v in sd.items()}}, {dst!r}, metadata={{'format': 'pt'}})\""
        )
        super().__init__(
            path,
            f"{path}: pickle checkpoints are refused (loading one can run arbitrary code); "
            f"convert it to safetensors first, e.g.: {self.hint}",
        )


class CorruptCheckpoint(CheckpointError):
    def __init__(self, path: str | os.PathLike, reason: str):
        self.reason = reason
        super().__init__(path, f"{path}: not a valid safetensors file: {reason}")


class MissingShard(CheckpointError):
    def __init__(self, index: str | os.PathLike, shard: str):
        self.shard = shard
        super().__init__(index, f"{index}: lists shard {shard!r}, which does not exist")


class DuplicateTensor(CheckpointError):
    def __init__(self, name: str, first: str | os.PathLike, second: str | os.PathLike):
        self.name, self.first, self.second = name, str(first), str(second)
        super().__init__(second, f"tensor {name!r} appears twice: in {first} and in {second}")


class ShardIndexMismatch(CheckpointError):
    def __init__(self, index: str | os.PathLike, reason: str):
        self.reason = reason
        super().__init__(index, f"{index}: {reason}")


class UnknownTensor(CheckpointError, KeyError):
    def __init__(self, path: str | os.PathLike, name: str):
        self.name = name
        CheckpointError.__init__(self, path, f"{path}: has no tensor {name!r}")

    __str__ = Exception.__str__  # KeyError would quote the message


class OutputExists(CheckpointError):
    def __init__(self, path: str | os.PathLike):
        super().__init__(path, f"{path} already exists (pass --force to replace it)")


class LayoutMismatch(CheckpointError):
    def __init__(self, path: str | os.PathLike, reason: str):
        self.reason = reason
        super().__init__(path, f"cannot write {path}: {reason}")


class WriteFailed(CheckpointError):
    """The operating system refused to write the output (permissions, disk full, ...)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.reason = reason
        super().__init__(path, f"cannot write {path}: {reason}")


@contextmanager
def _os_error_names(dest: Path) -> Iterator[None]:
    """Report an OSError while writing `dest` as WriteFailed naming `dest`, not a temp file."""
    try:
        yield
    except OSError as e:
        raise WriteFailed(dest, e.strerror or str(e)) from None


# ----------------------------------------------------------------------------- dtypes


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * ITEMSIZE[dtype]


# ----------------------------------------------------------------------------- reading


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
        if e - b != _nbytes(dtype, shape):
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


# ----------------------------------------------------------------------------- writing


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, row-major, without a copy when possible."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _entry_of(name: str, t: torch.Tensor) -> tuple[str, tuple[int, ...]]:
    try:
        return dtype_name(t.dtype), tuple(t.shape)
    except UnsupportedDtype:
        raise LayoutMismatch(name, f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store") from None


def _order(layout: Layout) -> list[str]:
    # Wide dtypes first, then by name, as the safetensors library does: keeps data aligned.
    return sorted(layout, key=lambda n: (-ITEMSIZE[layout[n][0]], n))


def _header_bytes(layout: Layout, names: list[str], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for n in names:
        dtype, shape = layout[n]
        size = _nbytes(dtype, shape)
        header[n] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad with spaces so the data starts 8-aligned
    return struct.pack("<Q", len(raw)) + raw


class _Spool:
    """Tensors from an iterable, parked in a temp file so their layout is known before writing."""

    def __init__(self, directory: Path):
        fd, name = tempfile.mkstemp(prefix=".spool-", dir=directory)
        self.path = Path(name)
        self.file = os.fdopen(fd, "w+b")
        self.layout: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.offsets: dict[str, int] = {}

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.layout:
            raise LayoutMismatch(name, f"tensor {name!r} given twice")
        self.layout[name] = _entry_of(name, t)
        self.offsets[name] = self.file.tell()
        self.file.write(_tensor_bytes(t))

    def items(self) -> Iterator[tuple[str, bytes]]:
        self.file.flush()
        for name in self.layout:
            self.file.seek(self.offsets[name])
            yield name, self.file.read(_nbytes(*self.layout[name]))

    def close(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def _prepare(tensors: TensorSource, layout: Layout | None, workdir: Path
             ) -> tuple[Layout, Iterator[tuple[str, object]], _Spool | None]:
    """Return (layout, iterator of (name, tensor-or-bytes), spool to close)."""
    if layout is not None:
        items = tensors.items() if isinstance(tensors, Mapping) else tensors
        return dict(layout), iter(items), None
    if isinstance(tensors, Mapping):
        lay = {n: _entry_of(n, t) for n, t in tensors.items()}
        return lay, iter(tensors.items()), None
    spool = _Spool(workdir)
    try:
        for name, t in tensors:
            spool.add(name, t)
    except BaseException:
        spool.close()
        raise
    return spool.layout, spool.items(), spool


class _FileSet:
    """Shard files being written: header first, then each tensor at its offset, in any order."""

    def __init__(self, layout: Layout, plan: dict[Path, list[str]], metadata: Mapping[str, str] | None):
        self.layout = layout
        self.where: dict[str, tuple[object, int]] = {}
        self.files = []
        for path, names in plan.items():
            f = open(path, "w+b")
            self.files.append(f)
            header = _header_bytes(layout, names, metadata)
            f.write(header)
            offset = len(header)
            for n in names:
                self.where[n] = (f, offset)
                offset += _nbytes(*layout[n])
            f.truncate(offset)  # the final size, so a short write cannot pass unnoticed
        self.pending = set(self.where)

    def write(self, name: str, value: object, dest: Path) -> int:
        if name not in self.where:
            raise LayoutMismatch(dest, f"tensor {name!r} is not in the layout")
        if name not in self.pending:
            raise LayoutMismatch(dest, f"tensor {name!r} given twice")
        if isinstance(value, torch.Tensor):
            got = _entry_of(name, value)
            if got != tuple(self.layout[name]):
                raise LayoutMismatch(dest, f"tensor {name!r} is {got[0]}{list(got[1])}, "
                                     f"layout says {self.layout[name][0]}{list(self.layout[name][1])}")
            data = _tensor_bytes(value)
        else:
            data = value  # bytes from a spool, already checked
        f, offset = self.where[name]
        f.seek(offset)
        f.write(data)
        self.pending.discard(name)
        return len(data) if isinstance(data, bytes) else data.nbytes

    def finish(self, dest: Path) -> None:
        if self.pending:
            raise LayoutMismatch(dest, f"{len(self.pending)} tensors never arrived, e.g. {min(self.pending)!r}")
        for f in self.files:
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        for f in self.files:
            f.close()


def _layout_values(layout: Layout) -> dict[str, tuple[str, tuple[int, ...]]]:
    out = {}
    for n, (dtype, shape) in layout.items():
        if dtype not in DTYPES:
            raise LayoutMismatch(n, f"tensor {n!r}: unknown dtype {dtype!r}")
        out[n] = (dtype, tuple(int(d) for d in shape))
    return out


def write_safetensors(
    path: str | os.PathLike,
    tensors: TensorSource,
    metadata: Mapping[str, str] | None = None,
    *,
    layout: Layout | None = None,
    overwrite: bool = False,
    on_tensor: OnTensor | None = None,
) -> Path:
    """Write tensors to one `.safetensors` file, atomically (temp file, fsync, rename).

    Args:
        path: the output file.
        tensors: a mapping, or an iterable of `(name, tensor)` (consumed once, streamed).
        metadata: safetensors `__metadata__` (strings to strings).
        layout: `{name: (dtype, shape)}` known in advance (e.g. from a version's manifest): the
            tensors may then arrive in any order and are never spooled.
        overwrite: replace an existing file; otherwise `OutputExists`.
        on_tensor: progress callback, `(name, bytes)` after each tensor.
    Returns the path written. Raises `OutputExists`, `LayoutMismatch`, `WriteFailed`.
    """
    with _os_error_names(Path(path)):
        return _write_safetensors(path, tensors, metadata, layout=layout, overwrite=overwrite, on_tensor=on_tensor)


def _write_safetensors(
    path: str | os.PathLike,
    tensors: TensorSource,
    metadata: Mapping[str, str] | None = None,
    *,
    layout: Layout | None = None,
    overwrite: bool = False,
    on_tensor: OnTensor | None = None,
) -> Path:
    """The body of `write_safetensors`."""
    dest = Path(path)
    if dest.exists() and not overwrite:
        raise OutputExists(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    lay, items, spool = _prepare(tensors, _layout_values(layout) if layout is not None else None, dest.parent)
    files = None
    try:
        with replacing(dest) as tmp:
            files = _FileSet(lay, {tmp: _order(lay)}, metadata)
            for name, value in items:
                n = files.write(name, value, dest)
                if on_tensor:
                    on_tensor(name, n)
            files.finish(dest)
            files.close()
    finally:
        if files:
            files.close()
        if spool:
            spool.close()
    return dest


def _tied_output_names(layout: Layout, extra_files: Mapping[str, bytes]) -> set[str]:
    """Output-embedding tensors that `transformers` re-ties on load and omits on save."""
    try:
        config = json.loads(extra_files["config.json"])
    except (KeyError, ValueError):
        return set()
    if not isinstance(config, dict):
        return set()
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    # transformers' PretrainedConfig defaults tie_word_embeddings to True.
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    if not tied or "lm_head.weight" not in layout:
        return set()
    head = layout["lm_head.weight"]
    for name, entry in layout.items():
        # the input embedding it is tied to: same dtype and shape, an embedding by name
        if name != "lm_head.weight" and tuple(entry) == tuple(head) and (
                name.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight",
                               "embed_in.weight", "tok_embeddings.weight"))):
            return {"lm_head.weight"}
    return set()


def write_hf_folder(
    out_dir: str | os.PathLike,
    tensors: TensorSource,
    extra_files: Mapping[str, bytes] | None = None,
    *,
    max_shard_bytes: int = 5 * 10**9,
    layout: Layout | None = None,
    overwrite: bool = False,
    on_tensor: OnTensor | None = None,
) -> Path:
    """Write a Hugging Face model folder: `model.safetensors`, or shards and an index, plus side files.

    Shards are filled in name order up to `max_shard_bytes` (a tensor larger than that gets a
    shard of its own) and named `model-00001-of-0000N.safetensors` as `transformers` does, with
    `model.safetensors.index.json` (`metadata.total_size`, `weight_map`). A tied output embedding
    is omitted when `config.json` ties it (see the module docstring). The folder appears
    atomically: it is built under a temp name next to `out_dir` and renamed into place; with
    `overwrite`, an existing folder is swapped out after the new one is complete.

    Returns the folder. Raises `OutputExists`, `LayoutMismatch`, `WriteFailed`.
    """
    with _os_error_names(Path(out_dir)):
        return _write_hf_folder(out_dir, tensors, extra_files, max_shard_bytes=max_shard_bytes, layout=layout,
                                overwrite=overwrite, on_tensor=on_tensor)


def _write_hf_folder(
    out_dir: str | os.PathLike,
    tensors: TensorSource,
    extra_files: Mapping[str, bytes] | None = None,
    *,
    max_shard_bytes: int = 5 * 10**9,
    layout: Layout | None = None,
    overwrite: bool = False,
    on_tensor: OnTensor | None = None,
) -> Path:
    """The body of `write_hf_folder`."""
    dest = Path(out_dir)
    extra_files = dict(extra_files or {})
    if dest.exists() and not overwrite:
        raise OutputExists(dest)
    for name in extra_files:
        if Path(name).name != name or name.startswith(".") or name.endswith(".safetensors") or name == INDEX_NAME:
            raise LayoutMismatch(dest, f"side file name {name!r} is not allowed")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f"{TMP_PREFIX}{dest.name}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    spool = files = None
    try:
        lay, items, spool = _prepare(tensors, _layout_values(layout) if layout is not None else None, tmp)
        dropped = _tied_output_names(lay, extra_files)
        kept = {n: e for n, e in lay.items() if n not in dropped}
        groups: list[list[str]] = []
        size = 0
        for n in sorted(kept):
            nb = _nbytes(*kept[n])
            if not groups or (size + nb > max_shard_bytes and groups[-1]):
                groups.append([])
                size = 0
            groups[-1].append(n)
            size += nb
        if not groups:
            groups = [[]]
        if len(groups) == 1:
            plan = {tmp / SINGLE_NAME: _order({n: kept[n] for n in groups[0]})}
        else:
            plan = {tmp / f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": _order({n: kept[n] for n in g})
                    for i, g in enumerate(groups)}
        files = _FileSet(kept, plan, {"format": "pt"})
        for name, value in items:
            if name in dropped:
                continue
            n = files.write(name, value, dest)
            if on_tensor:
                on_tensor(name, n)
        files.finish(dest)
        files.close()
        if len(plan) > 1:
            index = {
                "metadata": {"total_size": sum(_nbytes(*e) for e in kept.values())},
                "weight_map": {n: p.name for p, names in plan.items() for n in sorted(names)},
            }
            index["weight_map"] = dict(sorted(index["weight_map"].items()))
            _write_small(tmp / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
        for name, data in extra_files.items():
            _write_small(tmp / name, data)
        if spool:
            spool.close()
            spool = None
        fsync_dir(tmp, strict=False)
        _swap_into_place(tmp, dest, overwrite)
    finally:
        if files:
            files.close()
        if spool:
            spool.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _write_small(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _swap_into_place(tmp: Path, dest: Path, overwrite: bool) -> None:
    if not dest.exists():
        os.rename(tmp, dest)
    elif not overwrite:
        raise OutputExists(dest)
    else:
        # Two renames: between them `dest` is briefly absent, but never half-written.
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dest, old)
        os.rename(tmp, dest)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    fsync_dir(dest.parent, strict=False)
