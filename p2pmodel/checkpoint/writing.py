"""Writing checkpoints: one `.safetensors` file, or a Hugging Face folder (shards, index, side files).

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
import os
import shutil
import struct
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from p2pmodel.atomic import TMP_PREFIX, fsync_dir, replacing
from p2pmodel.checkpoint.errors import LayoutMismatch, OutputExists, WriteFailed
from p2pmodel.checkpoint.format import INDEX_NAME, SINGLE_NAME, Layout, OnTensor, TensorSource, nbytes
from p2pmodel.dtypes import DTYPES, ITEMSIZE, UnsupportedDtype, dtype_name

__all__ = ["write_safetensors", "write_hf_folder"]


@contextmanager
def _os_error_names(dest: Path) -> Iterator[None]:
    """Report an OSError while writing `dest` as WriteFailed naming `dest`, not a temp file."""
    try:
        yield
    except OSError as e:
        raise WriteFailed(dest, e.strerror or str(e)) from None


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
        size = nbytes(dtype, shape)
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
            yield name, self.file.read(nbytes(*self.layout[name]))

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
                offset += nbytes(*layout[n])
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
            nb = nbytes(*kept[n])
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
                "metadata": {"total_size": sum(nbytes(*e) for e in kept.values())},
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
