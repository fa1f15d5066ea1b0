"""The streaming merge engine: checkpoints in, a merged Hugging Face-style folder out.

`merge_checkpoints` checks everything it can before it writes anything: the method and its
parameters, that every input opens, and that every tensor is present (or, with
`allow_missing`, present where it must be) with one shape and one dtype in all inputs. Then
it streams: for each tensor it loads that tensor from each input (lazily, from the
safetensors files via `p2pmodel.checkpoint.open_checkpoint`), merges it, and hands it to
`write_hf_folder`, which writes it at its place in a pre-laid-out shard. So peak memory is
about one tensor per input plus a few working copies of it, never whole models. The output
folder appears atomically (built under a temp name, then renamed); on any error nothing is
left behind. `config.json` and the other side files come from the base (or first) model.

Tensors missing from some models (mergekit, `mergekit/io/tasks.py`): mergekit raises
"Tensor X required but not present in model M" for a weight its architecture requires, and
for an optional one merges over the models that have it (`GatherTensors` drops the absent
ones; a task-vector merge with no model left returns the base). Without an architecture to
say which weights are optional, we raise `TensorMissing` by default, naming the tensor and
the model; `allow_missing=True` gives mergekit's optional-weight behaviour for every tensor
(the base, or first model, still defines the output's tensor list and must hold each one).

Integer and bool tensors (position ids, masks) are not merged: they must be equal in every
input and are copied, else `UnmergeableTensor`.

TIES with `scope="model"` (the paper's trim over the whole task vector) needs each model's
magnitude threshold before merging: two extra streaming passes build exact histograms of
`|delta|` over float32 bit patterns (high 16 bits, then low 16 bits within the bin holding
the k-th largest), so the threshold is exact and memory stays at one tensor per input.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch

from p2pmodel.checkpoint import (
    CheckpointError,
    CheckpointReader,
    dtype_name,
    open_checkpoint,
    torch_dtype,
    write_hf_folder,
)
from p2pmodel.checkpoint import OutputExists
from p2pmodel.merge.functional import (
    BaseRequired,
    DtypeMismatch,
    ShapeMismatch,
    UnmergeableTensor,
    merge_one,
    prepare,
)
from p2pmodel.merge.registry import MergeError, MergeMethod, get_method
from p2pmodel.merge.sparsify import above_threshold
from p2pmodel.merge.workspace import reuse_buffers

__all__ = ["MergeReport", "TensorMissing", "InputError", "OutputExists", "merge_checkpoints", "PROVENANCE_FILE"]

PROVENANCE_FILE = "p2pmodel_merge.json"  # method, parameters and inputs of the merge
ProgressCallback = Callable[[int, int, str], None]  # (tensors done, tensors total, tensor name)


class TensorMissing(MergeError):
    """A tensor is absent from one of the inputs."""

    def __init__(self, tensor: str, model: str):
        self.tensor, self.model = tensor, model
        super().__init__(
            f"tensor {tensor!r} is missing from {model} (pass --allow-missing to merge it over the models that have it)"
        )


class InputError(MergeError):
    """An input checkpoint cannot be opened or read; `cause` is the checkpoint error."""

    def __init__(self, path: str, cause: CheckpointError):
        self.path, self.cause = path, cause
        super().__init__(f"cannot read input {path}: {cause}")


@dataclass(frozen=True)
class MergeReport:
    """What a merge did."""

    method: str
    params: dict[str, Any]  # resolved parameters, defaults filled in, per-model as lists
    models: tuple[str, ...]  # the merged models, in order (for linear/slerp, the base first)
    base: str | None  # the base model task vectors were taken against
    output: str
    tensors: int  # tensors written
    merged: int  # of which merged (the rest: integer tensors copied, or missing elsewhere)
    bytes_read: int  # tensor bytes loaded from the inputs, all passes
    bytes_written: int  # tensor bytes written
    seconds: float
    partial: dict[str, list[str]] = field(default_factory=dict)  # tensor -> models lacking it


def _label(source: Any) -> str:
    return source.label if hasattr(source, "names") else str(source)


def _open(source: Any) -> CheckpointReader:
    if hasattr(source, "names"):  # already a reader (a lineage version)
        return source
    try:
        return open_checkpoint(source)
    except CheckpointError as e:
        raise InputError(str(source), e) from None


def _get(reader: CheckpointReader, name: str) -> torch.Tensor:
    try:
        return reader.get(name)
    except CheckpointError as e:
        raise InputError(str(reader.path), e) from None


@dataclass
class _Plan:
    names: list[str]  # output tensors, in reading order
    layout: dict[str, tuple[str, tuple[int, ...]]]
    present: dict[str, list[int]]  # tensor -> indices of the models holding it
    partial: dict[str, list[str]]


def _plan(reference: CheckpointReader, ref_label: str, readers: list[CheckpointReader],
          labels: list[str], allow_missing: bool) -> _Plan:
    names = reference.names()
    for r, label in zip(readers, labels):
        extra = sorted(set(r.names()) - set(names))
        if extra and not allow_missing:
            raise TensorMissing(extra[0], ref_label)
    # Read file by file, in name order within a file: sequential I/O on sharded inputs.
    names.sort(key=lambda n: (str(reference.file_of(n)), n))
    layout, present, partial = {}, {}, {}
    for name in names:
        dtype, shape = reference.meta(name)
        holders = [i for i, r in enumerate(readers) if name in r]
        if len(holders) < len(readers):
            missing = [labels[i] for i in range(len(readers)) if i not in holders]
            if not allow_missing:
                raise TensorMissing(name, missing[0])
            partial[name] = missing
        metas = {ref_label: (dtype, shape)} | {labels[i]: readers[i].meta(name) for i in holders}
        if len({s for _, s in metas.values()}) > 1:
            raise ShapeMismatch(name, {k: s for k, (_, s) in metas.items()})
        if len({d for d, _ in metas.values()}) > 1:
            raise DtypeMismatch(name, {k: d for k, (d, _) in metas.items()})
        layout[name], present[name] = (dtype, shape), holders
    return _Plan(names, layout, present, partial)


def _subset(m: MergeMethod, kwargs: dict[str, Any], idx: list[int], n: int) -> dict[str, Any]:
    """Per-model parameters restricted to the models in `idx`."""
    if len(idx) == n:
        return kwargs
    return {k: [v[i] for i in idx] if m.param(k) and m.param(k).per_model else v for k, v in kwargs.items()}


def _float_names(plan: _Plan) -> list[str]:
    return [n for n in plan.names if torch_dtype(plan.layout[n][0]).is_floating_point]


def _model_thresholds(plan: _Plan, base: CheckpointReader, readers: list[CheckpointReader],
                      density: list[float], count_read: Callable[[int], None],
                      release_maps: Callable[[], None]) -> list[float]:
    """For each model, the magnitude of the `int(density * numel)`-th largest entry of its
    task vector over the whole model (exact, by two histogram passes; see module doc)."""
    n = len(readers)
    names = _float_names(plan)

    def abs_bits() -> Iterator[tuple[int, torch.Tensor]]:
        for name in names:
            b = _get(base, name).to(torch.float64 if plan.layout[name][0] == "F64" else torch.float32)
            count_read(b.numel() * b.element_size())
            for i in plan.present[name]:
                x = _get(readers[i], name)
                count_read(x.numel() * x.element_size())
                d = (x.to(b.dtype) - b).abs().float().reshape(-1)
                del x
                yield i, d.view(torch.int32)  # non-negative floats order like their bit patterns
            del b
            release_maps()

    hi = torch.zeros(n, 1 << 15, dtype=torch.int64)
    total = [0] * n
    for i, bits in abs_bits():
        hi[i] += torch.bincount(bits >> 16, minlength=1 << 15)
        total[i] += bits.numel()
    ks = [max(1, int(p * t)) for p, t in zip(density, total)]

    def locate(counts: torch.Tensor, k: int) -> tuple[int, int]:
        """The bin holding the k-th largest, and how many of the bin's entries to keep."""
        from_top = counts.flip(0).cumsum(0)  # entries at or above each bin, largest bin first
        j = int(torch.searchsorted(from_top, torch.tensor(k)))
        above = int(from_top[j - 1]) if j else 0
        return counts.numel() - 1 - j, k - above

    hi_bin = [locate(hi[i], ks[i]) if density[i] < 1 else (0, 0) for i in range(n)]
    lo = torch.zeros(n, 1 << 16, dtype=torch.int64)
    if any(p < 1 for p in density):
        for i, bits in abs_bits():
            if density[i] < 1:
                sel = bits[(bits >> 16) == hi_bin[i][0]]
                lo[i] += torch.bincount(sel & 0xFFFF, minlength=1 << 16)
    out = []
    for i in range(n):
        if density[i] >= 1:
            out.append(0.0)  # keep everything
            continue
        lo_bin, _ = locate(lo[i], hi_bin[i][1])
        bits = torch.tensor([(hi_bin[i][0] << 16) | lo_bin], dtype=torch.int32)
        out.append(float(bits.view(torch.float32)))
    return out


