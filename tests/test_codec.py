"""The delta codec: what it guarantees.

- Every encoder round-trips names, shapes and dtypes (scalars, empty and odd-sized tensors,
  F32/F16/BF16 inputs) within its stated error bound.
- Top-k keeps exactly the k largest-magnitude entries (per tensor or globally), and codes
  their indices as varint gaps or a bitmap, whichever is smaller.
- Encoding and decoding are deterministic: the same bytes decode to the same bits.
- Error feedback: the cumulative sum of what a sender transmitted stays within one residual
  of the cumulative true sum; without it the gap grows round after round.
- The decoder refuses each malformed field with a typed `CodecError` naming the field.

One file for the one codec (its guarantees read as one specification); fuzzing is in
test_codec_fuzz.py.
"""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import torch
import zstandard

from p2pmodel.errors import P2PModelError
from p2pmodel.protocols import sparse
from p2pmodel.protocols.codec import (
    CodecConfig,
    CodecError,
    DeltaCodec,
    DeltaTooLarge,
    InvalidCodecConfig,
    MalformedDelta,
    ManifestMismatch,
    UnsupportedDelta,
    decode,
)
from p2pmodel.protocols.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

LIMIT = 1 << 30

CONFIGS = {
    "fp16": CodecConfig(encoder="fp16"),
    "bf16": CodecConfig(encoder="bf16"),
    "int8": CodecConfig(encoder="int8", block_size=64),
    "topk8": CodecConfig(density=0.1, value_bits=8, dense_below=0, block_size=16),
    "topk4": CodecConfig(density=0.1, value_bits=4, dense_below=0, block_size=0),
    "global": CodecConfig(density=0.1, topk_scope="global", dense_below=0),
    "sign": CodecConfig(encoder="lowbit", value_bits=1, block_size=16),
    "lowbit2": CodecConfig(encoder="lowbit", value_bits=2, block_size=0),
}


def _deltas(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(37, 53, generator=g).to(dtype),  # odd sizes: partial last blocks
        "b": torch.randn(7, generator=g).to(dtype),
        "scalar": torch.tensor(0.75).to(dtype),
        "empty": torch.zeros(0, 5, dtype=dtype),
        "cube": torch.randn(3, 4, 5, generator=g).to(dtype),
    }


