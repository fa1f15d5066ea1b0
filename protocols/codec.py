"""The delta codec: a round's parameter delta as compact, validated, deterministic bytes.

A sender holds an `ErrorFeedback` (made by `DeltaCodec.feedback()`) and calls its `encode`:
it adds what earlier rounds' compression dropped, encodes, and keeps what this encoding
drops for the next round. `DeltaCodec.encode_without_feedback` is the bare, lossy step;
its name says what it forgoes. A receiver calls `decode(data, manifest, max_bytes=...)`.

The payload format and its checked decoder are in `delta_format.py`; value coding is in
`quant.py` (fp16/bf16, blockwise absmax int8/int4), index coding and top-k in `sparse.py`.
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

from p2pmodel.dtypes import UnsupportedDtype, dtype_name
from p2pmodel.protocols import quant, sparse
from p2pmodel.protocols.codec_errors import (
    CodecError,
    DeltaTooLarge,
    InvalidCodecConfig,
    MalformedDelta,
    ManifestMismatch,
    UnsupportedDelta,
)
from p2pmodel.protocols.delta_format import (
    DTYPES,
    ENCODERS,
    FORMAT_VERSION,
    MAX_BLOCK,
    MAX_FINITE,
    MAX_NAME_CHARS,
    MAX_NDIM,
    MAX_NUMEL,
    SECTION_RAW,
    SECTION_ZSTD,
    check_payload,
    decode_entry,
)
from p2pmodel.protocols.schema import is_int

__all__ = [
    "FORMAT_VERSION",
    "CodecConfig",
    "DeltaCodec",
    "ErrorFeedback",
    "EncodedDelta",
    "decode",
    "CodecError",
    "MalformedDelta",
    "DeltaTooLarge",
    "ManifestMismatch",
    "UnsupportedDelta",
    "InvalidCodecConfig",
]


def _bits_of(encoder: object) -> tuple[int, ...]:
    """The value_bits an encoder accepts (fp16, bf16 and int8 ignore it, but it must still be 4 or 8)."""
    return quant.LOWBIT_BITS if encoder == "lowbit" else (4, 8)


def _bits_rule(encoder: object) -> str:
    return f"must be one of {_bits_of(encoder)} for encoder {encoder!r:.20}"


@dataclass(frozen=True)
class CodecConfig:
    """How a sender compresses its delta (a receiver needs none of this: the payload says)."""

    # "fp16" | "bf16" (dense half precision), "int8" (dense, blockwise absmax scales), "topk",
    # "lowbit" (dense, `value_bits` 1 or 2 per entry: scaled sign, or 4 levels; blockwise scales)
    encoder: str = "topk"
    block_size: int = 256  # entries per float32 scale (int8, lowbit, and top-k's values); 0: one per tensor
    density: float = 0.01  # top-k: fraction of entries kept, in (0, 1]
    topk_scope: str = "tensor"  # top-k: "tensor" keeps `density` of each tensor; "global" the largest over all
    value_bits: int = 8  # top-k: bits per kept value, 8 or 4; lowbit: bits per entry, 1 or 2
    dense_below: int = 4096  # top-k: tensors with fewer entries (biases, norms) go dense int8; 0: none
    zstd_level: int = 3  # 1..19: zstd each section where that saves >= 1/32 of it; 0: never
    # Error feedback: the residual is scaled by this before the next delta is added (SparseLoCo's
    # beta, Sarfi et al. 2025, arXiv:2508.15706). 1.0: plain error feedback, nothing is forgotten.
    feedback_decay: float = 1.0
    max_decoded_bytes: int = 1 << 34  # bytes: `DeltaCodec.decode` refuses payloads that decode to more

    def __post_init__(self) -> None:
        checks = [  # (field, valid, what a valid value is)
            ("encoder", self.encoder in ENCODERS, f"must be one of {ENCODERS}"),
            ("block_size", is_int(self.block_size) and 0 <= self.block_size <= MAX_BLOCK, f"must be 0..{MAX_BLOCK}"),
            ("density", type(self.density) in (float, int) and 0 < self.density <= 1, "must be in (0, 1]"),
            ("topk_scope", self.topk_scope in ("tensor", "global"), "must be 'tensor' or 'global'"),
            ("value_bits", is_int(self.value_bits) and self.value_bits in _bits_of(self.encoder), _bits_rule(self.encoder)),
            ("dense_below", is_int(self.dense_below) and self.dense_below >= 0, "must be >= 0"),
            ("zstd_level", is_int(self.zstd_level) and 0 <= self.zstd_level <= 19, "must be in [0, 19]"),
            ("feedback_decay", _is_unit(self.feedback_decay), "must be in [0, 1]"),
            ("max_decoded_bytes", is_int(self.max_decoded_bytes) and self.max_decoded_bytes >= 0, "must be >= 0"),
        ]
        for field, ok, reason in checks:
            if not ok:
                raise InvalidCodecConfig(field, f"{reason}, got {getattr(self, field)!r}")


@dataclass(frozen=True)
class EncodedDelta:
    """An encoded delta, ready to hash, announce and serve."""

    data: bytes  # the payload
    numel: int  # entries of the delta it encodes (all tensors)

    @property
    def ratio(self) -> float:
        """How many times smaller than the same delta as dense float32."""
        return 4 * self.numel / max(1, len(self.data))


class DeltaCodec:
    """Encodes deltas as configured; decodes any valid payload (the payload names its encoders)."""

    def __init__(self, config: CodecConfig | None = None) -> None:
        self.config = config if config is not None else CodecConfig()

    def feedback(self) -> ErrorFeedback:
        """A fresh sender-side error-feedback state using this codec. Senders encode through it."""
        return ErrorFeedback(self)

    def encode_without_feedback(self, deltas: Mapping[str, torch.Tensor]) -> bytes:
        """Encode `deltas` once, losing whatever compression drops. Senders use `ErrorFeedback`.

        Args:
            deltas: tensor name -> floating point delta (any device; read, never modified).

        Raises:
            UnsupportedDelta: a tensor is not F32/F16/BF16/F64, has NaN/Inf, or is too big.
        """
        return self._encode({name: (_dtype_name(name, t), t) for name, t in deltas.items()})

    def decode(self, data: bytes, manifest: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """`decode(data, manifest, max_bytes=config.max_decoded_bytes)`."""
        return decode(data, manifest, max_bytes=self.config.max_decoded_bytes)

    def _encode(self, deltas: Mapping[str, tuple[str, torch.Tensor]]) -> bytes:
        """Encode name -> (dtype to decode to, tensor) as configured."""
        cfg = self.config
        flats = {name: _flat_float32(name, t) for name, (_, t) in deltas.items()}
        sparse_names: list[str] = []
        if cfg.encoder == "topk":
            sparse_names = [n for n, x in flats.items() if x.size >= max(1, cfg.dense_below)]
        chosen = self._select(sparse_names, flats)
        zctx = zstandard.ZstdCompressor(level=cfg.zstd_level) if cfg.zstd_level else None
        entries = []
        for name, (dtype, t) in deltas.items():
            x = flats[name]
            max_scale = MAX_FINITE[dtype] / 128
            if name in chosen:
                enc, params, raws = _encode_topk(x, chosen[name], cfg, max_scale)
            elif cfg.encoder in ("fp16", "bf16"):
                enc, params, raws = _encode_half(x, cfg.encoder, dtype)
            elif cfg.encoder == "lowbit":
                scales, codes = quant.quantize_lowbit(x, cfg.block_size, cfg.value_bits, max_scale)
                enc, params = "lowbit", {"bits": cfg.value_bits, "block": cfg.block_size}
                raws = [scales.tobytes(), quant.pack_bits(codes, cfg.value_bits)]
            else:  # "int8", and top-k's small tensors
                scales, codes = quant.quantize_blockwise(x, cfg.block_size, 8, max_scale)
                enc, params, raws = "int8", {"block": cfg.block_size}, [scales.tobytes(), codes.tobytes()]
            entries.append(
                {
                    "name": name,
                    "dtype": dtype,
                    "shape": list(t.shape),
                    "enc": enc,
                    "params": params,
                    "sections": [_section(raw, zctx) for raw in raws],
                }
            )
        return msgpack.packb({"format": FORMAT_VERSION, "tensors": entries}, use_bin_type=True)

    def _select(self, names: list[str], flats: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Top-k indices of each sparse-coded tensor, per tensor or globally."""
        density = self.config.density
        if self.config.topk_scope == "tensor":
            return {n: sparse.topk_indices([np.abs(flats[n])], _count(density, flats[n].size))[0] for n in names}
        magnitudes = [np.abs(flats[n]) for n in names]
        k = _count(density, sum(m.size for m in magnitudes))
        return dict(zip(names, sparse.topk_indices(magnitudes, k)))


