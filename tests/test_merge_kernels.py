"""The fused TIES/DARE kernels give the torch path's bits, and their RNG is torch's Bernoulli stream.

`p2pmodel.merge.gta.FUSED = False` forces the torch implementation (the readable one, checked
against mergekit's formulas in test_merge_methods.py); every test here compares the two bit
for bit, on tensors small enough for the whole partition and large enough for the sampled
threshold (>= 65536 entries).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p2pmodel.merge import gta, kernels, merge_checkpoints, merge_tensor
from p2pmodel.merge.mt19937 import Mt19937, keep_threshold


def _inputs(n: int, shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) * 0.1 * (i + 1) for i in range(n)]


def _torch_and_fused(monkeypatch, method: str, models, base, **params) -> tuple[torch.Tensor, torch.Tensor]:
    monkeypatch.setattr(gta, "FUSED", False)
    want = merge_tensor(method, models, base, **params)
    monkeypatch.setattr(gta, "FUSED", True)
    return want, merge_tensor(method, models, base, **params)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


CASES = [
    ("ties", {"density": 0.3}),
    ("ties", {"density": [0.2, 0.5, 0.9, 1.0], "weights": [1.0, 0.5, 0.7, 0.2]}),
    ("ties", {"density": 0.5, "consensus": "count", "lambda_": 0.7, "normalize": False}),
    ("dare_ties", {"density": 0.4, "seed": 5, "name": "w"}),
    ("dare_ties", {"density": [0.3, 0.6, 1.0, 0.5], "weights": [1, 2, 3, 4], "consensus": "count"}),
    ("dare_linear", {"density": 0.5, "rescale": "none", "normalize": True}),
    ("dare_linear", {"density": 0.7, "lambda_": 0.3}),
    ("task_arithmetic", {"weights": [0.3, 0.5, 0.7, 0.9], "lambda_": 0.5, "normalize": True}),
]


@pytest.mark.parametrize("shape", [(6, 7), (300, 257)])
@pytest.mark.parametrize("method,params", CASES)
def test_fused_kernels_give_the_torch_paths_bits(monkeypatch, method, params, shape):
    base, models = _inputs(4, shape)
    want, got = _torch_and_fused(monkeypatch, method, models, base, **params)
    assert torch.equal(_bits(want), _bits(got))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_fused_kernels_match_for_fewer_models(monkeypatch, n):
    base, models = _inputs(n, (70000,), seed=n)
    for method, params in [("ties", {"density": 0.2}), ("dare_ties", {"density": 0.5})]:
        want, got = _torch_and_fused(monkeypatch, method, models, base, **params)
        assert torch.equal(_bits(want), _bits(got)), method


def test_five_or_more_models_differ_from_torch_by_at_most_one_rounding(monkeypatch):
    # torch regroups the rows of sum(dim=0) in its tail columns from 5 rows on; we sum in model order
    base, models = _inputs(7, (1000, 37))
    want, got = _torch_and_fused(monkeypatch, "task_arithmetic", models, base, weights=[0.3] * 7)
    torch.testing.assert_close(got, want, rtol=2e-7, atol=1e-7)


def test_ties_trim_keeps_the_first_of_equal_magnitudes(monkeypatch):
    base = torch.zeros(300, 300)
    g = torch.Generator().manual_seed(1)
    models = [torch.randint(-2, 3, (300, 300), generator=g).float() for _ in range(3)]  # many ties at the cut
    want, got = _torch_and_fused(monkeypatch, "ties", models, base, density=0.3)
    assert torch.equal(_bits(want), _bits(got))


def test_trim_threshold_keeps_exactly_k_when_the_sample_misses():
    # the large magnitudes all sit at the end, where a strided sample under-represents them
    d = np.concatenate([np.full(200_000, 1e-3, np.float32), np.linspace(1, 2, 1000, dtype=np.float32)])
    kth, cut = kernels.trim_threshold(d, 1500)
    kept = (np.abs(d) > kth) | ((np.abs(d) == kth) & (np.arange(d.size) < cut))
    assert np.count_nonzero(kept) == 1500
    assert cut == 500  # the first 500 of the tied 1e-3 entries are kept, in index order
    x, base = d + 0.5, np.full_like(d, 0.5)  # given as `x - base`: the trim of that difference
    assert kernels.trim_threshold(x, 1500, base=base) == kernels.trim_threshold(x - base, 1500)


def test_mt19937_makes_torch_bernoulli_decisions():
    g = torch.Generator().manual_seed(1234)
    stream = Mt19937.from_torch(g)
    for p in (0.1, 0.5, 0.77):
        want = torch.bernoulli(torch.full((100_003,), p), generator=g).bool().numpy()
        draws = stream.fill(np.empty(100_003, dtype=np.uint32))
        assert np.array_equal((draws & 0xFFFFFF) < keep_threshold(p), want)


def test_storing_a_stream_advances_the_torch_generator_as_drawing_would():
    g, ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    stream = Mt19937.from_torch(g)
    stream.fill(np.empty(1000, dtype=np.uint32))
    stream.store(g)
    torch.bernoulli(torch.full((1000,), 0.5), generator=ref)
    assert torch.equal(torch.rand(50, generator=g), torch.rand(50, generator=ref))


def test_the_streaming_engine_takes_the_fused_path_with_the_same_result(monkeypatch, tmp_path):
    from safetensors.torch import load_file, save_file

    base, models = _inputs(3, (400, 300))
    for name, t in [("base", base)] + [(f"m{i}", m) for i, m in enumerate(models)]:
        save_file({"w": t, "b": t[0].clone()}, str(tmp_path / f"{name}.safetensors"))
    paths = [str(tmp_path / f"m{i}.safetensors") for i in range(3)]
    outs = {}
    for fused in (False, True):
        monkeypatch.setattr(gta, "FUSED", fused)
        merge_checkpoints("dare_ties", paths, base=str(tmp_path / "base.safetensors"), density=0.4, seed=3,
                          output=tmp_path / f"out{fused}")
        outs[fused] = load_file(str(tmp_path / f"out{fused}" / "model.safetensors"))
    for name in ("w", "b"):
        assert torch.equal(_bits(outs[False][name]), _bits(outs[True][name]))


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.3}), ("dare_linear", {"density": 0.5, "seed": 2})])
def test_releasing_the_inputs_pages_as_the_merge_goes_keeps_the_bits(monkeypatch, tmp_path, method, params):
    # a tensor above _Release.MIN_BYTES and over one mix chunk: the engine hands the mapped
    # inputs' pages back after each pass and chunk, and the mix maps them again
    from safetensors.torch import load_file, save_file

    base, models = _inputs(3, (1100, 1000))
    for name, t in [("base", base)] + [(f"m{i}", m) for i, m in enumerate(models)]:
        save_file({"w": t}, str(tmp_path / f"{name}.safetensors"))
    paths = [str(tmp_path / f"m{i}.safetensors") for i in range(3)]
    released, upto = [], gta._Release.upto

    def spy(self, j):
        released.append(j)
        upto(self, j)

    monkeypatch.setattr(gta._Release, "upto", spy)
    outs = {}
    for fused in (False, True):
        monkeypatch.setattr(gta, "FUSED", fused)
        merge_checkpoints(method, paths, base=str(tmp_path / "base.safetensors"), output=tmp_path / f"out{fused}",
                          **params)
        outs[fused] = load_file(str(tmp_path / f"out{fused}" / "model.safetensors"))["w"]
    assert released == [kernels._CHUNK, 1100 * 1000]
    assert torch.equal(_bits(outs[False]), _bits(outs[True]))


def test_pages_are_dropped_only_from_file_mappings(tmp_path):
    import mmap

    from p2pmodel.merge import pages

    data = np.arange(1 << 20, dtype=np.float32)
    (tmp_path / "x.bin").write_bytes(data.tobytes())
    with open(tmp_path / "x.bin", "rb") as f:
        mapped = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.float32)
    assert pages.file_mapped([mapped]) and not pages.file_mapped([data])
    pages.drop(mapped)
    assert np.array_equal(mapped, data)  # read back from the page cache