def _manifest(deltas: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {name: ("F32", tuple(t.shape)) for name, t in deltas.items()}


def _roundtrip(config: CodecConfig, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    data = DeltaCodec(config).encode_without_feedback(deltas)
    return decode(data, _manifest(deltas), max_bytes=LIMIT)


def _entries(data: bytes) -> list[dict]:
    return msgpack.unpackb(data, raw=False)["tensors"]


# --- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["F32", "F16", "BF16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_roundtrip_keeps_names_shapes_and_dtypes(name, dtype):
    deltas = _deltas(dtype)
    out = _roundtrip(CONFIGS[name], deltas)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: (v.shape, v.dtype) for k, v in deltas.items()}


@pytest.mark.parametrize(("encoder", "bound"), [("fp16", 2**-11), ("bf16", 2**-8)])
def test_half_precision_error_is_within_one_rounding(encoder, bound):
    x = _deltas()["w"]
    out = _roundtrip(CodecConfig(encoder=encoder), {"w": x})["w"]
    assert torch.all((out - x).abs() <= x.abs() * bound)


@pytest.mark.parametrize("encoder", ["fp16", "bf16"])
def test_half_precision_tensor_through_its_own_encoder_is_exact(encoder):
    x = _deltas(torch.float16 if encoder == "fp16" else torch.bfloat16)["w"]
    assert torch.equal(_roundtrip(CodecConfig(encoder=encoder), {"w": x})["w"], x)


def test_fp16_saturates_values_beyond_its_range():
    x = torch.tensor([1e6, -1e6, 1.0])
    assert _roundtrip(CodecConfig(encoder="fp16"), {"x": x})["x"].tolist() == [65504.0, -65504.0, 1.0]


def test_bf16_encoding_of_an_f16_delta_saturates_within_f16():
    x = torch.tensor([65504.0, -65504.0, 1.0], dtype=torch.float16)
    assert _roundtrip(CodecConfig(encoder="bf16"), {"x": x})["x"].tolist() == [65280.0, -65280.0, 1.0]


@pytest.mark.parametrize("block", [1, 64, 100, 0])
def test_int8_error_is_at_most_half_a_step_of_its_block(block):
    x = _deltas()["w"].reshape(-1)
    out = _roundtrip(CodecConfig(encoder="int8", block_size=block), {"w": x})["w"]
    size = x.numel() if block == 0 else block
    for start in range(0, x.numel(), size):
        xs, os_ = x[start : start + size], out[start : start + size]
        step = xs.abs().max() / 127
        assert torch.all((xs - os_).abs() <= step / 2 * (1 + 1e-5))


def _nonzero(x: torch.Tensor) -> set[int]:
    return set(torch.nonzero(x.reshape(-1)).reshape(-1).tolist())


def _largest(x: torch.Tensor, k: int) -> set[int]:
    return set(torch.argsort(x.reshape(-1).abs(), descending=True)[:k].tolist())



@pytest.mark.parametrize("block", [0, 16, 100])
def test_one_bit_lowbit_is_the_blocks_mean_magnitude_times_the_sign(block):
    x = torch.randn(37, 53, generator=torch.Generator().manual_seed(3))
    out = _roundtrip(CodecConfig(encoder="lowbit", value_bits=1, block_size=block), {"w": x})["w"].reshape(-1)
    flat = x.reshape(-1)
    size = flat.numel() if block == 0 else block
    for start in range(0, flat.numel(), size):
        xb, ob = flat[start : start + size], out[start : start + size]
        assert torch.equal(torch.sign(ob), torch.where(xb >= 0, 1.0, -1.0))
        assert torch.allclose(ob.abs(), xb.abs().mean().expand_as(ob), rtol=1e-5)


def test_two_bit_lowbit_uses_four_levels_and_beats_one_bit():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(4))
    errs = {}
    for bits in (1, 2):
        out = _roundtrip(CodecConfig(encoder="lowbit", value_bits=bits, block_size=0), {"w": x})["w"]
        levels = torch.unique(out)
        assert levels.numel() == 2**bits
        odd = torch.tensor([-1.0, 1.0]) if bits == 1 else torch.tensor([-3.0, -1.0, 1.0, 3.0])
        assert torch.allclose(levels, odd * levels[-1] / odd[-1])  # odd multiples of one scale
        errs[bits] = float((out - x).norm() / x.norm())
    # Gaussian: scaled sign keeps 2/pi of the energy (error 0.60); the optimal 4-level uniform quantiser 0.34
    assert errs[1] < 0.62 and errs[2] < 0.36


