"""Value coding for the delta codec: half precision and blockwise absmax quantisation.

Pure numpy/torch math on flat float32 arrays, no wire format and no validation (`codec.py`
validates before it calls the decoders here). Dequantisation is one IEEE float32 multiply
per element (`code * scale`), so every peer computes bit-identical values.

Blockwise quantisation follows bitsandbytes' blockwise 8-bit scheme: the array is cut into
blocks of `block` entries, each block stores its absmax as a float32 scale, and the entries
become signed integer codes in [-qmax, qmax] (qmax = 127 for 8 bits, 7 for 4 bits).
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
