"""Names of the dtypes deltahub stores, and the index dtype rule shared by the type and the format.

The tables of torch dtypes (``VALUE_DTYPES``, ``BASE_DTYPES``) are built on first use: importing this module
does not import torch, so the streaming merge's fast path can use the names (``dtype_name``) without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    VALUE_DTYPES: dict[str, torch.dtype]
    BASE_DTYPES: dict[str, torch.dtype]

VALUE_DTYPE_NAMES = ("float32", "bfloat16", "float16")
# Base parameters can be any floating dtype transformers loads; deltas only ever touch floating tensors.
BASE_DTYPE_NAMES = (*VALUE_DTYPE_NAMES, "float64")

# Flat positions below 2**31 fit int32, which halves the index bytes: the format requires int32 there.
INT32_LIMIT = 2**31


def __getattr__(name: str) -> Any:
    if name in ("VALUE_DTYPES", "BASE_DTYPES"):
        import torch

        names = VALUE_DTYPE_NAMES if name == "VALUE_DTYPES" else BASE_DTYPE_NAMES
        table = {n: getattr(torch, n) for n in names}
        globals()[name] = table
        return table
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (a dtype name stays itself)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: Any, *, allowed: dict[str, torch.dtype], what: str) -> torch.dtype:
    """Turn ``"bf16"``/``"bfloat16"``/``torch.bfloat16`` into a dtype from ``allowed`` or raise ValueError."""
    import torch

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
    import torch

    return torch.int32 if numel < INT32_LIMIT else torch.int64
