"""Names of the dtypes deltahub stores, and the index dtype rule shared by the type and the format."""

from __future__ import annotations

import torch

from .errors import InvalidArgumentError

VALUE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Base parameters can be any floating dtype transformers loads; deltas only ever touch floating tensors.
BASE_DTYPES: dict[str, torch.dtype] = {**VALUE_DTYPES, "float64": torch.float64}

# safetensors' dtype codes; float8 and unsigned ints need a recent torch, so they are looked up by name.
_ST_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _ST_NAMES.items() if hasattr(torch, name)
}
SAFETENSORS_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}

# Flat positions below 2**31 fit int32, which halves the index bytes: the format requires int32 there.
INT32_LIMIT = 2**31


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype, *, allowed: dict[str, torch.dtype], what: str) -> torch.dtype:
    """Turn ``"bf16"``/``"bfloat16"``/``torch.bfloat16`` into a dtype from ``allowed`` or raise ValueError."""
    if isinstance(name, torch.dtype):
        if name in allowed.values():
            return name
        name = dtype_name(name)
    aliases = {
        "fp32": "float32",
        "bf16": "bfloat16",
        "fp16": "float16",
        "half": "float16",
        "float": "float32",
    }
    key = aliases.get(str(name).lower(), str(name).lower())
    if key not in allowed:
        raise InvalidArgumentError(f"{what} must be one of {', '.join(allowed)}; got {name!r}")
    return allowed[key]


def index_dtype_for(numel: int) -> torch.dtype:
    """The index dtype the format uses for a parameter with ``numel`` elements."""
    return torch.int32 if numel < INT32_LIMIT else torch.int64
