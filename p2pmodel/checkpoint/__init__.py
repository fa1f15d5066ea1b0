"""Checkpoints on disk: a `.safetensors` file, a folder of them, a Hugging Face folder.

- `reading.py` — `open_checkpoint` -> `CheckpointReader`: lazy, header-validated, pickles refused.
- `writing.py` — `write_safetensors`, `write_hf_folder`: streamed, atomic, tied weights as
                 `transformers` saves them.
- `errors.py`  — `CheckpointError` and its subclasses, each naming the path.
- `format.py`  — file names (`model.safetensors`, the shard index), layout types.

Dtype names ("F32", "BF16", ...) are `p2pmodel.dtypes`, re-exported here.
"""

from p2pmodel.checkpoint.errors import (
    CheckpointError,
    CheckpointNotFound,
    CorruptCheckpoint,
    DuplicateTensor,
    LayoutMismatch,
    MissingShard,
    OutputExists,
    PickleCheckpointRefused,
    ShardIndexMismatch,
    UnknownTensor,
    WriteFailed,
)
from p2pmodel.checkpoint.format import INDEX_NAME, SINGLE_NAME
from p2pmodel.checkpoint.reading import CheckpointReader, open_checkpoint
from p2pmodel.checkpoint.writing import write_hf_folder, write_safetensors
from p2pmodel.dtypes import DTYPES, dtype_name, torch_dtype

__all__ = [
    "CheckpointError",
    "CheckpointNotFound",
    "PickleCheckpointRefused",
    "CorruptCheckpoint",
    "MissingShard",
    "DuplicateTensor",
    "ShardIndexMismatch",
    "UnknownTensor",
    "OutputExists",
    "LayoutMismatch",
    "WriteFailed",
    "CheckpointReader",
    "open_checkpoint",
    "write_safetensors",
    "write_hf_folder",
    "DTYPES",
    "dtype_name",
    "torch_dtype",
    "INDEX_NAME",
    "SINGLE_NAME",
]
