"""Every merge method agrees with an independent reference computation written here.

The references re-implement mergekit's formulas (arcee-ai/mergekit: merge_methods/linear.py,
slerp.py, generalized_task_arithmetic.py, sparsify.py) and the robust aggregators' papers
with plain loops over coordinates and models, without calling p2pmodel's code. Results must
agree to float32 rounding. The file also pins down parameter handling (one value or one per
model, defaults, ranges), DARE's seeded reproducibility, and the errors for bad requests.
"""

from __future__ import annotations

import hashlib
import math
import statistics

import numpy as np
import pytest
import torch

from p2pmodel.merge import (
    METHODS,
    BaseRequired,
    MergeParameterError,
    ModelCountError,
    ShapeMismatch,
    UnknownMethod,
    merge_deltas,
    merge_tensor,
)

SHAPE = (6, 7)


def rand(seed: int, shape=SHAPE, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture
def base() -> torch.Tensor:
    return rand(0)


@pytest.fixture
def models(base) -> list[torch.Tensor]:
    # fine-tunes: base plus task vectors of different sizes, so trimming and signs matter
    return [base + rand(i, scale=0.1 * i) for i in (1, 2, 3)]


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- references


def ref_linear(xs, ws, normalize=True):
    out = torch.zeros_like(xs[0])
    for x, w in zip(xs, ws):
        out += w * x
    return out / sum(ws) if normalize else out


def ref_keep_top(d: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit `sparsify.magnitude`: keep the int(density * n) largest |d| (at least one)."""
    if density >= 1:
        return d.clone()
    flat = d.reshape(-1).tolist()
    k = max(1, int(density * len(flat)))
    keep = sorted(range(len(flat)), key=lambda j: -abs(flat[j]))[:k]
    out = [0.0] * len(flat)
    for j in keep:
        out[j] = flat[j]
    return torch.tensor(out).reshape(d.shape)


def ref_generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def ref_dare_drop(d, density, gen, rescale="l1"):
    """mergekit `sparsify.bernoulli` with `rescaled_masked_tensor` (L1), or the paper's 1/density."""
    if density >= 1:
        return d.clone()
    mask = torch.bernoulli(torch.full_like(d, density), generator=gen)
    kept = d * mask
    if rescale == "density":
        return kept / density
    before, after = d.abs().sum().item(), kept.abs().sum().item()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def ref_gta(base, deltas, ws, *, consensus, normalize, lam=1.0):
    """mergekit `GTATask.execute` after sparsification, one coordinate at a time."""
    flat = [d.reshape(-1).tolist() for d in deltas]
    out = []
    for j in range(base.numel()):
        wd = [w * f[j] for w, f in zip(ws, flat)]
        if consensus:
            votes = sum(wd) if consensus == "sum" else sum(math.copysign(1, v) if v else 0 for v in wd)
            elected = 1.0 if votes >= 0 else -1.0
            agree = [i for i, v in enumerate(wd) if v != 0 and math.copysign(1, v) == elected]
            mixed = sum(wd[i] for i in agree)
            divisor = sum(ws[i] for i in agree) or 1.0
        else:
            mixed = sum(wd)
            divisor = sum(ws) if abs(sum(ws)) >= 1e-8 else 1.0
        if normalize:
            mixed /= divisor
        out.append(mixed * lam)
    return base + torch.tensor(out).reshape(base.shape)


def ref_slerp(t, v0, v1):
    """mergekit `slerp.slerp`, in numpy float32 as mergekit computes it."""
    a, b = v0.numpy().astype(np.float32), v1.numpy().astype(np.float32)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    an = a / na if na > 1e-8 else a
    bn = b / nb if nb > 1e-8 else b
    dot = np.sum(an * bn)
    if np.abs(dot) > 0.9995:
        return torch.from_numpy((1 - t) * a + t * b)
    theta = np.arccos(dot)
    s0 = np.sin(theta - theta * t) / np.sin(theta)
    s1 = np.sin(theta * t) / np.sin(theta)
    return torch.from_numpy(s0 * a + s1 * b)


def per_coordinate(xs, fn):
    flat = [x.reshape(-1).tolist() for x in xs]
    return torch.tensor([fn([f[j] for f in flat]) for j in range(xs[0].numel())]).reshape(xs[0].shape)


def ref_trimmed(values, k):
    s = sorted(values)
    kept = s[k : len(s) - k]
    return sum(kept) / len(kept)


def ref_centered_clip(deltas, ws, tau, iterations, v):
    total = sum(ws)
    for step in range(iterations):
        dists = [torch.linalg.vector_norm((d - v).double()).item() for d in deltas]
        if step == 0 and tau is None:
            tau = statistics.median(dists)
        step_sum = torch.zeros_like(v)
        for d, w, dist in zip(deltas, ws, dists):
            step_sum += (w / total) * min(1.0, tau / dist if dist else 1.0) * (d - v)
        v = v + step_sum
    return v


# ----------------------------------------------------------------------------- mergekit's methods


def test_linear_is_the_normalised_weighted_sum(models):
    close(merge_tensor("linear", models, None, weights=[1, 2, 3]), ref_linear(models, [1, 2, 3]))


def test_linear_without_normalize_is_the_plain_weighted_sum(models):
    out = merge_tensor("linear", models, None, weights=[0.5, 0.25, 0.25], normalize=False)
    close(out, ref_linear(models, [0.5, 0.25, 0.25], normalize=False))


def test_linear_takes_the_base_as_its_first_input(base, models):
    out = merge_tensor("linear", models, base, weights=[4, 1, 2, 3])
    close(out, ref_linear([base, *models], [4, 1, 2, 3]))


def test_task_arithmetic_adds_the_weighted_task_vectors(base, models):
    ds = [m - base for m in models]
    out = merge_tensor("task_arithmetic", models, base, weights=[0.3, 0.5, 0.7])
    close(out, ref_gta(base, ds, [0.3, 0.5, 0.7], consensus=None, normalize=False))


def test_task_arithmetic_lambda_scales_the_merged_delta(base, models):
    ds = [m - base for m in models]
    out = merge_tensor("task_arithmetic", models, base, lambda_=0.5, normalize=True)
    close(out, ref_gta(base, ds, [1, 1, 1], consensus=None, normalize=True, lam=0.5))


def test_ties_defaults_match_mergekit(base, models):
    # mergekit's ties: density 1.0 (no trim), sign election by weighted sum, normalize=True
    ds = [m - base for m in models]
    out = merge_tensor("ties", models, base, weights=[0.2, 0.5, 0.3])
    close(out, ref_gta(base, ds, [0.2, 0.5, 0.3], consensus="sum", normalize=True))


def test_ties_trims_each_task_vector_per_tensor_by_magnitude(base, models):
    ds = [ref_keep_top(m - base, 0.3) for m in models]
    out = merge_tensor("ties", models, base, weights=[1, 0.5, 0.7], density=0.3)
    close(out, ref_gta(base, ds, [1, 0.5, 0.7], consensus="sum", normalize=True))


def test_ties_takes_one_density_per_model(base, models):
    dens = [0.2, 0.5, 0.9]
    ds = [ref_keep_top(m - base, p) for m, p in zip(models, dens)]
    out = merge_tensor("ties", models, base, density=dens)
    close(out, ref_gta(base, ds, [1, 1, 1], consensus="sum", normalize=True))


def test_ties_trim_breaks_equal_magnitudes_by_position(base):
    # many equal |delta|: mergekit's top-k by a stable sort keeps the first ones in index order
    models = [base + torch.randint(-2, 3, SHAPE, generator=torch.Generator().manual_seed(i)).float() for i in (1, 2)]
    ds = [ref_keep_top(m - base, 0.3) for m in models]
    out = merge_tensor("ties", models, base, density=0.3)
    close(out, ref_gta(base, ds, [1, 1], consensus="sum", normalize=True))


def test_ties_count_consensus_elects_by_number_of_signs(base, models):
    ds = [ref_keep_top(m - base, 0.5) for m in models]
    out = merge_tensor("ties", models, base, weights=[3, 1, 1], density=0.5, consensus="count")
    close(out, ref_gta(base, ds, [3, 1, 1], consensus="count", normalize=True))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_reference_with_the_same_seeded_masks(base, models, method):
    gen = ref_generator(7, "layer.weight")
    ds = [ref_dare_drop(m - base, p, gen) for m, p in zip(models, [0.5, 0.6, 0.7])]
    out = merge_tensor(method, models, base, density=[0.5, 0.6, 0.7], weights=[1, 2, 3], seed=7, name="layer.weight")
    consensus = "sum" if method == "dare_ties" else None
    close(out, ref_gta(base, ds, [1, 2, 3], consensus=consensus, normalize=False))


def test_dare_paper_rescale_divides_by_density(base, models):
    gen = ref_generator(0, "")
    ds = [ref_dare_drop(m - base, 0.4, gen, rescale="density") for m in models]
    out = merge_tensor("dare_linear", models, base, density=0.4, rescale="density")
    close(out, ref_gta(base, ds, [1, 1, 1], consensus=None, normalize=False))


def test_dare_is_reproducible_with_a_seed(base, models):
    a = merge_tensor("dare_ties", models, base, density=0.5, seed=3, name="x")
    b = merge_tensor("dare_ties", models, base, density=0.5, seed=3, name="x")
    assert torch.equal(a, b)


def test_dare_masks_depend_on_seed_and_tensor_name(base, models):
    a = merge_tensor("dare_linear", models, base, density=0.5, seed=3, name="x")
    assert not torch.equal(a, merge_tensor("dare_linear", models, base, density=0.5, seed=4, name="x"))
    assert not torch.equal(a, merge_tensor("dare_linear", models, base, density=0.5, seed=3, name="y"))


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_matches_mergekit(models, t):
    close(merge_tensor("slerp", models[:2], None, t=t), ref_slerp(t, models[0], models[1]))


def test_slerp_of_nearly_colinear_inputs_falls_back_to_lerp(base):
    close(merge_tensor("slerp", [base, base * 2.0], None, t=0.25), ref_slerp(0.25, base, base * 2.0))


def test_slerp_takes_the_base_as_v0(base, models):
    close(merge_tensor("slerp", [models[0]], base, t=0.4), ref_slerp(0.4, base, models[0]))


# ----------------------------------------------------------------------------- robust family


def test_median_is_coordinatewise_with_even_counts_averaged(base, models):
    xs = [*models, base + rand(9)]
    out = merge_tensor("median", xs, base)
    close(out, base + per_coordinate([x - base for x in xs], statistics.median))


def test_median_without_base_is_taken_over_the_raw_tensors(models):
    close(merge_tensor("median", models, None), per_coordinate(models, statistics.median))


@pytest.mark.parametrize("trim,k", [(0.2, 1), (2, 2), (0.0, 0)])
def test_trimmed_mean_drops_k_per_side(base, trim, k):
    xs = [base + rand(10 + i) for i in range(5)]
    out = merge_tensor("trimmed_mean", xs, base, trim=trim)
    close(out, base + per_coordinate([x - base for x in xs], lambda v: ref_trimmed(v, k)))


@pytest.mark.parametrize("init", ["median", "zero", "mean"])
def test_centered_clip_matches_reference(base, models, init):
    ds = [m - base for m in models] + [rand(20, scale=10.0)]
    start = {
        "median": per_coordinate(ds, statistics.median),
        "zero": torch.zeros(SHAPE),
        "mean": sum(ds) / len(ds),
    }[init]
    out = merge_deltas("centered_clip", ds, weights=[1, 2, 1, 1], tau=0.5, iterations=4, init=init)
    close(out, ref_centered_clip(ds, [1, 2, 1, 1], 0.5, 4, start))


def test_centered_clip_default_tau_is_the_median_distance(base, models):
    ds = [m - base for m in models] + [rand(21, scale=5.0)]
    out = merge_deltas("centered_clip", ds)
    close(out, ref_centered_clip(ds, [1, 1, 1, 1], None, 3, per_coordinate(ds, statistics.median)))


@pytest.mark.parametrize("method", ["median", "trimmed_mean", "centered_clip"])
def test_robust_methods_bound_one_poisoned_delta(method):
    honest = [rand(30 + i, scale=0.01) for i in range(6)]
    poisoned = torch.full(SHAPE, 1e6)
    out = merge_deltas(method, [*honest, poisoned])
    assert out.abs().max() < 1.0  # the plain mean would be ~1.4e5


# ----------------------------------------------------------------------------- deltas and params


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "median", "centered_clip"])
def test_merge_deltas_is_the_merged_task_vector(base, models, method):
    ds = [m - base for m in models]
    params = {"density": 0.5} if method in ("ties", "dare_ties") else {}
    merged = merge_tensor(method, models, base, name="n", **params)
    close(base + merge_deltas(method, ds, name="n", **params), merged)