class ErrorFeedback:
    """The sender's error feedback: the part of its deltas that compression has not yet sent.

    `encode(delta)` encodes `delta + residual` and keeps `(delta + residual) - decoded` as
    the new residual, where `decoded` is what every receiver will decode from the bytes. So
    the sum of what a sender transmitted trails the sum of its true deltas by one residual,
    not by the sum of every round's compression error.

    With `CodecConfig.feedback_decay` beta < 1 it encodes `delta + beta * residual` instead:
    what was not sent fades by beta per round. This is SparseLoCo's accumulator (Sarfi et al.
    2025, arXiv:2508.15706: `e <- beta*e + delta; send C(e); e <- e - C(e)`), which takes the
    place of DiLoCo's outer momentum (use it with outer momentum 0). beta = 1 is plain error
    feedback, bit for bit.

    Each delta passed in must be new relative to what was sent before. If an encoded delta
    was never delivered and the next delta will include it again (a failed round, training
    on from the same base), call `rollback()` before encoding the next one.
    """

    def __init__(self, codec: DeltaCodec) -> None:
        self.codec = codec
        self._residual: dict[str, torch.Tensor] = {}  # name -> float32, on CPU
        self._before_last: dict[str, torch.Tensor] = {}

    @property
    def residual(self) -> Mapping[str, torch.Tensor]:
        """name -> float32 residual still to be sent (read it, don't modify it)."""
        return dict(self._residual)

    def encode(self, delta: Mapping[str, torch.Tensor]) -> EncodedDelta:
        """Encode `delta` plus the residual (times `feedback_decay`), and keep what the encoding drops.

        Tensors of earlier deltas missing from this one keep their residual for later (undecayed).

        Raises:
            UnsupportedDelta: a tensor cannot be encoded, or its shape differs from its residual's.
        """
        dtypes = {name: _dtype_name(name, t) for name, t in delta.items()}
        decay = float(self.codec.config.feedback_decay)
        corrected: dict[str, torch.Tensor] = {}
        for name, t in delta.items():
            x = t.detach().to("cpu", torch.float32)
            kept = self._residual.get(name)
            if kept is not None:
                if kept.shape != x.shape:
                    shapes = f"{tuple(x.shape)} instead of its residual's {tuple(kept.shape)}"
                    raise UnsupportedDelta(name, f"shape {shapes}")
                x = x + kept if decay == 1.0 else x + torch.mul(kept, decay)
            corrected[name] = x
        data = self.codec._encode({name: (dtypes[name], x) for name, x in corrected.items()})
        # Decode with the receivers' decoder, so the residual is exactly what they will miss.
        manifest = {name: (dtypes[name], tuple(x.shape)) for name, x in corrected.items()}
        decoded = decode(data, manifest, max_bytes=sys.maxsize)
        residual = dict(self._residual)
        for name, x in corrected.items():
            residual[name] = x - decoded[name].to(torch.float32)  # never in place: x may be the caller's
        self._before_last, self._residual = self._residual, residual
        return EncodedDelta(data=data, numel=sum(x.numel() for x in corrected.values()))

    def rollback(self) -> None:
        """Forget the last `encode`: the residual goes back to what it was before it."""
        self._residual = self._before_last

    def reset(self) -> None:
        """Drop the residual (e.g. after syncing a new base from another peer)."""
        self._residual, self._before_last = {}, {}


