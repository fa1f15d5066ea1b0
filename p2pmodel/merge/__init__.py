"""Merge methods registered by name, and the streaming merge engine.

- `registry.py`   — `MergeMethod`, the `merge_method` decorator, `METHODS`, parameter errors.
- `interp.py`     — `linear` and `slerp` (interpolate the models' own tensors).
- `gta.py`        — generalized task arithmetic: `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`.
- `sparsify.py`   — TIES' magnitude trim and DARE's random drop, with their rescaling rules.
- `kernels.py`    — the same TIES/DARE arithmetic as fused float32 loops (numba), bit for bit.
- `mt19937.py`    — torch's CPU Bernoulli stream (MT19937), for DARE in those loops.
- `workspace.py`  — scratch buffers reused from tensor to tensor while a checkpoint merge streams.
- `pages.py`      — hands the engine's memory-mapped inputs' pages back to the page cache as it goes.
- `robust.py`     — the robust family on task vectors: `median`, `trimmed_mean`, `centered_clip`.
- `functional.py` — `merge_tensor` and `merge_deltas` (one tensor at a time; the swarm's entry).
- `engine.py`     — `merge_checkpoints`: streams checkpoints tensor by tensor into a new folder.

Every method follows mergekit (arcee-ai/mergekit) where mergekit has it; each module's
docstring gives the formulas and the mergekit file they come from.
"""

from p2pmodel.merge import gta, interp, robust  # noqa: F401  (registers the methods)
from p2pmodel.merge.engine import (
    InputError,
    MergeReport,
    OutputExists,
    TensorMissing,
    merge_checkpoints,
)
from p2pmodel.merge.functional import (
    BaseRequired,
    DtypeMismatch,
    ShapeMismatch,
    UnmergeableTensor,
    merge_deltas,
    merge_tensor,
)
from p2pmodel.merge.registry import (
    METHODS,
    MergeError,
    MergeMethod,
    MergeParameterError,
    ModelCountError,
    UnknownMethod,
    merge_method,
)

__all__ = [
    "METHODS",
    "MergeMethod",
    "merge_method",
    "merge_tensor",
    "merge_deltas",
    "merge_checkpoints",
    "MergeReport",
    "MergeError",
    "UnknownMethod",
    "MergeParameterError",
    "ModelCountError",
    "BaseRequired",
    "ShapeMismatch",
    "DtypeMismatch",
    "UnmergeableTensor",
    "TensorMissing",
    "InputError",
    "OutputExists",
]
