"""Names of the dtypes deltahub stores, and the index dtype rule shared by the type and the format."""

from __future__ import annotations

import torch

VALUE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Base parameters can be any floating dtype transformers loads; deltas only ever touch floating tensors.
BASE_DTYPES: dict[str, torch.dtype] = {**VALUE_DTYPES, "float64": torch.float64}

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
        raise ValueError(f"{what} must be one of {', '.join(allowed)}; got {name!r}")
    return allowed[key]


def index_dtype_for(numel: int) -> torch.dtype:
    """The index dtype the format uses for a parameter with ``numel`` elements."""
    return torch.int32 if numel < INT32_LIMIT else torch.int64
