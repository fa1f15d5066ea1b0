"""Sparse coding for the delta codec: top-k selection and compact index sets.

- `topk_indices` finds the k entries of largest magnitude over one or several arrays
  (per-tensor top-k passes one array, global top-k passes them all). A full sort or
  `torch.topk` over 25M entries takes over a second on one core, so it estimates the
  threshold from a fixed-seed random sample, keeps the candidates above it (a vectorised
  compare), and selects exactly among those. Ties at the threshold go to the lowest
  (array, index), so the selection is a pure function of the input.
- Index sets travel as sorted gaps in LEB128 varints, or as a bitmap where that is
  smaller (density above about 1/8): `encode_indices` picks per tensor. Both are coded
  and decoded with whole-array numpy operations: the loops below run over byte positions
  (at most `MAX_VARINT_BYTES`), never over elements.

The decoders here check the content (varint bounds, ranges, counts) and raise
`MalformedDelta`; the sizes they get were validated by `delta_format.py` first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from p2pmodel.protocols.codec_errors import MalformedDelta

__all__ = [
    "MAX_VARINT_BYTES",
    "topk_indices",
    "encode_indices",
    "decode_gaps",
    "bitmap_size",
    "encode_bitmap",
    "decode_bitmap",
]

MAX_VARINT_BYTES = 7  # 49 bits: every gap is < numel, and the codec caps numel below 2**48
_SAMPLE = 1 << 16  # at most this many entries (1/64 of them) sampled to estimate the threshold
_EXACT_BELOW = 1 << 18  # fewer entries than this: select exactly, no sampling


def topk_indices(magnitudes: Sequence[np.ndarray], k: int, seed: int = 0) -> list[np.ndarray]:
    """Indices of the k largest entries over the concatenation of flat `magnitudes`.

    Args:
        magnitudes: 1-D non-negative float32 arrays (|delta| of each tensor), no NaN.
        k: how many entries to keep in total, 0 <= k.
        seed: seed of the threshold sample (selection is exact whatever the seed).

    Returns:
        One sorted int64 index array per input array; their sizes sum to min(k, total).
    """
    sizes = [a.size for a in magnitudes]
    total = sum(sizes)
    if k <= 0:
        return [np.zeros(0, np.int64) for _ in magnitudes]
    if k >= total:
        return [np.arange(s, dtype=np.int64) for s in sizes]
    if total < _EXACT_BELOW:
        return _select_among(magnitudes, [np.arange(s, dtype=np.int64) for s in sizes], k)
    sample = _sample(magnitudes, sizes, total, seed)
    expected = k * sample.size / total  # sample entries expected above the true threshold
    rank = int(expected + 4.0 * math.sqrt(expected) + 16)  # a margin of over 4 sigma
    while True:
        if rank >= sample.size:
            candidates = [np.arange(s, dtype=np.int64) for s in sizes]
            break
        threshold = np.partition(sample, sample.size - rank)[sample.size - rank]
        candidates = [np.flatnonzero(a >= threshold) for a in magnitudes]
        if sum(c.size for c in candidates) >= k:
            break
        rank *= 4  # unlucky sample (or many ties): widen and retry
    return _select_among(magnitudes, candidates, k)


def _sample(magnitudes: Sequence[np.ndarray], sizes: list[int], total: int, seed: int) -> np.ndarray:
    """A stratified random sample of the concatenation: one uniform pick in each of up to
    `_SAMPLE` equal strata. Random rather than strided, since a stride can align with a matrix's rows
    and see one column only; stratified, so the positions come out sorted without a sort."""
    m = min(_SAMPLE, total // 64)  # >= 4096, as total >= _EXACT_BELOW
    width = total // m
    positions = np.arange(m, dtype=np.int64) * width
    positions += np.random.default_rng(seed).integers(0, width, m)
    bounds = np.cumsum([0, *sizes])
    parts = []
    for i, a in enumerate(magnitudes):
        lo, hi = np.searchsorted(positions, [bounds[i], bounds[i + 1]])
        if hi > lo:
            parts.append(a[positions[lo:hi] - bounds[i]])
    return np.concatenate(parts)


def _select_among(magnitudes: Sequence[np.ndarray], candidates: list[np.ndarray], k: int) -> list[np.ndarray]:
    """The k largest of the candidate entries (sorted index arrays), ties to the lowest position."""
    values = np.concatenate([a[c] for a, c in zip(magnitudes, candidates)])  # in (array, index) order
    kth = np.partition(values, values.size - k)[values.size - k]  # the k-th largest value
    keep = values > kth
    ties = values == kth
    need = k - int(np.count_nonzero(keep))
    keep |= ties & (np.cumsum(ties) <= need)  # the first `need` ties in (array, index) order
    out, start = [], 0
    for c in candidates:
        out.append(c[keep[start : start + c.size]])
        start += c.size
    return out


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    """Bytes per LEB128 varint of each non-negative int64 value (1 for 0)."""
    lengths = np.ones(values.size, np.int64)
    top = int(values.max()) if values.size else 0
    for j in range(1, MAX_VARINT_BYTES):
        if top < (1 << (7 * j)):
            break  # no value needs byte j: skip the remaining whole-array passes
        lengths += values >= (1 << (7 * j))
    return lengths


def _gaps(indices: np.ndarray) -> np.ndarray:
    """First index, then (next - previous - 1): strictly increasing indices give gaps >= 0."""
    gaps = np.empty(indices.size, np.int64)
    if indices.size:
        gaps[0] = indices[0]
        np.subtract(indices[1:], indices[:-1], out=gaps[1:])
        gaps[1:] -= 1
    return gaps


def encode_indices(indices: np.ndarray, numel: int) -> tuple[str, bytes]:
    """Strictly increasing int64 indices in [0, numel) as ("gaps", varints) or ("bitmap", bits),
    whichever is smaller (gaps on a tie)."""
    gaps = _gaps(indices)
    lengths = _varint_lengths(gaps)
    ends = np.cumsum(lengths)  # one past each varint's last byte
    size = int(ends[-1]) if ends.size else 0
    if size > bitmap_size(numel):
        return "bitmap", encode_bitmap(indices, numel)
    out = np.empty(size, np.uint8)
    starts = ends - lengths
    out[starts] = (gaps & 0x7F) | ((lengths > 1) << 7)  # byte 0 of every varint
    for j in range(1, int(lengths.max()) if lengths.size else 0):
        has = np.flatnonzero(lengths > j)  # varints with a byte number j (few: the long gaps)
        out[starts[has] + j] = ((gaps[has] >> (7 * j)) & 0x7F) | ((lengths[has] > j + 1) << 7)
    return "gaps", out.tobytes()


def decode_gaps(buf: bytes, count: int, numel: int, where: str) -> np.ndarray:
    """Inverse of `encode_indices`' "gaps", checked: exactly `count` canonical varints filling `buf`,
    decoding to strictly increasing indices in [0, numel). Raises `MalformedDelta`."""
    data = np.frombuffer(buf, dtype=np.uint8)
    if count == 0:
        if data.size:
            raise MalformedDelta(where, "index bytes for zero entries")
        return np.zeros(0, np.int64)
    last = np.flatnonzero(data < 0x80)  # a byte without the continuation bit ends a varint
    if last.size != count:
        raise MalformedDelta(where, f"{last.size} complete varints, {count} declared")
    if last[-1] != data.size - 1:
        raise MalformedDelta(where, "bytes after the last varint")
    starts = np.empty(count, np.int64)
    starts[0] = 0
    starts[1:] = last[:-1] + 1
    lengths = last - starts + 1
    if int(lengths.max()) > MAX_VARINT_BYTES:
        raise MalformedDelta(where, f"varint longer than {MAX_VARINT_BYTES} bytes")
    if np.any((data[last] == 0) & (lengths > 1)):
        raise MalformedDelta(where, "non-canonical varint (trailing zero byte)")
    gaps = (data[starts] & 0x7F).astype(np.int64)
    for j in range(1, int(lengths.max())):
        has = lengths > j
        gaps[has] |= (data[starts[has] + j] & 0x7F).astype(np.int64) << (7 * j)
    if int(gaps.max()) >= numel:
        raise MalformedDelta(where, "index gap beyond the tensor")
    gaps[1:] += 1
    indices = np.cumsum(gaps)  # strictly increasing, as every gap after the first is >= 1
    # Each step is < 2**48, so a sum that wrapped past 2**63 must leave negative entries.
    if int(indices[-1]) >= numel or int(indices.min()) < 0:
        raise MalformedDelta(where, f"index {int(indices[-1])} out of range for {numel} entries")
    return indices


def bitmap_size(numel: int) -> int:
    """Bytes of a bitmap over numel entries."""
    return (numel + 7) // 8


def encode_bitmap(indices: np.ndarray, numel: int) -> bytes:
    """One bit per entry, little-endian bit order, set where an index is."""
    bits = np.zeros(numel, np.bool_)
    bits[indices] = True
    return np.packbits(bits, bitorder="little").tobytes()


def decode_bitmap(buf: bytes, count: int, numel: int, where: str) -> np.ndarray:
    """Inverse of `encode_indices`' "bitmap", checked: exactly `count` bits set, padding bits clear."""
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")
    if np.any(bits[numel:]):
        raise MalformedDelta(where, "bitmap padding bits set")
    indices = np.flatnonzero(bits[:numel])
    if indices.size != count:
        raise MalformedDelta(where, f"bitmap has {indices.size} entries set, {count} declared")
    return indices.astype(np.int64, copy=False)
