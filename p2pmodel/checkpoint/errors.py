"""Errors of checkpoint reading and writing: each names the file or folder (`path`)."""

from __future__ import annotations

import os
from pathlib import Path

from p2pmodel.checkpoint.format import SINGLE_NAME
from p2pmodel.errors import P2PModelError, UsageError

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
]


class CheckpointError(P2PModelError):
    """A checkpoint cannot be read or written as asked. `path` names the file or folder."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = str(path)
        super().__init__(message)


class CheckpointNotFound(CheckpointError):
    def __init__(self, path: str | os.PathLike, why: str = "no such file or folder"):
        super().__init__(path, f"{path}: {why}")


class PickleCheckpointRefused(CheckpointError):
    """A pickle checkpoint: refused because unpickling runs arbitrary code. Says how to convert."""

    def __init__(self, path: str | os.PathLike):
        p = Path(path)
        src = str(p if p.is_file() else p / "pytorch_model.bin")
        dst = str(p.with_suffix(".safetensors") if p.is_file() else p / SINGLE_NAME)
        self.hint = (
            "python -c \"import torch, safetensors.torch as st; "
            f"sd = torch.load({src!r}, map_location='cpu', weights_only=True); "
            f"st.save_file({{k: v.contiguous().clone() for k, v in sd.items()}}, {dst!r}, metadata={{'format': 'pt'}})\""
        )
        super().__init__(
            path,
            f"{path}: pickle checkpoints are refused (loading one can run arbitrary code); "
            f"convert it to safetensors first, e.g.: {self.hint}",
        )


class CorruptCheckpoint(CheckpointError):
    def __init__(self, path: str | os.PathLike, reason: str):
        self.reason = reason
        super().__init__(path, f"{path}: not a valid safetensors file: {reason}")


class MissingShard(CheckpointError):
    def __init__(self, index: str | os.PathLike, shard: str):
        self.shard = shard
        super().__init__(index, f"{index}: lists shard {shard!r}, which does not exist")


class DuplicateTensor(CheckpointError):
    def __init__(self, name: str, first: str | os.PathLike, second: str | os.PathLike):
        self.name, self.first, self.second = name, str(first), str(second)
        super().__init__(second, f"tensor {name!r} appears twice: in {first} and in {second}")


class ShardIndexMismatch(CheckpointError):
    def __init__(self, index: str | os.PathLike, reason: str):
        self.reason = reason
        super().__init__(index, f"{index}: {reason}")


class UnknownTensor(CheckpointError, KeyError):
    def __init__(self, path: str | os.PathLike, name: str):
        self.name = name
        CheckpointError.__init__(self, path, f"{path}: has no tensor {name!r}")

    __str__ = Exception.__str__  # KeyError would quote the message


class OutputExists(CheckpointError, UsageError):
    """The output exists and replacing it was not asked for (or it is one of the inputs): the
    user's call to make, so a usage error (exit 2). The one class for export, merge and writers."""

    def __init__(self, path: str | os.PathLike, reason: str = "already exists (pass --force to replace it)"):
        super().__init__(path, f"output {path} {reason}")


class LayoutMismatch(CheckpointError):
    def __init__(self, path: str | os.PathLike, reason: str):
        self.reason = reason
        super().__init__(path, f"cannot write {path}: {reason}")


class WriteFailed(CheckpointError):
    """The operating system refused to write the output (permissions, disk full, ...)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.reason = reason
        super().__init__(path, f"cannot write {path}: {reason}")
