"""Fused float32 kernels for TIES and DARE (numba): the same arithmetic as `gta.py`'s torch path.

Why: written as torch ops, TIES and DARE make about fifteen passes over `(n, *shape)` arrays
(abs, top-k, masks, sign, products, sums) and torch's Bernoulli draws cost 11 ns an entry;
that held merges to 0.14-0.18 GB/s of input on one core. Here no task-vector array is made at
all: every pass reads the models and the base (`x_i - base`, recomputed where it is needed, is
cheaper than writing an `(n, size)` array and reading it back, and that array was the merge's
largest working set). TIES reads each model twice (count, mix), DARE three times (L1 norm,
drop, mix); the mix reads all models a block at a time, so it takes them by address (`rows`).
Without a base (`merge_deltas`, the swarm) the same kernels read the task vectors themselves.

What stays bit-identical to the torch path (and so to mergekit, for float32 work):
- every elementwise step is the same IEEE float32 operation in the same order
  (`x - base`, `d * keep`, `* scale`, `* w`, the sums, `/ divisor`, `* lambda`, `base +`;
  numba compiles without fast-math, so nothing is contracted into FMAs);
- the L1 norms of DARE's rescale are still torch's own `abs().sum()` (its cascade
  reduction), over arrays these kernels fill;
- TIES keeps the same entries: every entry above the k-th largest magnitude, then entries
  equal to it in index order (mergekit's stable top-k; see `sparsify.magnitude`);
- DARE draws from the same MT19937 stream, one draw per entry, in memory order (`mt19937.py`).

One difference: sums over models run in model order. torch's `sum(dim=0)` does the same for
up to 4 models; for 5 or more its vectorised reduction regroups the rows in the columns after
the last full block of 4 vectors (which columns those are depends on the CPU's vector width),
so results can differ there in the last bit. Model order gives every peer the same bits.

The kernels are compiled for their one signature when this module is imported (from numba's
on-disk cache after the first time), so a merge does not pay for compiling.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

from p2pmodel.merge.jit import numba as nb
import numpy as np
from numba import types
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic

from p2pmodel.merge.mt19937 import Mt19937, next_block, temper

__all__ = ["MIX_NONE", "MIX_SUM", "MIX_COUNT", "Trim", "abs_delta", "dare_drop", "trim_threshold", "mix"]

MIX_NONE, MIX_SUM, MIX_COUNT = 0, 1, 2  # no sign election; elect by weighted sum; by sign count
_KEEP_ALL, _KEEP_TRIM, _KEEP_BITS = 0, 1, 2  # per model in the mix: no sparsify; TIES' trim; DARE's drop

_F = np.float32
_SAMPLE = 1 << 14  # at most this many entries sampled to bracket the k-th magnitude (2^12..2^16: the
# same speed on the bench: a smaller sample flags more entries to collect, a larger one costs more to partition)
_MIN_SAMPLED = 1 << 16  # smaller tensors are partitioned whole
_STRIDE_PRIMES = (13, 17, 31, 61, 127, 251, 509, 1021, 2039, 4093)  # sample strides, coprime to row lengths
_WINDOW = 4096  # DARE decides this many entries at a time (a multiple of 8: whole bytes of keep bits)


class Trim(NamedTuple):
    """TIES' trim of one task vector: keep `|d| > kth`, and `|d| == kth` at indices below `cut`."""

    kth: float
    cut: int