@pytest.mark.parametrize("bits", [1, 2])
def test_lowbit_payload_is_bits_per_entry_plus_scales(bits):
    x = {"w": torch.randn(1000)}
    data = DeltaCodec(CodecConfig(encoder="lowbit", value_bits=bits, block_size=100, zstd_level=0)).encode_without_feedback(x)
    sections = _entries(data)[0]["sections"]
    assert [len(s[2]) for s in sections] == [4 * 10, 1000 * bits // 8]


def test_lowbit_of_zeros_decodes_to_zeros():
    out = _roundtrip(CodecConfig(encoder="lowbit", value_bits=2, block_size=8), {"w": torch.zeros(20)})["w"]
    assert torch.equal(out, torch.zeros(20))


def test_lowbit_error_feedback_tracks_the_true_sum():
    feedback = DeltaCodec(CodecConfig(encoder="lowbit", value_bits=1, block_size=64)).feedback()
    g = torch.Generator().manual_seed(5)
    true_sum, sent_sum = torch.zeros(640), torch.zeros(640)
    for _ in range(30):
        delta = torch.randn(640, generator=g) + 0.3
        true_sum += delta
        sent_sum += decode(feedback.encode({"w": delta}).data, {"w": ("F32", (640,))}, max_bytes=LIMIT)["w"]
    assert torch.allclose(sent_sum + feedback.residual["w"], true_sum, atol=1e-4)
    assert float(feedback.residual["w"].norm()) < 0.2 * float(true_sum.norm())


@pytest.mark.parametrize("bits", [8, 4])
def test_topk_keeps_exactly_the_largest_entries(bits):
    x = _deltas()["w"]
    out = _roundtrip(CodecConfig(density=0.05, value_bits=bits, dense_below=0), {"w": x})["w"]
    k = round(0.05 * x.numel())
    assert _nonzero(out) == _largest(x, k)


@pytest.mark.parametrize(("bits", "qmax"), [(8, 127), (4, 7)])
def test_topk_value_error_is_at_most_half_a_step(bits, qmax):
    x = _deltas()["w"].reshape(-1)
    out = _roundtrip(CodecConfig(density=0.2, value_bits=bits, block_size=0, dense_below=0), {"w": x})["w"]
    kept = torch.nonzero(out.reshape(-1)).reshape(-1)
    step = x[kept].abs().max() / qmax
    assert torch.all((x[kept] - out[kept]).abs() <= step / 2 * (1 + 1e-5))


def test_global_topk_takes_the_largest_entries_across_tensors():
    g = torch.Generator().manual_seed(1)
    big, small = torch.randn(400, generator=g) * 100, torch.randn(600, generator=g)
    out = _roundtrip(CodecConfig(density=0.1, topk_scope="global", dense_below=0), {"big": big, "small": small})
    assert _nonzero(out["big"]) == _largest(big, 100)
    assert not out["small"].any()


def test_per_tensor_topk_keeps_a_share_of_every_tensor():
    g = torch.Generator().manual_seed(1)
    big, small = torch.randn(400, generator=g) * 100, torch.randn(600, generator=g)
    out = _roundtrip(CodecConfig(density=0.1, dense_below=0), {"big": big, "small": small})
    assert (int(out["big"].count_nonzero()), int(out["small"].count_nonzero())) == (40, 60)


def test_topk_sampled_threshold_selects_the_exact_top_k():
    # Above sparse._EXACT_BELOW entries, so the threshold comes from a sample.
    a = np.abs(np.random.default_rng(3).standard_t(3, 300_000).astype(np.float32))
    (got,) = sparse.topk_indices([a], 3000)
    assert np.array_equal(got, np.sort(np.argsort(-a, kind="stable")[:3000]))


def test_topk_with_massive_ties_keeps_the_lowest_indices():
    a = np.ones(300_000, np.float32)
    a[[5, 299_999]] = 2.0
    (got,) = sparse.topk_indices([a], 1000)
    assert np.array_equal(got, np.r_[np.arange(999), 299_999])  # both 2.0s, then ties from index 0


def test_small_tensors_are_sent_dense_under_topk():
    codec = DeltaCodec(CodecConfig(dense_below=100))
    data = codec.encode_without_feedback({"b": torch.randn(99), "w": torch.randn(100)})
    assert [e["enc"] for e in _entries(data)] == ["int8", "topk"]


# --- index coding -----------------------------------------------------------------------


def _index_kind(density: float, numel: int = 10_000) -> str:
    data = DeltaCodec(CodecConfig(density=density, dense_below=0)).encode_without_feedback({"w": torch.randn(numel)})
    return _entries(data)[0]["params"]["index"]


def test_sparse_index_sets_are_coded_as_varint_gaps():
    assert _index_kind(0.01) == "gaps"


def test_dense_index_sets_are_coded_as_a_bitmap():
    assert _index_kind(0.5) == "bitmap"


def test_index_coding_picks_the_smaller_encoding():
    idx = np.sort(np.random.default_rng(0).choice(80_000, 9_000, replace=False))
    kind, data = sparse.encode_indices(idx, 80_000)
    gaps = np.diff(np.r_[-1, idx]) - 1
    varint_bytes = int(sum(max(1, math.ceil(int(g).bit_length() / 7)) for g in gaps))
    assert (kind, len(data)) == (("gaps", varint_bytes) if varint_bytes <= 10_000 else ("bitmap", 10_000))


def test_varint_gaps_roundtrip_huge_gaps():
    idx = np.array([0, 1, 2**20, 2**40, 2**46 - 1], np.int64)
    kind, data = sparse.encode_indices(idx, 2**46)
    assert kind == "gaps"
    assert np.array_equal(sparse.decode_gaps(data, idx.size, 2**46, "t"), idx)


def test_bitmap_roundtrips():
    idx = np.array([0, 3, 7, 8, 12], np.int64)
    assert np.array_equal(sparse.decode_bitmap(sparse.encode_bitmap(idx, 13), 5, 13, "t"), idx)


def test_zstd_is_used_only_where_it_pays():
    zeros = DeltaCodec(CodecConfig(encoder="fp16")).encode_without_feedback({"z": torch.zeros(10_000)})
    noise = DeltaCodec(CodecConfig(encoder="int8")).encode_without_feedback({"n": torch.rand(10_000) * 2 - 1})
    assert _entries(zeros)[0]["sections"][0][0] == 1
    assert _entries(noise)[0]["sections"][1][0] == 0


# --- determinism ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoding_the_same_bytes_twice_gives_identical_bits(name):
    deltas = _deltas()
    data = DeltaCodec(CONFIGS[name]).encode_without_feedback(deltas)
    a, b = (decode(data, _manifest(deltas), max_bytes=LIMIT) for _ in range(2))
    assert all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in deltas)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encoding_is_deterministic(name):
    deltas = _deltas()
    codec = DeltaCodec(CONFIGS[name])
    assert codec.encode_without_feedback(deltas) == codec.encode_without_feedback(deltas)


