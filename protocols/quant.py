"""Value coding for the delta codec: half precision and blockwise absmax quantisation.

Pure numpy/torch math on flat float32 arrays, no wire format and no validation (`codec.py`
validates before it calls the decoders here). Dequantisation is one IEEE float32 multiply
per element (`code * scale`), so every peer computes bit-identical values.

Blockwise quantisation follows bitsandbytes' blockwise 8-bit scheme: the array is cut into
blocks of `block` entries, each block stores its absmax as a float32 scale, and the entries
become signed integer codes in [-qmax, qmax] (qmax = 127 for 8 bits, 7 for 4 bits).

Low-bit quantisation (1 or 2 bits, `quantize_lowbit`) has no zero level: the levels are the
odd multiples of the block's scale, {-1, 1} or {-3, -1, 1, 3}, and the scale is fitted to the
block by least squares (1 bit: mean |x|, i.e. signSGD's scaled sign; 2 bits: a few Lloyd
steps from 0.5 rms, the optimal uniform quantiser of a Gaussian). Absmax scaling would waste
these few levels on outliers; error feedback carries what the levels miss.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "QMAX",
    "to_half_bytes",
    "from_half_bytes",
    "quantize_blockwise",
    "dequantize_blockwise",
    "pack_int4",
    "unpack_int4",
    "LOWBIT_BITS",
    "quantize_lowbit",
    "lowbit_levels",
    "pack_bits",
    "unpack_bits",
]

QMAX = {8: 127, 4: 7}  # largest code magnitude per bit width (symmetric, so 0 is exact)

_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def to_half_bytes(x: np.ndarray, kind: str) -> bytes:
    """Round float32 `x` to fp16 or bf16 (round to nearest even) and return its little-endian bytes.

    The caller clamps `x` into the format's finite range first.
    """
    half = torch.from_numpy(x).to(_HALF[kind])  # torch: vectorised, 5x numpy's astype
    return half.view(torch.int16).numpy().tobytes()


def from_half_bytes(buf: bytes, kind: str) -> np.ndarray:
    """Exact float32 values of little-endian fp16 or bf16 bytes (len(buf) must be even)."""
    raw = np.frombuffer(buf, dtype=np.int16)
    if raw.size == 0:
        return np.zeros(0, dtype=np.float32)
    # torch.from_numpy warns on read-only arrays; the copy below is what we keep anyway.
    widened = torch.from_numpy(raw.copy()).view(_HALF[kind]).to(torch.float32)
    return widened.numpy()


def _blocks(n: int, block: int) -> tuple[int, int]:
    """(number of full blocks, length of the last partial block) of n entries."""
    return n // block, n % block


def block_count(n: int, block: int) -> int:
    """Scales needed for n entries in blocks of `block` (block 0: one scale for all, if any)."""
    if n == 0:
        return 0
    return 1 if block == 0 else -(-n // block)


def quantize_blockwise(x: np.ndarray, block: int, bits: int, max_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Quantise flat float32 `x` to int8 codes with one float32 absmax scale per block.

    Args:
        x: finite float32 values, 1-D.
        block: entries per scale; 0 means one scale for the whole array.
        bits: 8 (codes in [-127, 127]) or 4 (codes in [-7, 7], still returned as int8).
        max_scale: scales are clamped to this, so that `code * scale` stays finite in the
            delta's dtype (the decoder refuses larger scales).

    Returns:
        (scales float32 of shape (block_count,), codes int8 of shape x.shape)
    """
    n = x.size
    block = n if block == 0 else block
    if n == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int8)
    qmax = QMAX[bits]
    full, tail = _blocks(n, block)
    absmax = np.empty(full + (1 if tail else 0), np.float32)
    if full:
        xb = x[: full * block].reshape(full, block)  # (full, block), a view
        # max and -min instead of abs(): no 4-bytes-per-entry temporary
        np.maximum(xb.max(axis=1), -xb.min(axis=1), out=absmax[:full])
    if tail:
        xt = x[full * block :]
        absmax[full] = max(float(xt.max()), -float(xt.min()))
    scales = np.minimum(absmax / np.float32(qmax), np.float32(max_scale))
    inv = np.zeros_like(scales)
    np.divide(np.float32(1.0), scales, out=inv, where=scales > 0)  # a zero block stays all-zero codes
    q = np.empty(n, np.float32)
    if full:
        body = slice(0, full * block)
        np.multiply(x[body].reshape(full, block), inv[:full, None], out=q[body].reshape(full, block))
    if tail:
        np.multiply(x[full * block :], inv[full], out=q[full * block :])
    np.rint(q, out=q)
    np.clip(q, -qmax, qmax, out=q)  # x * (1/scale) may land a hair past qmax
    return scales, q.astype(np.int8)


def dequantize_blockwise(
    scales: np.ndarray, codes: np.ndarray, block: int, out: np.ndarray | None = None
) -> np.ndarray:
    """float32 `codes[i] * scales[i // block]` (block 0: one scale), written into `out` if given."""
    n = codes.size
    block = n if block == 0 else block
    if out is None:
        out = np.empty(n, np.float32)
    if n == 0:
        return out
    full, tail = _blocks(n, block)
    if full:
        # int8 * float32 -> float32: the int8 -> float32 cast is exact, the multiply is IEEE.
        body = slice(0, full * block)
        np.multiply(codes[body].reshape(full, block), scales[:full, None], out=out[body].reshape(full, block))
    if tail:
        np.multiply(codes[full * block :], scales[full], out=out[full * block :])
    return out