@intrinsic
def _f4_ptr(typingctx, addr):  # pragma: no cover - compiled
    """A float32 pointer from an address (int64): the mix reads the models where they lie."""
    sig = types.CPointer(types.float32)(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@nb.njit(nogil=True, cache=True, inline="always")
def _row(rows, i, start, count):  # pragma: no cover - compiled
    """Entries `[start, start + count)` of the array at address `rows[i]`, as an array view."""
    return nb.carray(_f4_ptr(rows[i] + 4 * start), count)


def _addresses(arrays: Sequence[np.ndarray], size: int) -> np.ndarray:
    """The data addresses of float32 contiguous arrays of `size` entries (the caller keeps
    them alive while a kernel reads them)."""
    for a in arrays:
        if a.dtype != np.float32 or a.size != size or not a.flags.c_contiguous:
            raise ValueError("mix rows must be contiguous float32 arrays of one size")
    return np.array([a.ctypes.data for a in arrays], dtype=np.int64)


def _flat(x: np.ndarray, base: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """`(x, base, has_base)` flattened for the kernels; without a base, `x` stands in for it
    (never read: `has_base` is False)."""
    flat = x.reshape(-1)
    return flat, (base.reshape(-1) if base is not None else flat), base is not None


@nb.njit("void(f4[::1], f4[::1], b1, f4[::1])", nogil=True, cache=True)
def _abs_delta(x, b, has_base, out):  # pragma: no cover - compiled
    if has_base:
        for j in range(x.size):
            out[j] = abs(x[j] - b[j])
    else:
        for j in range(x.size):
            out[j] = abs(x[j])


def abs_delta(x: np.ndarray, base: np.ndarray | None, out: np.ndarray) -> np.ndarray:
    """`out = |x - base|` (`|x|` without a base): the array DARE's L1 norm sums."""
    flat, b, has_base = _flat(x, base)
    _abs_delta(flat, b, has_base, out.reshape(-1))
    return out


@nb.njit("void(f4[::1], f4[::1], b1, u4[::1], i8[::1], i8, u1[::1], f4[::1])", nogil=True, cache=True)
def _dare_drop(x, b, has_base, mt, pos, threshold, bits, abs_kept):  # pragma: no cover - compiled
    t = np.uint32(threshold)
    low24 = np.uint32(0xFFFFFF)
    draws = np.empty(_WINDOW, dtype=np.uint32)
    keep = np.zeros(_WINDOW, dtype=np.uint8)
    n = x.size
    for j0 in range(0, n, _WINDOW):
        w = min(_WINDOW, n - j0)
        filled = 0
        while filled < w:
            p, m = next_block(mt, pos, w - filled)
            # Simple loops over views rather than over offsets: they vectorise (an index such
            # as `j + q` may be negative as far as numba knows, and its wraparound check blocks
            # vectorisation).
            words, dst = mt[p : p + m], draws[filled : filled + m]
            for q in range(m):
                dst[q] = temper(words[q]) & low24
            filled += m
        xv, bv, av = x[j0 : j0 + w], b[j0 : j0 + w], abs_kept[j0 : j0 + w]
        for q in range(w):
            k = draws[q] < t
            keep[q] = k
            v = xv[q] - bv[q] if has_base else xv[q]
            av[q] = abs(v * (_F(1.0) if k else _F(0.0)))
        if w < _WINDOW:
            keep[w:] = 0
        packed = bits[j0 >> 3 : (j0 + w + 7) >> 3]
        for byte in range(packed.size):
            acc = 0
            for z in range(8):
                acc |= np.int64(keep[8 * byte + z]) << z
            packed[byte] = acc


def dare_drop(x: np.ndarray, base: np.ndarray | None, stream: Mt19937, threshold: int, bits: np.ndarray,
              abs_kept: np.ndarray) -> None:
    """DARE's drop of the task vector `x - base` (`x` itself without a base), with torch's
    Bernoulli keep decisions (see `mt19937.py`), drawing `x.size` words from `stream`. The
    decisions go to `bits` (uint8, `ceil(size / 8)`, entry `j` at bit `j % 8` of byte `j // 8`;
    eight times smaller than a kept copy of the task vector), and `|d * keep|` to `abs_kept`
    (for the L1 rescale)."""
    flat, b, has_base = _flat(x, base)
    _dare_drop(flat, b, has_base, stream.state, stream.pos, threshold, bits.reshape(-1), abs_kept.reshape(-1))


_BLOCK = 512  # positions mixed at a time: (n, 512) float32 stays in L1 (a multiple of 8: whole keep bytes)
_CHUNK = 1 << 20  # entries mixed between two calls of `mix`'s `done` (a multiple of _BLOCK)


@nb.njit("Tuple((i8, i8, b1))(f4[::1], f4[::1], b1, f4, f4, u1[::1])", nogil=True, cache=True)
def _count_band(x, b, has_base, lo, hi, flags):  # pragma: no cover - compiled
    """How many |d| are > hi, how many in [lo, hi] (flagged in `flags`), and whether any is NaN.
    Branch-free, so it vectorises."""
    above = 0
    band = 0
    odd = False
    for j in range(x.size):
        a = abs(x[j] - b[j] if has_base else x[j])
        inside = (a >= lo) & (a <= hi)
        above += a > hi
        band += inside
        flags[j] = inside
        odd |= a != a
    return above, band, odd


@nb.njit("void(f4[::1], f4[::1], b1, u1[::1], f4[::1], i8[::1])", nogil=True, cache=True)
def _collect_band(x, b, has_base, flags, values, where):  # pragma: no cover - compiled
    """The flagged magnitudes and their indices, in index order. Reads the flags eight at a
    time and visits only the set ones (by trailing-zero count): a band of a few percent leaves
    most words empty, and a branch per flag mispredicts. (A plain `if` per entry compiles to a
    masked compress-store, which is slow on x86; this stays a scalar loop.)"""
    words = flags[: flags.size // 8 * 8].view(np.uint64)
    c = 0
    for w in range(words.size):
        bits = words[w]
        while bits != 0:
            j = 8 * w + (trailing_zeros(bits) >> 3)  # flags are 0 or 1: bit 8*byte of a word
            values[c] = abs(x[j] - b[j] if has_base else x[j])
            where[c] = j
            c += 1
            bits &= bits - np.uint64(1)
    for j in range(words.size * 8, x.size):
        if flags[j]:
            values[c] = abs(x[j] - b[j] if has_base else x[j])
            where[c] = j
            c += 1


def _trim(kth: np.float32, need: int, tied: np.ndarray, size: int) -> Trim:
    """Keep the first `need` of the entries `tied` (ascending indices) at magnitude `kth`."""
    return Trim(float(kth), int(tied[need]) if need < tied.size else size)


def _bracket(flat: np.ndarray, b: np.ndarray, has_base: bool, k: int) -> tuple[np.float32, np.float32]:
    """Bounds that hold the k-th largest |d| with high probability, from a strided sample."""
    size = flat.size
    ns = min(size // 16, _SAMPLE)
    stride = next(p for p in reversed(_STRIDE_PRIMES) if size // p >= ns)
    sample = np.abs(flat[::stride] - b[::stride] if has_base else flat[::stride])  # (~ns,)
    ns = sample.size
    q = 1.0 - k / size  # the k-th largest sits at this quantile
    margin = int(4.0 * np.sqrt(ns * q * (1 - q))) + 8  # ~4 standard deviations of its sample rank
    r = int(q * ns)
    lo_r, hi_r = r - margin, r + margin
    picks = [x for x in (lo_r, hi_r) if 0 <= x < ns]
    part = np.partition(sample, picks) if picks else sample
    return (part[lo_r] if lo_r >= 0 else _F(0.0)), (part[hi_r] if hi_r < ns else _F(np.inf))


def _exact(flat: np.ndarray, b: np.ndarray, has_base: bool, k: int) -> Trim:
    """The trim by a full partition of |d| (small tensors, or when the bracket missed)."""
    a = np.abs(flat - b if has_base else flat)
    kth = np.partition(a, a.size - k)[a.size - k]
    need = k - int(np.count_nonzero(a > kth))
    return _trim(kth, need, np.flatnonzero(a == kth), a.size)


def trim_threshold(x: np.ndarray, k: int, flags: np.ndarray | None = None, base: np.ndarray | None = None) -> Trim:
    """TIES' trim of the task vector `d = x - base` (`x` itself without a base) to mergekit's
    stable top-k of `|d|`: every entry above the k-th largest magnitude `kth`, then the entries
    equal to it in index order, those below index `cut`. Nothing is written to `x`.

    A strided sample brackets the k-th magnitude; one vectorised pass counts the entries above
    the bracket and flags those in it; the exact value is found among the flagged ones. If the
    bracket misses (a skewed sample, NaNs) a full partition gives the same answer, slower.
    `flags` is scratch space (uint8, `d.size`).
    """
    flat, b, has_base = _flat(x, base)
    size = flat.size
    if size < _MIN_SAMPLED:
        return _exact(flat, b, has_base, k)
    lo, hi = _bracket(flat, b, has_base, k)
    flags = np.empty(size, dtype=np.uint8) if flags is None else flags[:size]
    above, c, odd = _count_band(flat, b, has_base, _F(lo), _F(hi), flags)
    if odd or not above < k <= above + c:
        return _exact(flat, b, has_base, k)
    values, where = np.empty(c, dtype=np.float32), np.empty(c, dtype=np.int64)
    _collect_band(flat, b, has_base, flags, values, where)
    kth = np.partition(values, c - (k - above))[c - (k - above)]
    need = k - above - int(np.count_nonzero(values > kth))
    return _trim(kth, need, where[values == kth], size)


# _KEEP_LUT[k, z]: 1.0 where bit z of the byte k is set, else 0.0 (a global array: numba
# compiles it in as a constant)
_KEEP_LUT = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(np.float32)


@nb.njit(nogil=True, cache=True, inline="always")
def _unpack_keep(keep_bits, d):  # pragma: no cover - compiled
    """`d *= keep` (1.0 or 0.0, as `dare_drop` decided) from `keep_bits`, eight entries at a
    time through `_KEEP_LUT` (a shift and mask per entry indexed by `q >> 3` does not vectorise)."""
    full = d.size >> 3
    for byte in range(full):
        m, v = _KEEP_LUT[keep_bits[byte]], d[8 * byte : 8 * byte + 8]
        for z in range(8):
            v[z] = v[z] * m[z]
    for q in range(8 * full, d.size):
        d[q] = d[q] * _KEEP_LUT[keep_bits[q >> 3], q & 7]


@nb.njit("void(i8[::1], f4[::1], b1, i8[::1], f4[::1], i8[::1], u1[:, ::1], f4[::1], f4[::1], i8, b1, f4, f4, b1, "
         "f4[::1], i8, i8)", nogil=True, cache=True, error_model="numpy")
def _mix(rows, base, has_base, kind, kth, cut, bits, scale, w, mode, normalize, divisor_const, lam, scale_lam,
         out, begin, end):  # pragma: no cover - compiled
    """Mixes entries `[begin, end)` (`begin` a multiple of _BLOCK). `error_model="numpy"`: a
    division by zero would give IEEE's inf/nan rather than raise, so the division vectorises
    (no divisor here is ever zero: the callers set those to 1, as mergekit does)."""
    n = rows.size
    wd = np.empty((n, _BLOCK), dtype=np.float32)
    votes = np.empty(_BLOCK, dtype=np.float32)
    mixed = np.empty(_BLOCK, dtype=np.float32)
    divisor = np.empty(_BLOCK, dtype=np.float32)
    zero, one = _F(0.0), _F(1.0)
    for j0 in range(begin, end, _BLOCK):
        b = min(_BLOCK, end - j0)
        bv = base[j0 : j0 + b]
        votes[:b] = zero
        for i in range(n):
            # One simple loop per step, each with no branch inside: they vectorise (one loop
            # with the steps' choices inside did not, at 3x the time).
            di = wd[i, :b]
            row = _row(rows, i, j0, b)  # a view: see `_dare_drop` on offsets
            if has_base:
                for q in range(b):
                    di[q] = row[q] - bv[q]
            else:
                di[:] = row
            if kind[i] == _KEEP_TRIM:
                t, c = kth[i], cut[i] - j0
                for q in range(b):
                    a = abs(di[q])
                    di[q] = di[q] * (one if (a > t) | ((a == t) & (q < c)) else zero)
            elif kind[i] == _KEEP_BITS:
                _unpack_keep(bits[i, j0 >> 3 :], di)
            si, wi = scale[i], w[i]
            if mode == MIX_COUNT:
                for q in range(b):
                    v = di[q] * si * wi
                    di[q] = v
                    votes[q] += one if v > zero else (-one if v < zero else zero)
            else:
                for q in range(b):
                    v = di[q] * si * wi
                    di[q] = v
                    votes[q] += v
        mixed[:b] = zero
        if mode == MIX_NONE:
            for i in range(n):
                di = wd[i, :b]
                for q in range(b):
                    mixed[q] += di[q]
            divisor[:b] = divisor_const
        else:
            divisor[:b] = zero
            for i in range(n):
                di, wi = wd[i, :b], w[i]
                for q in range(b):
                    v = di[q]
                    up = votes[q] >= zero  # ties elect +1, as mergekit
                    m = one if ((v > zero) & up) | ((v < zero) & (not up)) else zero
                    mixed[q] += v * m
                    divisor[q] += m * wi
            for q in range(b):
                x = divisor[q]
                divisor[q] = one if x == zero else x
        dest = out[j0 : j0 + b]
        if normalize:
            for q in range(b):
                dest[q] = mixed[q] / divisor[q]
        else:
            dest[:] = mixed[:b]
        if scale_lam:
            for q in range(b):
                dest[q] = dest[q] * lam
        if has_base:
            for q in range(b):
                dest[q] = bv[q] + dest[q]


def mix(
    rows: Sequence[np.ndarray],
    weights: np.ndarray,
    *,
    mode: int,
    normalize: bool,
    divisor: float,
    lam: float,
    scale: np.ndarray | None = None,
    trims: Sequence[Trim | None] | None = None,
    keep_bits: np.ndarray | None = None,
    dropped: Sequence[bool] | None = None,
    base: np.ndarray | None = None,
    out: np.ndarray,
    done: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Generalized task arithmetic's mix into `out` (`(size,)`) of the task vectors `rows[i] - base`
    (`n` float32 contiguous arrays of `size` entries; without a base, the rows are the task vectors).

    Per model: optional trim (`trims[i]`, from `trim_threshold`) or drop (`dropped[i]`: the
    keep decisions in `keep_bits[i]`, from `dare_drop`), then `* scale[i]`, `* weights[i]`.
    `mode`: MIX_NONE (sum; `divisor` is the weights' sum), MIX_SUM or MIX_COUNT (sign election,
    the divisor is the agreeing models' weights). Then `/ divisor` if `normalize`, `* lam`, and
    `base +` when a base is given (the merged model rather than the merged task vector).
    `done(j)`, when given, is called each time entries `[0, j)` are mixed (every _CHUNK entries:
    the engine then releases the inputs' pages it no longer needs).
    """
    n, size = len(rows), out.size
    addresses = _addresses(rows, size)
    trims = trims or [None] * n
    dropped = dropped or [False] * n
    kind = np.array([_KEEP_TRIM if t is not None else _KEEP_BITS if d else _KEEP_ALL for t, d in zip(trims, dropped)],
                    dtype=np.int64)
    kth = np.array([t.kth if t is not None else 0.0 for t in trims], dtype=np.float32)
    cut = np.array([t.cut if t is not None else size for t in trims], dtype=np.int64)
    bits = keep_bits if keep_bits is not None else np.zeros((n, 1), dtype=np.uint8)
    sc = np.ones(n, dtype=np.float32) if scale is None else scale.astype(np.float32)
    args = (addresses, (base if base is not None else out).reshape(-1), base is not None, kind, kth, cut, bits, sc,
            weights.astype(np.float32), mode, normalize, _F(divisor), _F(lam), lam != 1.0, out)
    step = _CHUNK if done is not None else max(size, 1)
    for begin in range(0, size, step):
        end = min(begin + step, size)
        _mix(*args, begin, end)
        if done is not None:
            done(end)
    return out
