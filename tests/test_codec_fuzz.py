"""Fuzzing the delta decoder: no input makes it raise anything but `CodecError`.

Inputs are arbitrary bytes, arbitrary msgpack structures, valid payloads with one field
replaced by an arbitrary value, and valid payloads with bytes flipped, inserted or cut.
Whatever decodes must match the manifest's shapes, be finite and stay within `max_bytes`;
payloads that declare huge tensors or carry zstd bombs are refused without allocating
what they declare.
"""

from __future__ import annotations

import tracemalloc

import msgpack
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pmodel.protocols.codec import CodecConfig, CodecError, DeltaCodec, DeltaTooLarge, MalformedDelta, decode

MAX_BYTES = 1 << 20
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _deltas() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sparse_ish = torch.randn(400, generator=g) * (torch.rand(400, generator=g) < 0.1)  # zstd has work to do
    return {"w": torch.randn(30, 20, generator=g), "b": torch.full((16,), 0.5), "z": sparse_ish, "s": torch.tensor(2.0)}


DELTAS = _deltas()
MANIFEST = {name: ("F32", tuple(t.shape)) for name, t in DELTAS.items()}
CONFIGS = [
    CodecConfig(encoder="fp16"),
    CodecConfig(encoder="bf16"),
    CodecConfig(encoder="int8", block_size=64),
    CodecConfig(density=0.05, dense_below=100),
    CodecConfig(density=0.5, value_bits=4, dense_below=0, block_size=0),
    CodecConfig(density=0.1, topk_scope="global", dense_below=0),
    CodecConfig(encoder="lowbit", value_bits=2, block_size=1024),  # the default event's codec
    CodecConfig(encoder="lowbit", value_bits=1, block_size=64),
]
PAYLOADS = [DeltaCodec(c).encode_without_feedback(DELTAS) for c in CONFIGS]


def _decode_checked(data) -> None:
    """Decode; a result must fit the manifest, be finite and within MAX_BYTES. Errors must be CodecErrors."""
    try:
        out = decode(data, MANIFEST, max_bytes=MAX_BYTES)
    except CodecError:
        return
    assert all(tuple(t.shape) == MANIFEST[name][1] for name, t in out.items())
    assert sum(t.numel() * t.element_size() for t in out.values()) <= MAX_BYTES
    assert all(bool(torch.isfinite(t).all()) for t in out.values())


def test_valid_payloads_decode():
    for data in PAYLOADS:
        assert set(decode(data, MANIFEST, max_bytes=MAX_BYTES)) == set(DELTAS)


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_raise_only_codec_errors(data):
    _decode_checked(data)


_MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=24,
)


@FUZZ
@given(_MSGPACK_VALUES)
def test_arbitrary_msgpack_values_raise_only_codec_errors(value):
    _decode_checked(msgpack.packb(value, use_bin_type=True))


def _paths(node, prefix=()):
    """Every path (tuple of keys/indices) to a value inside a decoded payload."""
    yield prefix
    if isinstance(node, dict):
        for key, child in node.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _paths(child, (*prefix, i))


@FUZZ
@given(st.data())
def test_any_field_replaced_by_any_value_raises_only_codec_errors(data):
    payload = msgpack.unpackb(data.draw(st.sampled_from(PAYLOADS)), raw=False)
    path = data.draw(st.sampled_from([p for p in _paths(payload) if p]))
    node = payload
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = data.draw(_MSGPACK_VALUES | st.integers(-3, 3) | st.integers(2**30, 2**50))
    _decode_checked(msgpack.packb(payload, use_bin_type=True))


@FUZZ
@given(st.data())
def test_mutated_payload_bytes_raise_only_codec_errors(data):
    buf = bytearray(data.draw(st.sampled_from(PAYLOADS)))
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if kind == "flip" and buf:
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and buf:
            buf[pos] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del buf[pos : pos + data.draw(st.integers(1, 8))]
        else:
            del buf[pos:]
    _decode_checked(bytes(buf))


def test_many_random_byte_flips_raise_only_codec_errors():
    rng = np.random.default_rng(0)
    for i in range(600):
        buf = bytearray(PAYLOADS[i % len(PAYLOADS)])
        for pos in rng.integers(0, len(buf), rng.integers(1, 6)):
            buf[pos] = rng.integers(0, 256)
        _decode_checked(bytes(buf))


# --- no giant allocations ---------------------------------------------------------------


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def _huge_topk_payload(numel: int) -> bytes:
    entry = {
        "name": "w",
        "dtype": "F32",
        "shape": [numel],
        "enc": "topk",
        "params": {"k": 1, "bits": 8, "block": 0, "index": "gaps"},
        "sections": [[0, 1, b"\x00"], [0, 4, np.float32(1).tobytes()], [0, 1, b"\x01"]],
    }
    return msgpack.packb({"format": 1, "tensors": [entry]}, use_bin_type=True)


def test_a_declared_huge_tensor_is_refused_before_allocating():
    numel = 1 << 40
    data = _huge_topk_payload(numel)

    def attempt():
        with pytest.raises(DeltaTooLarge):
            decode(data, {"w": ("F32", (numel,))}, max_bytes=MAX_BYTES)

    assert _peak_bytes(attempt) < MAX_BYTES


def _with_content_size(frame: bytes, size: int) -> bytes:
    """The zstd frame with its header's content-size field rewritten (the field keeps its width)."""
    fhd = frame[4]
    single_segment, dict_flag, fcs_flag = (fhd >> 5) & 1, fhd & 3, fhd >> 6
    start = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    width = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    value = size - 256 if width == 2 else size
    return frame[:start] + value.to_bytes(width, "little") + frame[start + width :]


def test_a_zstd_bomb_is_not_inflated_past_its_declared_size():
    n = 10_000
    bomb = _with_content_size(zstandard.ZstdCompressor().compress(bytes(64 << 20)), n)
    assert zstandard.frame_content_size(bomb) == n
    assert len(bomb) < n
    entry = {
        "name": "w",
        "dtype": "F32",
        "shape": [n],
        "enc": "int8",
        "params": {"block": 0},
        "sections": [[0, 4, np.float32(1).tobytes()], [1, n, bomb]],
    }
    data = msgpack.packb({"format": 1, "tensors": [entry]}, use_bin_type=True)

    def attempt():
        with pytest.raises(MalformedDelta):
            decode(data, {"w": ("F32", (n,))}, max_bytes=MAX_BYTES)

    assert _peak_bytes(attempt) < 4 << 20  # far below the 64 MiB inside


def test_output_stays_within_max_bytes_for_every_valid_payload():
    for data in PAYLOADS:
        size = sum(t.numel() * t.element_size() for t in decode(data, MANIFEST, max_bytes=MAX_BYTES).values())
        with pytest.raises(DeltaTooLarge):
            decode(data, MANIFEST, max_bytes=size - 1)


def test_entry_count_is_bounded_by_the_payload_length():
    # A header claiming 2**32 entries in a few bytes must not make msgpack preallocate them.
    data = b"\x82\xa6format\x01\xa7tensors\xdd" + (2**32 - 1).to_bytes(4, "big")
    assert _peak_bytes(lambda: pytest.raises(MalformedDelta, decode, data, MANIFEST, max_bytes=MAX_BYTES)) < 1 << 20

