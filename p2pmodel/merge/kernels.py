"""Fused float32 kernels for TIES and DARE (numba): the same arithmetic as `gta.py`'s torch path.

Why: written as torch ops, TIES and DARE make about fifteen passes over `(n, *shape)` arrays
(abs, top-k, masks, sign, products, sums) and torch's Bernoulli draws cost 11 ns an entry;
that held merges to 0.14-0.18 GB/s of input on one core. Here each task vector is read about
three times: once to subtract the base (the caller), once to trim or drop it, once in the mix.

What stays bit-identical to the torch path (and so to mergekit, for float32 work):
- every elementwise step is the same IEEE float32 operation in the same order
  (`d * keep`, `* scale`, `* w`, the sums, `/ divisor`, `* lambda`; numba compiles without
  fast-math, so nothing is contracted into FMAs);
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

from p2pmodel.merge.jit import numba as nb
import numpy as np

from p2pmodel.merge.mt19937 import Mt19937, next_block, temper

__all__ = ["MIX_NONE", "MIX_SUM", "MIX_COUNT", "task_vector", "dare_drop", "trim_threshold", "mix"]

MIX_NONE, MIX_SUM, MIX_COUNT = 0, 1, 2  # no sign election; elect by weighted sum; by sign count

_F = np.float32
_SAMPLE = 1 << 16  # at most this many entries sampled to bracket the k-th magnitude
_MIN_SAMPLED = 1 << 16  # smaller tensors are partitioned whole
_STRIDE_PRIMES = (13, 17, 31, 61, 127, 251, 509, 1021, 2039, 4093)  # sample strides, coprime to row lengths


@nb.njit("void(f4[::1], u4[::1], i8[::1], i8, f4[::1])", nogil=True, cache=True)
def _dare_drop(d, mt, pos, threshold, abs_kept):  # pragma: no cover - compiled
    t = np.uint32(threshold)
    low24 = np.uint32(0xFFFFFF)
    draws = np.empty(624, dtype=np.uint32)
    n = d.size
    j = 0
    while j < n:
        p, m = next_block(mt, pos, n - j)
        # Two simple loops over views rather than one over offsets: both vectorise (an index
        # such as `j + q` may be negative as far as numba knows, and its wraparound check
        # blocks vectorisation).
        words, dv, av = mt[p : p + m], d[j : j + m], abs_kept[j : j + m]
        for q in range(m):
            draws[q] = temper(words[q]) & low24
        for q in range(m):
            v = dv[q] * (_F(1.0) if draws[q] < t else _F(0.0))
            dv[q] = v
            av[q] = abs(v)
        j += m


def dare_drop(d: np.ndarray, stream: Mt19937, threshold: int, abs_kept: np.ndarray) -> None:
    """In place: `d *= keep` with torch's Bernoulli keep decisions (see `mt19937.py`), drawing
    `d.size` words from `stream`; `abs_kept` receives `|d|` afterwards (for the L1 rescale)."""
    _dare_drop(d.reshape(-1), stream.state, stream.pos, threshold, abs_kept.reshape(-1))


@nb.njit("void(f4[::1], f4[::1], f4[::1], f4[::1], b1)", nogil=True, cache=True)
def _sub(x, b, d, abs_d, want_abs):  # pragma: no cover - compiled
    for j in range(d.size):
        v = x[j] - b[j]
        d[j] = v
        if want_abs:
            abs_d[j] = abs(v)


def task_vector(x: np.ndarray, base: np.ndarray, out: np.ndarray, abs_out: np.ndarray | None = None) -> None:
    """`out = x - base` (and `abs_out = |out|` when given) in one pass."""
    _sub(x.reshape(-1), base.reshape(-1), out.reshape(-1),
         (abs_out if abs_out is not None else out).reshape(-1), abs_out is not None)


@nb.njit("Tuple((i8, i8, b1))(f4[::1], f4, f4, u1[::1])", nogil=True, cache=True)
def _count_band(d, lo, hi, flags):  # pragma: no cover - compiled
    """How many |d| are > hi, how many in [lo, hi] (flagged in `flags`), and whether any is NaN.
    Branch-free, so it vectorises."""
    above = 0
    band = 0
    odd = False
    for j in range(d.size):
        a = abs(d[j])
        inside = (a >= lo) & (a <= hi)
        above += a > hi
        band += inside
        flags[j] = inside
        odd |= a != a
    return above, band, odd


@nb.njit("void(f4[::1], u1[::1], f4[::1], i8[::1])", nogil=True, cache=True)
def _collect_band(d, flags, values, where):  # pragma: no cover - compiled
    """The flagged magnitudes and their indices, in index order. Reads the flags eight at a
    time: a band of a few percent leaves most words empty. (A plain `if` per entry compiles to
    a masked compress-store, which is slow on x86; this stays a scalar loop.)"""
    words = flags[: flags.size // 8 * 8].view(np.uint64)
    c = 0
    for w in range(words.size):
        x = words[w]
        if x != 0:
            for byte in range(8):
                if (x >> np.uint64(8 * byte)) & np.uint64(1):
                    values[c] = abs(d[8 * w + byte])
                    where[c] = 8 * w + byte
                    c += 1
    for j in range(words.size * 8, d.size):
        if flags[j]:
            values[c] = abs(d[j])
            where[c] = j
            c += 1


def trim_threshold(d: np.ndarray, k: int, flags: np.ndarray | None = None) -> float:
    """The magnitude `t` such that keeping `|d| >= t` keeps exactly mergekit's stable top-k of
    `|d|`: every entry above the k-th largest magnitude, then the entries equal to it in index
    order. Surplus entries equal to it (later in index order) are zeroed in `d` here, as the
    trim would (`d * 0`, so they keep their sign).

    A strided sample brackets the k-th magnitude; one vectorised pass counts the entries above
    the bracket and flags those in it; the exact value is found among the flagged ones. If the
    bracket misses (a skewed sample, NaNs) a full partition gives the same answer, slower.
    `flags` is scratch space (uint8, `d.size`).
    """
    flat = d.reshape(-1)
    size = flat.size
    if size >= _MIN_SAMPLED:
        ns = min(size // 16, _SAMPLE)
        stride = next(p for p in reversed(_STRIDE_PRIMES) if size // p >= ns)
        sample = np.abs(flat[::stride])  # (~ns,)
        ns = sample.size
        q = 1.0 - k / size  # the k-th largest sits at this quantile
        margin = int(4.0 * np.sqrt(ns * q * (1 - q))) + 8  # ~4 standard deviations of its sample rank
        r = int(q * ns)
        lo_r, hi_r = r - margin, r + margin
        picks = [x for x in (lo_r, hi_r) if 0 <= x < ns]
        part = np.partition(sample, picks) if picks else sample
        lo = part[lo_r] if lo_r >= 0 else _F(0.0)
        hi = part[hi_r] if hi_r < ns else _F(np.inf)
        flags = np.empty(size, dtype=np.uint8) if flags is None else flags[:size]
        above, c, odd = _count_band(flat, _F(lo), _F(hi), flags)
        if not odd and above < k <= above + c:
            values, where = np.empty(c, dtype=np.float32), np.empty(c, dtype=np.int64)
            _collect_band(flat, flags, values, where)
            kth = np.partition(values, c - (k - above))[c - (k - above)]
            need = k - above - int(np.count_nonzero(values > kth))
            tied = where[values == kth]
            flat[tied[need:]] *= _F(0.0)
            return float(kth)
    a = np.abs(flat)
    kth = np.partition(a, size - k)[size - k]
    need = k - int(np.count_nonzero(a > kth))
    flat[np.flatnonzero(a == kth)[need:]] *= _F(0.0)
    return float(kth)


_BLOCK = 512  # positions mixed at a time: (n, 512) float32 stays in L1


@nb.njit("void(f4[:, ::1], b1[::1], f4[::1], f4[::1], f4[::1], i8, b1, f4, f4, b1, f4[::1], b1, f4[::1])",
         nogil=True, cache=True)
def _mix(deltas, trim, kth, scale, w, mode, normalize, divisor_const, lam, scale_lam, base, has_base, out):  # pragma: no cover
    n, size = deltas.shape
    wd = np.empty((n, _BLOCK), dtype=np.float32)
    votes = np.empty(_BLOCK, dtype=np.float32)
    mixed = np.empty(_BLOCK, dtype=np.float32)
    divisor = np.empty(_BLOCK, dtype=np.float32)
    zero, one = _F(0.0), _F(1.0)
    for j0 in range(0, size, _BLOCK):
        b = min(_BLOCK, size - j0)
        votes[:b] = zero
        for i in range(n):
            t, si, wi = kth[i], scale[i], w[i]
            row = deltas[i, j0 : j0 + b]  # a view: see `_dare_drop` on offsets
            for q in range(b):
                v = row[q]
                if trim[i]:
                    v = v * (one if abs(v) >= t else zero)
                v = v * si * wi
                wd[i, q] = v
                if mode == 2:
                    votes[q] += one if v > zero else (-one if v < zero else zero)
                else:
                    votes[q] += v
        mixed[:b] = zero
        if mode == 0:
            for i in range(n):
                for q in range(b):
                    mixed[q] += wd[i, q]
            divisor[:b] = divisor_const
        else:
            divisor[:b] = zero
            for i in range(n):
                wi = w[i]
                for q in range(b):
                    v = wd[i, q]
                    up = votes[q] >= zero  # ties elect +1, as mergekit
                    m = one if ((v > zero) & up) | ((v < zero) & (not up)) else zero
                    mixed[q] += v * m
                    divisor[q] += m * wi
            for q in range(b):
                if divisor[q] == zero:
                    divisor[q] = one
        dest = out[j0 : j0 + b]
        for q in range(b):
            x = mixed[q]
            if normalize:
                x = x / divisor[q]
            if scale_lam:
                x = x * lam
            dest[q] = x
        if has_base:
            bv = base[j0 : j0 + b]
            for q in range(b):
                dest[q] = bv[q] + dest[q]


def mix(
    deltas: np.ndarray,
    weights: np.ndarray,
    *,
    mode: int,
    normalize: bool,
    divisor: float,
    lam: float,
    scale: np.ndarray | None = None,
    trims: list[float | None] | None = None,
    base: np.ndarray | None = None,
    out: np.ndarray,
) -> np.ndarray:
    """Generalized task arithmetic's mix of `deltas` (float32, `(n, size)`) into `out` (`(size,)`).

    Per model: optional trim (keep `|d| >= trims[i]`, from `trim_threshold`), then `* scale[i]`,
    `* weights[i]`.
    `mode`: MIX_NONE (sum; `divisor` is the weights' sum), MIX_SUM or MIX_COUNT (sign election,
    the divisor is the agreeing models' weights). Then `/ divisor` if `normalize`, `* lam`, and
    `base +` when a base is given (the merged model rather than the merged task vector).
    """
    n = deltas.shape[0]
    trims = trims or [None] * n
    trim = np.array([t is not None for t in trims], dtype=np.bool_)
    kth = np.array([t if t is not None else 0.0 for t in trims], dtype=np.float32)
    sc = np.ones(n, dtype=np.float32) if scale is None else scale.astype(np.float32)
    _mix(deltas, trim, kth, sc, weights.astype(np.float32), mode, normalize, _F(divisor), _F(lam),
         lam != 1.0, (base if base is not None else out).reshape(-1), base is not None, out)
    return out