def decode(data: bytes, manifest: Mapping[str, Any], *, max_bytes: int) -> dict[str, torch.Tensor]:
    """Decode a payload into name -> tensor (in the dtype recorded for it), validating everything.

    Args:
        data: the payload bytes, from an untrusted peer.
        manifest: the base version's tensors: name -> `TensorEntry` (anything with `.shape`)
            or (dtype, shape). Every tensor in the payload must be in it with the same shape;
            tensors of the manifest absent from the payload are zero deltas (not returned).
        max_bytes: most bytes the decoded tensors plus decompressed sections may take.

    Raises:
        MalformedDelta: the bytes break the format anywhere.
        ManifestMismatch: a tensor is not in the manifest, or has another shape there.
        DeltaTooLarge: decoding would take more than `max_bytes`.
    """
    entries = check_payload(data, manifest, max_bytes)
    return {e.name: decode_entry(e) for e in entries}


# --- encoding helpers ------------------------------------------------------------------


def _is_unit(v: object) -> bool:
    """A float or int in [0, 1] (not bool, not NaN)."""
    return type(v) in (float, int) and 0 <= v <= 1


def _count(density: float, numel: int) -> int:
    """Entries top-k keeps out of numel: at least one of a non-empty tensor."""
    return 0 if numel == 0 else min(numel, max(1, round(density * numel)))


