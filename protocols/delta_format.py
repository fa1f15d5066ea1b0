"""The delta payload format, and its checked decoder (the encoders live in `codec.py`).

Payload (msgpack; format 1)::

    {"format": 1, "tensors": [entry, ...]}
    entry    = {"name": str, "dtype": "F32"|"F16"|"BF16"|"F64",   # dtype of the original delta
                "shape": [int, ...], "enc": str, "params": {...}, "sections": [section, ...]}
    section  = [0, raw_len, raw bytes] | [1, raw_len, one zstd frame of raw_len bytes]

    enc     params                              sections (raw contents, little endian)
    "fp16"  {}                                  [fp16 values]
    "bf16"  {}                                  [bf16 values]
    "int8"  {"block": B}                        [float32 scales, int8 codes]
    "topk"  {"k": k, "bits": 8|4, "block": B,   [index set, float32 scales, codes: int8, or
             "index": "gaps"|"bitmap"}           two 4-bit (code + 8) per byte, low nibble first]
    "lowbit" {"bits": 1|2, "block": B}          [float32 scales, codes packed 8 / bits per byte,
                                                 first code in the lowest bits, padding bits 0]

B is entries per scale (0: one scale for the tensor). Top-k's scales and codes cover its k
values in index order; its index set is `sparse.encode_indices`: varint gaps (no larger than the bitmap,
or the encoder would have sent the bitmap) or the bitmap. Values decode as
`float32(code) * scale` (or exact fp16/bf16 widening), scattered into a zero float32
tensor, then rounded to the entry's dtype: the same bytes give the same bits everywhere.
A "lowbit" code c (dense, no zero level) is the level `2 * c - (2**bits - 1)`: +-1 for 1 bit,
+-1 or +-3 for 2 bits, and decodes as `float32(level) * scale`. Old decoders refuse "lowbit"
with `MalformedDelta` (unknown encoder): a sender that uses it needs peers that read it.

`check_payload` validates every header field and declared size (against the payload, the
manifest and `max_bytes`) before anything is allocated; `decode_entry` then inflates zstd
sections no further than their declared size and checks contents (indices, scales,
finiteness). Both raise only `CodecError` subclasses.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch
import zstandard

from p2pmodel.dtypes import DTYPES as ALL_DTYPES
from p2pmodel.dtypes import ITEMSIZE
from p2pmodel.protocols import quant, sparse
from p2pmodel.protocols.codec_errors import DeltaTooLarge, MalformedDelta, ManifestMismatch
from p2pmodel.protocols.schema import is_int

__all__ = [
    "FORMAT_VERSION",
    "ENCODERS",
    "DTYPES",
    "MAX_FINITE",
    "MAX_NDIM",
    "MAX_NUMEL",
    "MAX_BLOCK",
    "MAX_NAME_CHARS",
    "SECTION_RAW",
    "SECTION_ZSTD",
    "CheckedEntry",
    "check_payload",
    "decode_entry",
]

assert sys.byteorder == "little", "raw sections are little endian, as numpy's native arrays on this host"

FORMAT_VERSION = 1
ENCODERS = ("fp16", "bf16", "int8", "topk", "lowbit")
DTYPES = {name: ALL_DTYPES[name] for name in ("F32", "F16", "BF16", "F64")}  # the dtypes a delta may have
# Largest finite value a decoded entry may take in each dtype (F64 decodes via float32).
# Scales are refused above MAX_FINITE / 128, so that no int8 code can overflow to Inf.
MAX_FINITE = {"F32": 3.4028235e38, "F16": 65504.0, "BF16": 3.3895314e38, "F64": 3.4028235e38}
MAX_NDIM = 32
MAX_NUMEL = 1 << 47  # below 2**48, the varint bound of `sparse`
MAX_BLOCK = 1 << 24
MAX_NAME_CHARS = 1024
SECTION_RAW, SECTION_ZSTD = 0, 1
_ZSTD_WINDOW = 1 << 23  # bytes; frames needing a larger window are refused (levels <= 19 fit)

_PARAMS = {
    "fp16": set(),
    "bf16": set(),
    "int8": {"block"},
    "topk": {"k", "bits", "block", "index"},
    "lowbit": {"bits", "block"},
}
_ENTRY_KEYS = {"name", "dtype", "shape", "enc", "params", "sections"}


@dataclass(frozen=True)
class Section:
    """One byte section, its header checked."""

    where: str  # location for error messages
    comp: int  # SECTION_RAW or SECTION_ZSTD
    raw_len: int  # bytes once inflated
    data: bytes


@dataclass(frozen=True)
class CheckedEntry:
    """A tensor entry whose header and section sizes are consistent and within limits."""

    where: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    enc: str
    params: dict[str, Any]
    sections: list[Section]


def check_payload(data: bytes, manifest: Mapping[str, Any], max_bytes: int) -> list[CheckedEntry]:
    """Parse the envelope and check every entry's header; allocates nothing tensor-sized.

    Raises:
        MalformedDelta, ManifestMismatch, DeltaTooLarge (see `codec.decode`).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedDelta("payload", f"expected bytes, got {type(data).__name__}")
    try:
        # msgpack bounds every length by the buffer's; max_str_len bounds names and keys.
        envelope = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, max_str_len=4 * MAX_NAME_CHARS)
    except Exception as exc:  # any parser failure means the peer sent garbage
        raise MalformedDelta("payload", f"not msgpack: {type(exc).__name__}: {exc}") from None
    _keys(envelope, "payload", {"format", "tensors"})
    if envelope["format"] != FORMAT_VERSION or not is_int(envelope["format"]):
        version = f"{envelope['format']!r:.40}"
        raise MalformedDelta("format", f"version {version} is not supported (this build reads {FORMAT_VERSION})")
    tensors = envelope["tensors"]
    if not isinstance(tensors, list):
        raise MalformedDelta("tensors", "not a list")
    entries: list[CheckedEntry] = []
    names: set[str] = set()
    cost = 0
    for i, raw_entry in enumerate(tensors):
        entry = _check_entry(f"tensors[{i}]", raw_entry, manifest)
        if entry.name in names:
            raise MalformedDelta(entry.where, f"tensor {entry.name!r} appears twice")
        names.add(entry.name)
        cost += entry.numel * ITEMSIZE[entry.dtype]
        cost += sum(s.raw_len for s in entry.sections if s.comp == SECTION_ZSTD)
        if cost > max_bytes:
            raise DeltaTooLarge(cost, max_bytes)
        entries.append(entry)
    return entries