def merge_checkpoints(
    method: str,
    models: Sequence[Any],
    *,
    base: Any = None,
    weights: Sequence[float] | float | None = None,
    output: str | Path,
    force: bool = False,
    seed: int = 0,
    allow_missing: bool = False,
    rng: Literal["tensor", "mergekit"] = "tensor",
    out_dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 10**9,
    progress: ProgressCallback | None = None,
    **params: Any,
) -> MergeReport:
    """Merge checkpoints tensor by tensor into the folder `output`.

    Args:
        method: a name in `METHODS`.
        models: the models to merge (`.safetensors` files or folders, or open readers such as
            `sources.VersionReader` for lineage versions).
        base: the base model. Task-vector methods (task_arithmetic, ties, dare_*) need it and
            merge `model - base`; the robust family uses it when given; for linear and slerp
            it is simply the first input.
        weights: one per model, or one for all (default 1.0 each).
        output: the folder to create (safetensors, sharded above `max_shard_bytes`).
        force: replace `output` if it exists.
        seed: seeds random methods (DARE).
        rng: "tensor": one stream per tensor, seeded from `(seed, tensor name)`, so a tensor's
            result does not depend on the others (the swarm's choice); "mergekit": one stream,
            `torch.manual_seed(seed)`, drawn through the tensors in name order and the models in
            input order, as `mergekit-yaml --random-seed` draws (see docs on exactness).
        allow_missing: merge a tensor absent from some models over those that have it.
        out_dtype: write floating-point tensors in this dtype (default: the inputs'); merging
            is float32 either way.
        progress: called as `(done, total, name)` after each tensor is written.
        params: the method's parameters (density, t, normalize, ...; see `METHODS`).

    Returns:
        A `MergeReport`.

    Raises:
        UnknownMethod, ModelCountError, MergeParameterError, BaseRequired: bad request.
        InputError, TensorMissing, ShapeMismatch, DtypeMismatch, UnmergeableTensor: bad inputs.
        OutputExists: `output` exists and not `force`, or it is one of the inputs.
        In every case nothing is written.
    """
    started = time.perf_counter()
    m = get_method(method)
    model_sources = list(models)
    if m.base == "input":
        sources = ([base] if base is not None else []) + model_sources
        base_source = None
    else:
        if m.base == "required" and base is None:
            raise BaseRequired(method)
        sources, base_source = model_sources, base
    inputs = [_label(x) for x in sources]
    base_path = _label(base_source) if base_source is not None else None
    m, kwargs = prepare(method, len(inputs), weights, params)

    out = Path(output)
    for x in [*sources, *([base_source] if base_source is not None else [])]:
        if hasattr(x, "names"):
            continue  # a lineage version: nothing on disk to overwrite
        ip = Path(x).resolve()
        if out.resolve() == ip or out.resolve() in ip.parents:
            raise OutputExists(str(out), f"is (or holds) the input {x}")
    if out.exists() and not force:
        raise OutputExists(str(out))

    readers = [_open(x) for x in sources]
    base_reader = _open(base_source) if base_source is not None else None
    reference = base_reader or readers[0]
    ref_label = base_path or inputs[0]
    plan = _plan(reference, ref_label, readers if base_reader else readers[1:], inputs if base_reader else inputs[1:],
                 allow_missing)
    if not base_reader:  # the reference is input 0: it holds every output tensor
        plan.present = {k: [0] + [i + 1 for i in v] for k, v in plan.present.items()}
    if out_dtype is not None:
        for name, (dtype, shape) in plan.layout.items():
            if torch_dtype(dtype).is_floating_point:
                plan.layout[name] = (dtype_name(out_dtype), shape)
    cast = (lambda t: t.to(out_dtype) if out_dtype is not None and t.is_floating_point() else t)
    generator = None
    if rng == "mergekit":
        # mergekit's executor runs one task per tensor, ordered by tensor name (its
        # `group_label`), each drawing for its models in the recipe's order
        plan.names.sort()
        generator = torch.Generator().manual_seed(seed)

    bytes_read = 0
    all_readers = [*readers, *([base_reader] if base_reader else [])]

    def release_maps() -> None:
        # safetensors maps whole files; every page a merge touched stays resident (and counts
        # in RSS) while the file is mapped. Closing the handles after each tensor unmaps them,
        # so memory stays at one tensor per input; reopening costs one header parse.
        for r in all_readers:
            r.close()

    def count_read(nb: int) -> None:
        nonlocal bytes_read
        bytes_read += nb

    resolved = kwargs
    transform_for: Callable[[str, list[int]], Callable[[torch.Tensor], torch.Tensor] | None] = lambda name, idx: None
    if m.name == "ties" and kwargs["scope"] == "model" and any(p < 1 for p in kwargs["density"]):
        assert base_reader is not None  # ties requires a base
        thresholds = _model_thresholds(plan, base_reader, readers, kwargs["density"], count_read, release_maps)
        kwargs = {**kwargs, "density": [1.0] * len(readers)}  # trimmed by threshold instead

        def transform_for(name: str, idx: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda d: torch.stack([above_threshold(d[j], thresholds[i]) for j, i in enumerate(idx)])

    n_merged = 0
    # Tensors from checkpoint files are views of the readers' private file mappings, which
    # nothing writes to: the merge may hand their pages back as it goes (`pages.py`).
    mapped = all(isinstance(r, CheckpointReader) for r in all_readers)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal n_merged
        for name in plan.names:
            idx = plan.present[name]
            xs = []
            for i in idx:
                xs.append(_get(readers[i], name))
                count_read(xs[-1].numel() * xs[-1].element_size())
            b = None
            if base_reader is not None:
                b = _get(base_reader, name)
                count_read(b.numel() * b.element_size())
            if not xs:
                yield name, cast(b)  # mergekit: no task vector for this tensor, keep the base
                continue
            if not xs[0].is_floating_point():
                ref = b if b is not None else xs[0]
                if any(not torch.equal(ref, x) for x in xs):
                    raise UnmergeableTensor(name, f"integer tensor ({ref.dtype}) differs between inputs")
                yield name, ref
                continue
            if m.n_models is not None and len(xs) != m.n_models:
                yield name, cast(xs[0])  # mergekit's slerp: a tensor only one model has is copied
                continue
            merged = merge_one(m, _subset(m, kwargs, idx, len(readers)), xs, b, seed=seed, name=name,
                               transform=transform_for(name, idx), generator=generator, mapped=mapped)
            del xs, b
            release_maps()
            n_merged += 1
            yield name, cast(merged)

    done = 0
    written = 0

    def on_tensor(name: str, nbytes: int) -> None:
        nonlocal done, written
        done += 1
        written += nbytes
        if progress:
            progress(done, len(plan.names), name)

    extra = {k: v for k, v in reference.extra_files().items() if k != PROVENANCE_FILE}
    provenance = {
        "method": m.name,
        "params": resolved,
        "models": inputs,
        "base": base_path,
        "seed": seed,
        "rng": rng,
        "allow_missing": allow_missing,
    }
    extra[PROVENANCE_FILE] = (json.dumps(provenance, indent=2, default=str) + "\n").encode()
    try:
        with reuse_buffers():
            write_hf_folder(out, tensors(), extra, max_shard_bytes=max_shard_bytes, layout=plan.layout,
                            overwrite=force, on_tensor=on_tensor)
    finally:
        release_maps()
    return MergeReport(
        method=m.name,
        params=provenance["params"],
        models=tuple(inputs),
        base=base_path,
        output=str(out),
        tensors=done,
        merged=n_merged,
        bytes_read=bytes_read,
        bytes_written=written,
        seconds=time.perf_counter() - started,
        partial=plan.partial,
    )