# --- error feedback ---------------------------------------------------------------------


def _cumulative_gaps(rounds: int, with_feedback: bool) -> list[float]:
    """||sum of true deltas - sum of decoded deltas|| after each round."""
    codec = DeltaCodec(CodecConfig(density=0.2, dense_below=0))
    feedback = codec.feedback()
    g = torch.Generator().manual_seed(0)
    true_sum, sent_sum, gaps = torch.zeros(2000), torch.zeros(2000), []
    for _ in range(rounds):
        delta = torch.randn(2000, generator=g) + 0.5  # a drift that every round shares, as in training
        data = feedback.encode({"w": delta}).data if with_feedback else codec.encode_without_feedback({"w": delta})
        true_sum += delta
        sent_sum += decode(data, {"w": ("F32", (2000,))}, max_bytes=LIMIT)["w"]
        gaps.append(float((true_sum - sent_sum).norm()))
    return gaps


def test_with_error_feedback_the_transmitted_sum_tracks_the_true_sum():
    with_fb, without = _cumulative_gaps(40, True), _cumulative_gaps(40, False)
    assert max(with_fb[20:]) < 1.5 * max(with_fb[:20])  # bounded: stops growing
    assert without[-1] > 1.8 * without[19]  # grows like sqrt(rounds) or worse
    assert with_fb[-1] < without[-1] / 3


def test_residual_is_exactly_what_receivers_have_not_received():
    feedback = DeltaCodec(CodecConfig(density=0.1, dense_below=0)).feedback()
    g = torch.Generator().manual_seed(0)
    true_sum, sent_sum = torch.zeros(500), torch.zeros(500)
    for _ in range(5):
        delta = torch.randn(500, generator=g)
        sent_sum += decode(feedback.encode({"w": delta}).data, {"w": ("F32", (500,))}, max_bytes=LIMIT)["w"]
        true_sum += delta
    assert torch.allclose(sent_sum + feedback.residual["w"], true_sum, atol=1e-5)