def pack_int4(codes: np.ndarray) -> bytes:
    """Pack codes in [-7, 7] two per byte (first code in the low nibble), stored as code + 8."""
    nib = (codes.astype(np.int16) + 8).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))  # padding nibble, ignored by the decoder
    return (nib[0::2] | (nib[1::2] << 4)).tobytes()


def unpack_int4(buf: bytes, n: int) -> np.ndarray:
    """Inverse of `pack_int4`: n int8 codes in [-8, 7] (len(buf) must be ceil(n / 2))."""
    packed = np.frombuffer(buf, dtype=np.uint8)
    nib = np.empty(packed.size * 2, np.uint8)
    nib[0::2] = packed & 0x0F
    nib[1::2] = packed >> 4
    return nib[:n].view(np.int8) - np.int8(8)


LOWBIT_BITS = (1, 2)
LOWBIT_LLOYD_STEPS = 3  # scale refits of the 2-bit quantiser (the error barely moves after 2)


def lowbit_levels(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes in [0, 2**bits) -> their odd levels as int8: 2 * code - (2**bits - 1)."""
    return (codes.astype(np.int8) * np.int8(2) - np.int8((1 << bits) - 1)).astype(np.int8)


def quantize_lowbit(x: np.ndarray, block: int, bits: int, max_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Quantise flat float32 `x` to `bits` (1 or 2) per entry with one float32 scale per block.

    Entry i decodes as `lowbit_levels(code) * scale` (levels +-1, or +-1 and +-3).

    Returns:
        (scales float32 of shape (block_count,), codes uint8 in [0, 2**bits) of shape x.shape)
    """
    n = x.size
    if n == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.uint8)
    block = n if block == 0 else block
    nblocks = -(-n // block)
    pad = nblocks * block - n
    xb = (np.concatenate([x, np.zeros(pad, np.float32)]) if pad else x).reshape(nblocks, block)
    count = np.full(nblocks, block, np.float64)
    count[-1] -= pad  # padding zeros add nothing to the sums below but must not count as entries
    if bits == 1:
        scale = np.abs(xb).sum(axis=1, dtype=np.float64) / count  # least squares for fixed signs
        scales = np.minimum(scale.astype(np.float32), np.float32(max_scale))
        return scales, (x >= 0).view(np.uint8)
    # 2 bits: level index k in {-2, -1, 0, 1} is level 2k + 1, the odd multiple nearest to x / scale.
    # Start from the Gaussian optimum (0.5 rms), then Lloyd steps: assign levels, refit the scale by
    # least squares, sum (2k+1) x / sum (2k+1)^2 (padding zeros sit at k = 0 and add nothing).
    scale = 0.5 * np.sqrt(np.square(xb, dtype=np.float64).sum(axis=1) / count)
    sum_x = xb.sum(axis=1, dtype=np.float64)
    for step in range(LOWBIT_LLOYD_STEPS + 1):
        half_inv = np.zeros(nblocks, np.float32)
        np.divide(np.float32(0.5), scale.astype(np.float32), out=half_inv, where=scale > 0)
        k = xb * half_inv[:, None]
        np.floor(k, out=k)
        np.clip(k, -2, 1, out=k)
        if step == LOWBIT_LLOYD_STEPS:
            break
        num = 2 * (k * xb).sum(axis=1, dtype=np.float64) + sum_x
        den = 4 * np.square(k).sum(axis=1, dtype=np.float64) + 4 * k.sum(axis=1, dtype=np.float64) + count
        scale = np.where(num > 0, num / den, scale)
    scales = np.minimum(scale.astype(np.float32), np.float32(max_scale))
    codes = (k.reshape(-1)[:n] + np.float32(2)).astype(np.uint8)
    return scales, codes


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack codes in [0, 2**bits) (bits 1 or 2), first code in the lowest bits of each byte."""
    per = 8 // bits
    c = np.zeros(-(-codes.size // per) * per, np.uint8)
    c[: codes.size] = codes
    c = c.reshape(-1, per)
    out = np.zeros(c.shape[0], np.uint8)
    for j in range(per):
        out |= c[:, j] << np.uint8(j * bits)
    return out.tobytes()


def unpack_bits(buf: bytes, n: int, bits: int) -> tuple[np.ndarray, bool]:
    """Inverse of `pack_bits`: (n codes as uint8, whether the padding bits are all zero).
    len(buf) must be ceil(n * bits / 8)."""
    per = 8 // bits
    packed = np.frombuffer(buf, dtype=np.uint8)
    mask = np.uint8((1 << bits) - 1)
    c = np.empty((packed.size, per), np.uint8)
    for j in range(per):
        c[:, j] = (packed >> np.uint8(j * bits)) & mask
    flat = c.reshape(-1)
    return flat[:n].copy(), not np.any(flat[n:])
