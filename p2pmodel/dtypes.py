"""Tensor dtypes by their safetensors names ("F32", "BF16", ...): the one table.

The lineage (`TensorEntry.dtype`, tensor blob headers), checkpoint files and the delta codec
all name dtypes this way, so they share this table instead of keeping copies that drift.
"""

from __future__ import annotations

import torch

from p2pmodel.errors import P2PModelError

__all__ = ["DTYPES", "ITEMSIZE", "UnsupportedDtype", "dtype_name", "torch_dtype"]

# safetensors dtype names -> torch dtypes; element sizes come from torch.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ITEMSIZE: dict[str, int] = {k: v.itemsize for k, v in DTYPES.items()}  # bytes per element
_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


class UnsupportedDtype(P2PModelError, KeyError):
    """A tensor whose dtype has no safetensors name we store.

    Also a `KeyError`, the lookup error callers of `checkpoint.dtype_name` caught before it
    raised this one.
    """

    def __init__(self, dtype: object):
        self.dtype = dtype
        super().__init__(f"tensor dtype {dtype} cannot be stored (supported: {', '.join(DTYPES)})")

    __str__ = Exception.__str__  # KeyError would quote the message


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype ("F32", "BF16", ...). Raises `UnsupportedDtype`."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise UnsupportedDtype(dtype) from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name. Raises `KeyError` if unknown."""
    return DTYPES[name]