def test_error_feedback_leaves_the_callers_delta_untouched():
    delta = {"w": torch.randn(300)}
    before = delta["w"].clone()
    DeltaCodec(CodecConfig(density=0.1, dense_below=0)).feedback().encode(delta)
    assert torch.equal(delta["w"], before)


def test_rollback_restores_the_residual_before_the_last_encode():
    feedback = DeltaCodec(CodecConfig(density=0.1, dense_below=0)).feedback()
    feedback.encode({"w": torch.randn(300)})
    kept = feedback.residual["w"].clone()
    feedback.encode({"w": torch.randn(300)})
    feedback.rollback()
    assert torch.equal(feedback.residual["w"], kept)


def _feedback_run(config: CodecConfig, rounds: int, seed: int = 0) -> tuple[list[bytes], dict[str, torch.Tensor]]:
    feedback = DeltaCodec(config).feedback()
    g = torch.Generator().manual_seed(seed)
    payloads = [feedback.encode({"w": torch.randn(40, 30, generator=g), "b": torch.randn(9, generator=g)}).data for _ in range(rounds)]
    return payloads, feedback.residual


def test_feedback_decay_one_is_plain_error_feedback_bit_for_bit():
    plain, plain_res = _feedback_run(CodecConfig(density=0.05, dense_below=0), 6)
    one, one_res = _feedback_run(CodecConfig(density=0.05, dense_below=0, feedback_decay=1.0), 6)
    assert plain == one
    assert all(torch.equal(plain_res[k], one_res[k]) for k in plain_res)


def test_feedback_decay_scales_the_residual_before_adding_the_delta():
    # SparseLoCo's accumulator: e <- beta * e + delta; send C(e); e <- e - C(e)
    beta = 0.9
    config = CodecConfig(density=0.1, dense_below=0, feedback_decay=beta)
    feedback = DeltaCodec(config).feedback()
    g = torch.Generator().manual_seed(1)
    manifest = {"w": ("F32", (500,))}
    e = torch.zeros(500)
    for _ in range(5):
        delta = torch.randn(500, generator=g)
        e = torch.mul(e, beta) + delta
        expected = DeltaCodec(config).encode_without_feedback({"w": e})
        data = feedback.encode({"w": delta}).data
        assert data == expected
        e = e - decode(data, manifest, max_bytes=LIMIT)["w"]
        assert torch.equal(feedback.residual["w"], e)


def test_feedback_decay_zero_forgets_what_was_not_sent():
    config = CodecConfig(density=0.1, dense_below=0, feedback_decay=0.0)
    feedback = DeltaCodec(config).feedback()
    feedback.encode({"w": torch.randn(300)})
    delta = {"w": torch.randn(300)}
    assert feedback.encode(delta).data == DeltaCodec(config).encode_without_feedback(delta)


def test_decayed_feedback_keeps_the_residual_bounded():
    # a constant drift: with decay the residual settles below drift / (1 - beta) per entry
    beta = 0.95
    feedback = DeltaCodec(CodecConfig(density=0.02, dense_below=0, feedback_decay=beta)).feedback()
    for _ in range(200):
        feedback.encode({"w": torch.full((1000,), 0.01)})
    assert float(feedback.residual["w"].abs().max()) <= 0.01 / (1 - beta) + 1e-6


def test_error_feedback_refuses_a_tensor_whose_shape_changed():
    feedback = DeltaCodec(CodecConfig(density=0.1, dense_below=0)).feedback()
    feedback.encode({"w": torch.randn(300)})
    with pytest.raises(UnsupportedDelta):
        feedback.encode({"w": torch.randn(301)})


def test_encoded_delta_reports_its_ratio_against_float32():
    encoded = DeltaCodec(CodecConfig(encoder="fp16", zstd_level=0)).feedback().encode({"w": torch.randn(1000)})
    assert encoded.numel == 1000 and 1.9 < encoded.ratio < 2.0


# --- encoding errors (ours) -------------------------------------------------------------


