"""Names of the dtypes deltahub stores, safetensors' dtype codes, and the index dtype rule shared by the type
and the format: the one dtype table.

The tables of torch dtypes (``VALUE_DTYPES``, ``BASE_DTYPES``, ``SAFETENSORS_DTYPES``, ``SAFETENSORS_CODES``)
are built on first use: importing this module does not import torch, so the streaming merge's fast path can use
the names, codes and item sizes without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

    VALUE_DTYPES: dict[str, torch.dtype]
    BASE_DTYPES: dict[str, torch.dtype]
    SAFETENSORS_DTYPES: dict[str, torch.dtype]
    SAFETENSORS_CODES: dict[torch.dtype, str]

VALUE_DTYPE_NAMES = ("float32", "bfloat16", "float16")
# Base parameters can be any floating dtype transformers loads; deltas only ever touch floating tensors.
BASE_DTYPE_NAMES = (*VALUE_DTYPE_NAMES, "float64")

# safetensors' dtype codes, with the torch dtype name and item size; float8 and unsigned ints need a recent
# torch, so their torch dtypes are looked up by name.
ST_NAMES = {
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
ST_ITEMSIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
FLOATING_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_CODE_OF_NAME = {name: code for code, name in ST_NAMES.items()}

# Flat positions below 2**31 fit int32, which halves the index bytes: the format requires int32 there.
INT32_LIMIT = 2**31


def __getattr__(name: str) -> Any:
    if name in ("VALUE_DTYPES", "BASE_DTYPES", "SAFETENSORS_DTYPES", "SAFETENSORS_CODES"):
        import torch

        if name == "SAFETENSORS_CODES":
            table: Any = {dtype: code for code, dtype in __getattr__("SAFETENSORS_DTYPES").items()}
        elif name == "SAFETENSORS_DTYPES":
            table = {code: getattr(torch, n) for code, n in ST_NAMES.items() if hasattr(torch, n)}
        else:
            names = VALUE_DTYPE_NAMES if name == "VALUE_DTYPES" else BASE_DTYPE_NAMES
            table = {n: getattr(torch, n) for n in names}
        globals()[name] = table
        return table
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (a dtype name stays itself)."""
    return str(dtype).removeprefix("torch.")


def st_code(dtype: Any) -> str:
    """The safetensors code of a torch dtype or dtype name (``torch.bfloat16`` or ``"bfloat16"`` -> ``"BF16"``)."""
    return _CODE_OF_NAME[dtype_name(dtype)]


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
        raise InvalidArgumentError(f"{what} must be one of {', '.join(allowed)}; got {name!r}")
    return allowed[key]


def index_dtype_for(numel: int) -> torch.dtype:
    """The index dtype the format uses for a parameter with ``numel`` elements."""
    import torch

    return torch.int32 if numel < INT32_LIMIT else torch.int64
