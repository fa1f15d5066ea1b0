"""Generalized task arithmetic: `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`.

One family, as in mergekit (`mergekit/merge_methods/generalized_task_arithmetic.py`,
`GTATask.execute`, registered with per-variant defaults in `mergekit/merge_methods/registry.py`).
With task vectors `d_i = x_i - base` (shape `(n, *shape)`) and weights `w_i`:

1. sparsify each `d_i` (see `sparsify.py`): TIES by magnitude, DARE by a random drop;
2. `wd_i = w_i * d_i`;
3. with sign consensus (TIES, DARE-TIES): `sign* = +1 where sum_i wd_i >= 0 else -1`
   ("sum", mergekit's default and the TIES paper's elect step) or the same on
   `sum_i sign(wd_i)` ("count"); `m_i = (sign(wd_i) == sign*)` (a zero entry never agrees);
   `mixed = sum_i m_i wd_i`, `divisor = sum_i m_i w_i` (set to 1 where it is 0);
   without consensus: `mixed = sum_i wd_i`, `divisor = sum_i w_i` (1 where `|.| < 1e-8`);
4. `mixed /= divisor` when `normalize`; then `mixed *= lambda`;
5. the merged model is `base + mixed` (the engine adds the base; `merge_deltas` does not).

Defaults are mergekit's: density 1.0 (no trimming unless asked), TIES normalises, DARE
does not and rescales what it keeps by L1 norm, task arithmetic does neither.
Weights default to 1.0 per model (mergekit requires them).

Where the papers differ from mergekit, the paper's variant is an option:
`ties(scope="model")` trims each task vector over the whole model instead of per tensor
(Yadav et al. 2023); `dare_*(rescale="density")` rescales by `1/density` (Yu et al. 2023)
instead of matching the L1 norm.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Annotated, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from p2pmodel.merge.registry import Check, merge_method
from p2pmodel.merge.sparsify import _RESCALE_EPS, Rescale, bernoulli, magnitude
from p2pmodel.merge.workspace import buffer

__all__ = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "sign_consensus_mask"]

Density = Annotated[list[float], Check(lambda v: 0 < v <= 1, "must be in (0, 1]")]
Consensus = Literal["sum", "count"]


def sign_consensus_mask(weighted: Tensor, method: Consensus = "sum") -> Tensor:
    """Which entries agree with the elected sign (mergekit's `get_mask`). Bool, `(n, *shape)`."""
    sign = weighted.sign()  # (n, *shape)
    votes = weighted.sum(dim=0) if method == "sum" else sign.sum(dim=0)  # (*shape)
    elected = (votes >= 0).to(weighted.dtype).mul_(2).sub_(1)  # ties elect +1, as mergekit
    return sign.eq_(elected).bool()  # in place: `sign` is ours


def _mix(
    deltas: Tensor, weights: list[float], consensus: Consensus | None, normalize: bool, lambda_: float
) -> Tensor:
    w = torch.tensor(weights, dtype=deltas.dtype).view(-1, *([1] * (deltas.dim() - 1)))  # (n, 1, ...)
    weighted = deltas * w  # (n, *shape)
    if consensus is not None:
        mask = sign_consensus_mask(weighted, consensus)  # (n, *shape), bool
        mixed = weighted.mul_(mask).sum(dim=0)  # (*shape); in place: one (n, *shape) copy fewer
        del weighted
        divisor = mask.to(deltas.dtype).mul_(w).sum(dim=0)  # (*shape)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = _divisor(w)  # (1, ...)
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return mixed


FUSED = True  # use the fused kernels where they apply; tests turn it off to compare with torch


def _divisor(w: Tensor) -> Tensor:
    """The no-consensus divisor: the weights' sum, 1 where it is (nearly) zero (mergekit's)."""
    divisor = w.sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    return divisor


def _fused(
    deltas: Tensor | None,
    weights: list[float],
    consensus: Consensus | None,
    normalize: bool,
    lambda_: float,
    *,
    trim: list[float] | None = None,
    drop: list[float] | None = None,
    rescale: Rescale = "none",
    generator: torch.Generator | None = None,
    models: Sequence[Tensor] | None = None,
    base: Tensor | None = None,
    mapped: bool = False,
) -> Tensor | None:
    """`_mix` after TIES' trim (`trim`: densities) or DARE's drop (`drop`), by the fused float32
    kernels (`kernels.py`); None where they do not apply (the torch path then runs).

    Takes the task vectors as `deltas`, or `models` and `base`, and then returns the merged
    model: the kernels read the models and the base where they lie and subtract in each pass,
    so no task-vector array is made, and add the base in the mix. DARE advances `generator` by
    one draw per entry of every model with density < 1, as `torch.bernoulli` does.
    `mapped`: `models` and `base` lie in file mappings nobody writes to (the engine's inputs);
    their pages are handed back to the page cache once a pass is done with them (`pages.py`).
    """
    if not FUSED or (trim is not None and rescale != "none") or (drop is not None and rescale == "density"):
        return None  # the rare rescales keep the torch path (its division rounding is torch's)
    inputs = [deltas] if models is None else [*models, base]
    if any(t is None or t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() == 0 for t in inputs):
        return None
    # Imported here: loading the compiled kernels costs ~0.5 s, which only these merges need.
    from p2pmodel.merge import kernels

    shape = inputs[0].shape[1:] if models is None else base.shape
    size = math.prod(shape)
    n = len(weights)
    if models is None:
        rows, b = list(deltas.reshape(n, size).contiguous().numpy()), None
    else:  # `contiguous()` is a no-op for tensors read from safetensors: no copy
        rows, b = [x.contiguous().reshape(-1).numpy() for x in models], base.contiguous().reshape(-1).numpy()
    release = _Release.when_mapped(rows, b) if mapped and models is not None else None
    trims, scale, keep_bits = None, None, None
    if trim is not None:
        flags = buffer("flags", (size,), torch.uint8).numpy()
        trims = []
        for i, p in enumerate(trim):  # density 1 keeps everything
            trims.append(kernels.trim_threshold(rows[i], max(1, int(p * size)), flags, base=b) if p < 1 else None)
            if release:
                release.model(i)
    if drop is not None:
        assert generator is not None
        scale, keep_bits = _drop(kernels, rows, b, drop, rescale, generator, release)
    mode = {None: kernels.MIX_NONE, "sum": kernels.MIX_SUM, "count": kernels.MIX_COUNT}[consensus]
    w = torch.tensor(weights, dtype=torch.float32)  # (n,)
    divisor = _divisor(w.view(-1, 1)).item() if consensus is None else 1.0
    out = np.empty(size, dtype=np.float32)
    kernels.mix(rows, w.numpy(), mode=mode, normalize=normalize, divisor=divisor, lam=lambda_, scale=scale,
                trims=trims, keep_bits=keep_bits, dropped=[p < 1 for p in drop] if drop is not None else None,
                base=b, out=out, done=release.upto if release else None)
    return torch.from_numpy(out).view(shape)


class _Release:
    """Hands the inputs' pages back to the page cache (`pages.py`) as the passes finish with them."""

    MIN_BYTES = 4 << 20  # smaller tensors: not worth a look at /proc/self/maps (~0.3 ms)

    def __init__(self, rows: list[np.ndarray], base: np.ndarray):
        from p2pmodel.merge import pages

        self.drop, self.rows, self.base = pages.drop, rows, base

    @classmethod
    def when_mapped(cls, rows: list[np.ndarray], base: np.ndarray) -> _Release | None:
        """A `_Release` if the inputs are large and do lie in file mappings, else None."""
        from p2pmodel.merge import pages

        if base.nbytes < cls.MIN_BYTES or not pages.file_mapped([*rows, base]):
            return None
        return cls(rows, base)

    def model(self, i: int) -> None:
        """Model `i` is done with until the mix (which maps it again a chunk at a time)."""
        self.drop(self.rows[i])

    def upto(self, j: int) -> None:
        """The mix is done with entries `[0, j)` of every input."""
        for a in (*self.rows, self.base):
            self.drop(a, 4 * j)


def _drop(kernels: ModuleType, rows: list[np.ndarray], b: np.ndarray | None, drop: list[float], rescale: Rescale,
          generator: torch.Generator, release: _Release | None) -> tuple[np.ndarray, np.ndarray]:
    """DARE's drop for the fused mix: the keep decisions of every model with density < 1 (one bit
    an entry, `(n, ceil(size / 8))`) and each model's L1 rescale factor (1 where not rescaled)."""
    from p2pmodel.merge.mt19937 import Mt19937, keep_threshold

    n, size = len(rows), rows[0].size
    kept_abs = buffer("kept_abs", (size,), torch.float32)  # |d|, then |d * keep|: what the L1 norms sum
    keep_bits = buffer("keep_bits", (n, (size + 7) // 8), torch.uint8).numpy()
    stream = Mt19937.from_torch(generator)
    scale = np.ones(n, dtype=np.float32)
    for i, p in enumerate(drop):
        if p >= 1:
            continue
        if rescale == "l1":
            kernels.abs_delta(rows[i], b, kept_abs.numpy())
            before = kept_abs.sum()  # torch's own reduction, as `d.abs().sum()`
        kernels.dare_drop(rows[i], b, stream, keep_threshold(p), keep_bits[i], kept_abs.numpy())
        if rescale == "l1":
            after = kept_abs.sum()
            if not (before < _RESCALE_EPS or after < _RESCALE_EPS):
                scale[i] = (before / after).item()  # float32, as torch's `masked * (before / after)`
        if release:
            release.model(i)
    stream.store(generator)
    return scale, keep_bits


def fused_merge(method: str, kwargs: dict, models: Sequence[Tensor], base: Tensor,
                generator: torch.Generator | None, mapped: bool = False) -> Tensor | None:
    """The merged model `base + method(models - base)` in the kernels' passes, for the streaming
    engine; None where the fused path does not apply (the caller then stacks task vectors).
    `mapped`: see `_fused`."""
    k, common = kwargs, {"models": models, "base": base, "mapped": mapped}
    if method == "task_arithmetic":
        return _fused(None, k["weights"], None, k["normalize"], k["lambda_"], **common)
    if method == "ties" and k["scope"] == "tensor":
        return _fused(None, k["weights"], k["consensus"], k["normalize"], k["lambda_"], trim=k["density"],
                      rescale=k["rescale"], **common)
    if method in ("dare_linear", "dare_ties"):
        consensus = k["consensus"] if method == "dare_ties" else None
        return _fused(None, k["weights"], consensus, k["normalize"], k["lambda_"], drop=k["density"],
                      rescale=k["rescale"], generator=generator, **common)
    return None


# A scalar default for a per-model (list[float]) parameter is broadcast to every model.


@merge_method(
    "task_arithmetic",
    pretty_name="Task Arithmetic",
    reference_url="https://arxiv.org/abs/2212.04089",
    base="required",
    coordinatewise=True,
)
def task_arithmetic(
    deltas: Tensor,
    *,
    weights: list[float] = 1.0,  # type: ignore[assignment]
    normalize: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """`sum_i w_i d_i` (divided by `sum_i w_i` if `normalize`), times `lambda`."""
    fused = _fused(deltas, weights, None, normalize, lambda_)
    return fused if fused is not None else _mix(deltas, weights, None, normalize, lambda_)


@merge_method(
    "ties",
    pretty_name="TIES",
    reference_url="https://arxiv.org/abs/2306.01708",
    base="required",
)
def ties(
    deltas: Tensor,
    *,
    weights: list[float] = 1.0,  # type: ignore[assignment]
    density: Density = 1.0,  # type: ignore[assignment]
    normalize: bool = True,
    consensus: Consensus = "sum",
    scope: Literal["tensor", "model"] = "tensor",
    rescale: Rescale = "none",
    lambda_: float = 1.0,
) -> Tensor:
    """Trim each task vector to its `density` largest entries, elect signs, average agreeing ones.

    `scope="tensor"` (mergekit) trims per tensor; `scope="model"` (the paper) trims over the
    whole model, which the checkpoint engine does before calling this (for one tensor on
    its own the two are the same).
    """
    fused = _fused(deltas, weights, consensus, normalize, lambda_, trim=density, rescale=rescale)
    if fused is not None:
        return fused
    trimmed = torch.empty_like(deltas)  # (n, *shape); filled one model at a time
    for i, (d, p) in enumerate(zip(deltas, density)):
        trimmed[i] = magnitude(d, p, rescale)
    return _mix(trimmed, weights, consensus, normalize, lambda_)


@merge_method(
    "dare_linear",
    pretty_name="Linear DARE",
    reference_url="https://arxiv.org/abs/2311.03099",
    base="required",
)
def dare_linear(
    deltas: Tensor,
    *,
    weights: list[float] = 1.0,  # type: ignore[assignment]
    density: Density = 1.0,  # type: ignore[assignment]
    rescale: Rescale = "l1",
    normalize: bool = False,
    lambda_: float = 1.0,
    generator: torch.Generator,
) -> Tensor:
    """Drop each entry of each task vector with probability `1 - density`, rescale, add up."""
    fused = _fused(deltas, weights, None, normalize, lambda_, drop=density, rescale=rescale, generator=generator)
    if fused is not None:
        return fused
    dropped = torch.empty_like(deltas)  # (n, *shape); filled one model at a time
    for i, (d, p) in enumerate(zip(deltas, density)):
        dropped[i] = bernoulli(d, p, generator, rescale)
    return _mix(dropped, weights, None, normalize, lambda_)


@merge_method(
    "dare_ties",
    pretty_name="DARE TIES",
    reference_url="https://arxiv.org/abs/2311.03099",
    base="required",
)
def dare_ties(
    deltas: Tensor,
    *,
    weights: list[float] = 1.0,  # type: ignore[assignment]
    density: Density = 1.0,  # type: ignore[assignment]
    rescale: Rescale = "l1",
    normalize: bool = False,
    consensus: Consensus = "sum",
    lambda_: float = 1.0,
    generator: torch.Generator,
) -> Tensor:
    """DARE's random drop, then TIES' sign election and disjoint merge."""
    fused = _fused(deltas, weights, consensus, normalize, lambda_, drop=density, rescale=rescale, generator=generator)
    if fused is not None:
        return fused
    dropped = torch.empty_like(deltas)  # (n, *shape); filled one model at a time
    for i, (d, p) in enumerate(zip(deltas, density)):
        dropped[i] = bernoulli(d, p, generator, rescale)
    return _mix(dropped, weights, consensus, normalize, lambda_)