@pytest.mark.parametrize("bad", [torch.tensor([1.0, math.nan]), torch.tensor([math.inf]), torch.arange(3)])
def test_encoding_refuses_non_finite_or_non_float_tensors(bad):
    with pytest.raises(UnsupportedDelta) as e:
        DeltaCodec().encode_without_feedback({"x": bad})
    assert isinstance(e.value, LocalProtocolError)


@pytest.mark.parametrize(
    "field", ["encoder", "block_size", "density", "topk_scope", "value_bits", "dense_below", "zstd_level", "feedback_decay"]
)
def test_config_refuses_out_of_range_fields(field):
    bad = {
        "encoder": "lz4",
        "block_size": -1,
        "density": 0.0,
        "topk_scope": "row",
        "value_bits": 2,
        "dense_below": -1,
        "zstd_level": 22,
        "feedback_decay": 1.5,
    }
    with pytest.raises(InvalidCodecConfig) as e:
        CodecConfig(**{field: bad[field]})
    assert e.value.field == field


@pytest.mark.parametrize("encoder,bits", [("lowbit", 4), ("lowbit", 8), ("topk", 1), ("topk", 2), ("lowbit", True)])
def test_config_refuses_bit_widths_the_encoder_lacks(encoder, bits):
    with pytest.raises(InvalidCodecConfig) as e:
        CodecConfig(encoder=encoder, value_bits=bits)
    assert e.value.field == "value_bits"


def test_codec_errors_are_protocol_errors():
    assert issubclass(CodecError, ProtocolError) and issubclass(CodecError, P2PModelError)
    assert issubclass(MalformedDelta, RemoteProtocolError)


# --- decoding errors (the peer's) -------------------------------------------------------

BASE = {"w": torch.randn(40, 25), "b": torch.randn(10)}
MANIFEST = _manifest(BASE)


def _payload(config: CodecConfig, deltas=None) -> dict:
    return msgpack.unpackb(DeltaCodec(config).encode_without_feedback(deltas or BASE), raw=False)


def _topk(**overrides) -> dict:
    return _payload(CodecConfig(**{"density": 0.05, "dense_below": 0, "zstd_level": 0, **overrides}))


def _set(path: list, value):
    """Mutator setting the field at `path` of a payload (a list of keys and indices)."""

    def mutate(p):
        node = p
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return p

    return mutate


def _del(path: list):
    def mutate(p):
        node = p
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        return p

    return mutate


def _replace_section(section: int, raw: bytes, comp: int = 0, raw_len: int | None = None):
    return _set(["tensors", 0, "sections", section], [comp, len(raw) if raw_len is None else raw_len, raw])


def _varints(values: list[int]) -> bytes:
    out = bytearray()
    for v in values:
        while True:
            out.append((v & 0x7F) | (0x80 if v >= 0x80 else 0))
            v >>= 7
            if not v:
                break
    return bytes(out)


def _lowbit(**overrides) -> dict:
    return _payload(CodecConfig(**{"encoder": "lowbit", "value_bits": 1, "block_size": 64, "zstd_level": 0, **overrides}))