def _keys(obj: object, where: str, keys: set[str]) -> None:
    if not isinstance(obj, dict):
        raise MalformedDelta(where, f"expected a map, got {type(obj).__name__}")
    if set(obj) != keys:
        raise MalformedDelta(where, f"keys {sorted(map(str, obj))} instead of {sorted(keys)}")


def _int(v: object, where: str, lo: int, hi: int) -> int:
    if not is_int(v) or not lo <= v <= hi:
        raise MalformedDelta(where, f"expected an integer in [{lo}, {hi}], got {v!r:.40}")
    return v


def _manifest_shape(manifest: Mapping[str, Any], name: str) -> tuple[int, ...] | None:
    entry = manifest.get(name)
    if entry is None:
        return None
    shape = entry.shape if hasattr(entry, "shape") else entry[1]
    return tuple(int(d) for d in shape)


def _check_entry(where: str, e: object, manifest: Mapping[str, Any]) -> CheckedEntry:
    _keys(e, where, _ENTRY_KEYS)
    assert isinstance(e, dict)
    name = e["name"]
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise MalformedDelta(f"{where}.name", f"expected a name of 1 to {MAX_NAME_CHARS} characters")
    dtype = e["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise MalformedDelta(f"{where}.dtype", f"{dtype!r:.40} is not one of {sorted(DTYPES)}")
    shape_list = e["shape"]
    if not isinstance(shape_list, list) or len(shape_list) > MAX_NDIM:
        raise MalformedDelta(f"{where}.shape", f"expected a list of at most {MAX_NDIM} sizes")
    shape = tuple(_int(d, f"{where}.shape", 0, MAX_NUMEL) for d in shape_list)
    numel = math.prod(shape)
    if numel > MAX_NUMEL:
        raise MalformedDelta(f"{where}.shape", f"{numel} entries exceed the limit of {MAX_NUMEL}")
    expected = _manifest_shape(manifest, name)
    if expected != shape:
        raise ManifestMismatch(name, expected, shape)
    enc = e["enc"]
    if not isinstance(enc, str) or enc not in ENCODERS:
        raise MalformedDelta(f"{where}.enc", f"{enc!r:.40} is not one of {ENCODERS}")
    params = e["params"]
    _keys(params, f"{where}.params", _PARAMS[enc])
    sizes = _section_sizes(f"{where}.params", enc, params, numel)
    sections = e["sections"]
    if not isinstance(sections, list) or len(sections) != len(sizes):
        raise MalformedDelta(f"{where}.sections", f"expected a list of {len(sizes)} sections")
    checked = [
        _check_section(f"{where}.sections[{j}]", s, lo, hi) for j, (s, (lo, hi)) in enumerate(zip(sections, sizes))
    ]
    return CheckedEntry(where, name, dtype, shape, numel, enc, params, checked)


def _section_sizes(where: str, enc: str, params: dict, numel: int) -> list[tuple[int, int]]:
    """(min, max) raw length of each section, from the validated params."""
    if enc in ("fp16", "bf16"):
        return [(2 * numel, 2 * numel)]
    block = _int(params["block"], f"{where}.block", 0, MAX_BLOCK)
    if enc == "int8":
        scales = 4 * quant.block_count(numel, block)
        return [(scales, scales), (numel, numel)]
    if enc == "lowbit":
        bits = params["bits"]
        if not is_int(bits) or bits not in quant.LOWBIT_BITS:
            raise MalformedDelta(f"{where}.bits", f"expected one of {quant.LOWBIT_BITS}, got {bits!r:.40}")
        scales = 4 * quant.block_count(numel, block)
        codes = -(-numel * bits // 8)
        return [(scales, scales), (codes, codes)]
    k = _int(params["k"], f"{where}.k", 0, numel)
    bits = params["bits"]
    if not is_int(bits) or bits not in (4, 8):
        raise MalformedDelta(f"{where}.bits", f"expected 4 or 8, got {bits!r:.40}")
    index = params["index"]
    bitmap = sparse.bitmap_size(numel)
    if index == "gaps":
        index_size = (k, min(k * sparse.MAX_VARINT_BYTES, bitmap) if k else 0)
    elif index == "bitmap":
        index_size = (bitmap, bitmap)
    else:
        raise MalformedDelta(f"{where}.index", f"expected 'gaps' or 'bitmap', got {index!r:.40}")
    scales = 4 * quant.block_count(k, block)
    values = k if bits == 8 else (k + 1) // 2
    return [index_size, (scales, scales), (values, values)]


def _check_section(where: str, s: object, lo: int, hi: int) -> Section:
    if not isinstance(s, list) or len(s) != 3:
        raise MalformedDelta(where, "expected [comp, raw_len, bytes]")
    comp, raw_len, data = s
    if comp not in (SECTION_RAW, SECTION_ZSTD) or not is_int(comp):
        raise MalformedDelta(where, f"unknown compression {comp!r:.40}")
    if not is_int(raw_len) or not lo <= raw_len <= hi:
        raise MalformedDelta(where, f"raw length {raw_len!r:.40} outside [{lo}, {hi}]")
    if not isinstance(data, bytes):
        raise MalformedDelta(where, "section data is not bytes")
    if comp == SECTION_RAW and len(data) != raw_len:
        raise MalformedDelta(where, f"{len(data)} bytes, {raw_len} declared")
    if comp == SECTION_ZSTD and len(data) >= raw_len:
        raise MalformedDelta(where, "zstd section no smaller than its raw length")
    return Section(where, comp, raw_len, data)


def _inflate(s: Section) -> bytes:
    """The section's raw bytes; a zstd frame is read no further than raw_len + 1 bytes."""
    if s.comp == SECTION_RAW:
        return s.data
    try:
        frame = zstandard.get_frame_parameters(s.data)
        if frame.content_size != s.raw_len or frame.dict_id != 0:
            raise MalformedDelta(s.where, f"zstd frame declares {frame.content_size} bytes, section {s.raw_len}")
        dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_WINDOW)
        reader = dctx.stream_reader(s.data, read_across_frames=False)
        out = bytearray()
        while len(out) <= s.raw_len:
            chunk = reader.read(s.raw_len + 1 - len(out))
            if not chunk:
                break
            out += chunk
    except (zstandard.ZstdError, ValueError) as exc:
        raise MalformedDelta(s.where, f"zstd: {exc}") from None
    if len(out) != s.raw_len:
        raise MalformedDelta(s.where, f"zstd frame inflates to {len(out)}+ bytes, {s.raw_len} declared")
    return bytes(out)


def _scales(raw: bytes, where: str, dtype: str) -> np.ndarray:
    scales = np.frombuffer(raw, dtype="<f4")
    if scales.size:
        lo, hi = float(scales.min()), float(scales.max())  # NaN fails both tests below
        if not (lo >= 0 and hi <= MAX_FINITE[dtype] / 128):
            raise MalformedDelta(where, f"scale outside [0, {MAX_FINITE[dtype] / 128:.6g}] for {dtype}")
    return scales


def decode_entry(e: CheckedEntry) -> torch.Tensor:
    """Decode one checked entry into a tensor of its dtype and shape. Raises `MalformedDelta`."""
    raws = [_inflate(s) for s in e.sections]
    if e.enc in ("fp16", "bf16"):
        x = quant.from_half_bytes(raws[0], e.enc)
    elif e.enc == "int8":
        scales = _scales(raws[0], e.sections[0].where, e.dtype)
        x = quant.dequantize_blockwise(scales, np.frombuffer(raws[1], dtype=np.int8), e.params["block"])
    elif e.enc == "lowbit":
        scales = _scales(raws[0], e.sections[0].where, e.dtype)
        codes, clean = quant.unpack_bits(raws[1], e.numel, e.params["bits"])
        if not clean:
            raise MalformedDelta(e.sections[1].where, "padding bits set")
        x = quant.dequantize_blockwise(scales, quant.lowbit_levels(codes, e.params["bits"]), e.params["block"])
    else:
        x = _decode_topk(e, raws)
    tensor = torch.from_numpy(x).reshape(e.shape).to(DTYPES[e.dtype])
    if e.enc in ("fp16", "bf16") and e.numel:
        lo, hi = torch.aminmax(tensor.reshape(-1))  # Inf/NaN in the values, or too big for the dtype
        if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
            raise MalformedDelta(e.sections[0].where, f"values are not finite in {e.dtype}")
    return tensor


def _decode_topk(e: CheckedEntry, raws: list[bytes]) -> np.ndarray:
    k, bits, block = e.params["k"], e.params["bits"], e.params["block"]
    if e.params["index"] == "gaps":
        indices = sparse.decode_gaps(raws[0], k, e.numel, e.sections[0].where)
    else:
        indices = sparse.decode_bitmap(raws[0], k, e.numel, e.sections[0].where)
    scales = _scales(raws[1], e.sections[1].where, e.dtype)
    codes = np.frombuffer(raws[2], dtype=np.int8) if bits == 8 else quant.unpack_int4(raws[2], k)
    out = np.zeros(e.numel, np.float32)  # calloc: pages nobody writes stay shared zeros
    out[indices] = quant.dequantize_blockwise(scales, codes, block)
    return out