def test_merge_deltas_returns_float32(models):
    out = merge_deltas("linear", [m.half() for m in models])
    assert out.dtype == torch.float32


def test_merge_tensor_returns_the_inputs_dtype(base, models):
    out = merge_tensor("ties", [m.bfloat16() for m in models], base.bfloat16(), density=0.5)
    assert out.dtype == torch.bfloat16


def test_scalar_and_per_model_values_are_equivalent(base, models):
    a = merge_tensor("ties", models, base, weights=0.5, density=0.4)
    b = merge_tensor("ties", models, base, weights=[0.5], density=[0.4, 0.4, 0.4])
    assert torch.equal(a, b)


def test_every_method_is_registered_with_its_name():
    assert set(METHODS) >= {
        "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp",
        "median", "trimmed_mean", "centered_clip",
    }


# ----------------------------------------------------------------------------- bad requests


def test_unknown_method_lists_the_known_ones(models):
    with pytest.raises(UnknownMethod, match="known methods: .*ties"):
        merge_tensor("tiez", models, None)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_outside_zero_one_is_rejected(base, models, density):
    with pytest.raises(MergeParameterError, match="density"):
        merge_tensor("ties", models, base, density=density)


def test_wrong_number_of_per_model_values_is_rejected(base, models):
    with pytest.raises(MergeParameterError, match="2 values for 3 models"):
        merge_tensor("ties", models, base, weights=[1, 2])


def test_slerp_of_three_models_is_rejected(models):
    with pytest.raises(ModelCountError):
        merge_tensor("slerp", models, None, t=0.5)


def test_slerp_needs_t(models):
    with pytest.raises(MergeParameterError, match="'t': is required"):
        merge_tensor("slerp", models[:2], None)


def test_a_parameter_the_method_does_not_take_is_rejected(models):
    with pytest.raises(MergeParameterError, match="not a parameter"):
        merge_tensor("linear", models, None, density=0.5)


def test_task_vector_methods_need_a_base(models):
    with pytest.raises(BaseRequired):
        merge_tensor("ties", models, None)


def test_trimming_everything_is_rejected(base, models):
    with pytest.raises(MergeParameterError, match="trim"):
        merge_tensor("trimmed_mean", models, base, trim=2)


def test_mismatched_shapes_are_rejected(base, models):
    with pytest.raises(ShapeMismatch, match="input 1"):
        merge_tensor("linear", [models[0], models[1][:, :3]], None)