T0 = ["tensors", 0]
MALFORMED = {
    "lowbit bits not 1 or 2": (_lowbit, _set([*T0, "params", "bits"], 4), "params.bits"),
    "lowbit bits a bool": (_lowbit, _set([*T0, "params", "bits"], True), "params.bits"),
    "lowbit extra param": (_lowbit, _set([*T0, "params", "k"], 3), "params"),
    "lowbit wrong code bytes": (_lowbit, _replace_section(1, b"\0" * 124), "sections[1]"),
    "lowbit wrong scale count": (_lowbit, _replace_section(0, b"\0" * 12), "sections[0]"),
    "lowbit NaN scale": (_lowbit, _replace_section(0, np.full(16, np.nan, np.float32).tobytes()), "sections[0]"),
    "lowbit padding bits set": (  # tensor 1 has 10 entries: 2 bytes of 1-bit codes, 6 padding bits
        _lowbit,
        _set(["tensors", 1, "sections", 1], [0, 2, b"\x00\xff"]),
        "tensors[1].sections[1]",
    ),
    "format version": (_topk, _set(["format"], 2), "format"),
    "format is a bool": (_topk, _set(["format"], True), "format"),
    "extra envelope key": (_topk, _set(["extra"], 1), "payload"),
    "tensors not a list": (_topk, _set(["tensors"], {}), "tensors"),
    "entry not a map": (_topk, _set(T0, [1, 2]), "tensors[0]"),
    "entry key missing": (_topk, _del([*T0, "dtype"]), "tensors[0]"),
    "name not a string": (_topk, _set([*T0, "name"], 5), "name"),
    "empty name": (_topk, _set([*T0, "name"], ""), "name"),
    "unknown dtype": (_topk, _set([*T0, "dtype"], "I64"), "dtype"),
    "negative dimension": (_topk, _set([*T0, "shape"], [-40, 25]), "shape"),
    "float dimension": (_topk, _set([*T0, "shape"], [40.0, 25]), "shape"),
    "bool dimension": (_topk, _set([*T0, "shape"], [True, 25]), "shape"),
    "too many dimensions": (_topk, _set([*T0, "shape"], [1] * 33), "shape"),
    "unknown encoder": (_topk, _set([*T0, "enc"], "lz4"), "enc"),
    "extra param": (_topk, _set([*T0, "params", "seed"], 1), "params"),
    "k beyond numel": (_topk, _set([*T0, "params", "k"], 1001), "params.k"),
    "negative block": (_topk, _set([*T0, "params", "block"], -1), "params.block"),
    "bits not 4 or 8": (_topk, _set([*T0, "params", "bits"], 3), "params.bits"),
    "unknown index coding": (_topk, _set([*T0, "params", "index"], "rle"), "params.index"),
    "missing section": (_topk, _del([*T0, "sections", 2]), "sections"),
    "section not a list": (_topk, _set([*T0, "sections", 0], b"x"), "sections[0]"),
    "unknown compression": (_topk, _set([*T0, "sections", 1, 0], 7), "sections[1]"),
    "raw length disagrees with data": (_topk, _set([*T0, "sections", 2, 1], 49), "sections[2]"),
    "wrong scale count": (_topk, _replace_section(1, b"\0" * 8), "sections[1]"),
    "wrong value count": (_topk, _replace_section(2, b"\0" * 49), "sections[2]"),
    "zstd no smaller than raw": (_topk, _replace_section(2, b"\0" * 50, comp=1), "sections[2]"),
    "zstd garbage": (_topk, _replace_section(2, b"garbage", comp=1, raw_len=50), "sections[2]"),
    "zstd frame of another size": (
        _topk,
        _replace_section(2, zstandard.ZstdCompressor().compress(b"\0" * 60), comp=1, raw_len=50),
        "sections[2]",
    ),
    "varint count short": (_topk, _replace_section(0, _varints([0] * 49)), "sections[0]"),
    "bytes after the varints": (_topk, _replace_section(0, _varints([0] * 50) + b"\x80"), "sections[0]"),
    "index out of range": (_topk, _replace_section(0, _varints([0] * 49 + [951])), "sections[0]"),
    "gap beyond the tensor": (_topk, _replace_section(0, _varints([2**40] + [0] * 49)), "sections[0]"),
    "over-long varint": (_topk, _replace_section(0, b"\x80" * 8 + b"\x01" + _varints([0] * 49)), "sections[0]"),
    "non-canonical varint": (_topk, _replace_section(0, b"\x80\x00" + _varints([0] * 49)), "sections[0]"),
    "bitmap popcount": (
        lambda: _topk(density=0.5),
        _replace_section(0, b"\xff" * 125),
        "sections[0]",
    ),
    "bitmap padding bits": (
        lambda: _payload(CodecConfig(density=0.5, dense_below=0, zstd_level=0), {"b": BASE["b"]}),
        _replace_section(0, bytes([0x1F, 0x04])),
        "sections[0]",
    ),
    "NaN scale": (_topk, _replace_section(1, np.full(1, np.nan, np.float32).tobytes()), "sections[1]"),
    "negative scale": (_topk, _replace_section(1, np.full(1, -1, np.float32).tobytes()), "sections[1]"),
    "scale that would overflow F16": (
        lambda: _set([*T0, "dtype"], "F16")(_topk()),
        _replace_section(1, np.full(1, 600, np.float32).tobytes()),
        "sections[1]",
    ),
    "infinite fp16 value": (
        lambda: _payload(CodecConfig(encoder="fp16", zstd_level=0)),
        _replace_section(0, np.full(1000, np.inf, np.float16).tobytes()),
        "sections[0]",
    ),
    "int8 block count": (
        lambda: _payload(CodecConfig(encoder="int8", zstd_level=0)),
        _set([*T0, "params", "block"], 100),
        "sections[0]",
    ),
    "duplicate tensor": (_topk, lambda p: (p["tensors"].append(p["tensors"][0]), p)[1], "tensors[2]"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_decoder_refuses_malformed_field(case):
    make, mutate, where = MALFORMED[case]
    data = msgpack.packb(mutate(make()), use_bin_type=True)
    with pytest.raises(MalformedDelta) as e:
        decode(data, MANIFEST, max_bytes=LIMIT)
    assert where in e.value.where



def test_corrupted_lowbit_payloads_raise_only_codec_errors():
    data = DeltaCodec(CodecConfig(encoder="lowbit", value_bits=2, block_size=64, zstd_level=0)).encode_without_feedback(BASE)
    rng = np.random.default_rng(0)
    for _ in range(300):
        buf = bytearray(data)
        for pos in rng.integers(0, len(buf), rng.integers(1, 4)):
            buf[pos] = int(rng.integers(0, 256))
        try:
            out = decode(bytes(buf), MANIFEST, max_bytes=LIMIT)
        except CodecError:
            continue
        assert all(bool(torch.isfinite(t).all()) and tuple(t.shape) == MANIFEST[n][1] for n, t in out.items())

@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92\x01", msgpack.packb([1, 2]), "text"])
def test_decoder_refuses_what_is_not_a_payload(data):
    with pytest.raises(MalformedDelta):
        decode(data, MANIFEST, max_bytes=LIMIT)


def test_decoder_refuses_a_tensor_missing_from_the_base():
    data = DeltaCodec().encode_without_feedback({"other": torch.randn(10)})
    with pytest.raises(ManifestMismatch) as e:
        decode(data, MANIFEST, max_bytes=LIMIT)
    assert (e.value.name, e.value.expected) == ("other", None)


def test_decoder_refuses_a_shape_other_than_the_base():
    data = DeltaCodec().encode_without_feedback({"b": torch.randn(2, 5)})
    with pytest.raises(ManifestMismatch) as e:
        decode(data, MANIFEST, max_bytes=LIMIT)
    assert (e.value.expected, e.value.got) == ((10,), (2, 5))


def test_decoder_refuses_payloads_over_max_bytes():
    data = DeltaCodec().encode_without_feedback(BASE)
    with pytest.raises(DeltaTooLarge) as e:
        decode(data, MANIFEST, max_bytes=4 * 1000)
    assert e.value.limit == 4000


def test_decoder_accepts_tensor_entries_as_manifest():
    class Entry:  # the shape of lineage's TensorEntry
        def __init__(self, shape):
            self.dtype, self.shape = "F32", shape

    data = DeltaCodec().encode_without_feedback(BASE)
    out = decode(data, {k: Entry(tuple(v.shape)) for k, v in BASE.items()}, max_bytes=LIMIT)
    assert set(out) == set(BASE)


def test_tensors_absent_from_the_payload_are_absent_from_the_result():
    out = decode(DeltaCodec().encode_without_feedback({"b": BASE["b"]}), MANIFEST, max_bytes=LIMIT)
    assert list(out) == ["b"]