def _dtype_name(name: str, t: torch.Tensor) -> str:
    if not isinstance(t, torch.Tensor):
        raise UnsupportedDelta(str(name), f"not a tensor but {type(t).__name__}")
    try:
        dtype = dtype_name(t.dtype)
    except UnsupportedDtype:
        dtype = None
    if dtype not in DTYPES:
        raise UnsupportedDelta(name, f"dtype {t.dtype} is not one of F32, F16, BF16, F64")
    return dtype


def _flat_float32(name: str, t: torch.Tensor) -> np.ndarray:
    """t as a flat float32 numpy array (a view when t already is one), checked finite."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise UnsupportedDelta(str(name)[:80], f"names must be 1 to {MAX_NAME_CHARS} characters")
    if t.dim() > MAX_NDIM or t.numel() > MAX_NUMEL:
        raise UnsupportedDelta(name, f"more than {MAX_NDIM} dimensions or {MAX_NUMEL} entries")
    x = t.detach().to("cpu", torch.float32).contiguous().reshape(-1)
    if x.numel():
        lo, hi = torch.aminmax(x)  # one pass; NaN propagates
        if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
            raise UnsupportedDelta(name, "contains NaN or Inf")
    return x.numpy()


def _encode_half(x: np.ndarray, kind: str, dtype: str) -> tuple[str, dict, list[bytes]]:
    # The largest value of the format that stays finite once decoded to dtype: bf16 rounds
    # 65504 (F16's max) up to 65536, so an F16 delta through bf16 saturates at 65280.
    limit = 65504.0 if kind == "fp16" else 65280.0 if dtype == "F16" else 3.3895314e38
    if x.size and max(float(x.max()), -float(x.min())) > limit:
        x = np.clip(x, -limit, limit)  # out-of-range values saturate; error feedback keeps the rest
    return kind, {}, [quant.to_half_bytes(x, kind)]


def _encode_topk(
    x: np.ndarray, idx: np.ndarray, cfg: CodecConfig, max_scale: float
) -> tuple[str, dict, list[bytes]]:
    scales, codes = quant.quantize_blockwise(x[idx], cfg.block_size, cfg.value_bits, max_scale)
    values = codes.tobytes() if cfg.value_bits == 8 else quant.pack_int4(codes)
    index, index_bytes = sparse.encode_indices(idx, x.size)
    params = {"k": int(idx.size), "bits": cfg.value_bits, "block": cfg.block_size, "index": index}
    return "topk", params, [index_bytes, scales.tobytes(), values]


def _section(raw: bytes, zctx: zstandard.ZstdCompressor | None) -> list:
    """[comp, raw_len, bytes]: zstd where it saves at least 1/32, else raw."""
    if zctx is not None and len(raw) >= 64:
        packed = zctx.compress(raw)
        if len(packed) <= len(raw) - len(raw) // 32:
            return [SECTION_ZSTD, len(raw), packed]
    return [SECTION_RAW, len(raw), raw]

