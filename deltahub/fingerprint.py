"""Base fingerprints: a few base values per touched parameter, so a delta can refuse the wrong base.

For each parameter the delta touches we record the base's values at ``SAMPLES`` deterministic flat positions
(derived from the parameter's name and size, so anyone can recompute them). Checking a base costs one tiny
gather per parameter, not a pass over the weights.

We store the sampled values themselves (as float32, which holds fp32/bf16/fp16 values exactly) rather than a
hash of them. That lets the check tolerate loading the same checkpoint in another dtype (a bf16 base loaded as
fp32 to train on a CPU, say), which a hash cannot, and lets the error say which parameter differs and by how
much. When the dtypes match the comparison is exact.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where tensors are read: the streaming merge checks bases without it
    import torch

SAMPLES = 8
# Per base dtype: the relative tolerance when the recorded and the live dtypes differ (one ulp of the coarser
# dtype, at most eps * |x|, covers the double rounding of fp32 -> bf16 -> fp16 style conversions), and an
# absolute floor for values so small the coarser dtype flushes them to subnormals.
# Keyed by dtype name, so torch dtypes and the merge's torch-free dtype names look up the same entries.
_EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}
_ATOL = {"float64": 0.0, "float32": 0.0, "bfloat16": 2.0**-126, "float16": 2.0**-14}


def _name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def sample_positions(name: str, numel: int, count: int = SAMPLES) -> list[int]:
    """The flat positions sampled for parameter ``name``: blake2b(name) read as 8-byte little-endian integers
    modulo ``numel`` (duplicates are possible for tiny parameters and harmless)."""
    if numel <= 0:
        return []
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8 * count).digest()
    return [int.from_bytes(digest[8 * i : 8 * i + 8], "little") % numel for i in range(count)]


def tensor_samples(name: str, tensor: torch.Tensor) -> tuple[float, ...]:
    """The fingerprint samples of one base tensor, as Python floats (exact float32 values)."""
    positions = sample_positions(name, tensor.numel())
    if not positions:
        return ()
    import torch

    flat = tensor.detach().reshape(-1)
    picked = flat[torch.tensor(positions, device=flat.device)].to(torch.float32).cpu()
    return tuple(float(v) for v in picked.tolist())


def fingerprint_of(
    base: Mapping[str, torch.Tensor], names: list[str] | None = None
) -> dict[str, tuple[float, ...]]:
    """Fingerprint samples of ``names`` (default: all) in a base state dict (tensors may be on any device)."""
    return {name: tensor_samples(name, base[name]) for name in (names if names is not None else list(base))}


def _coarser(a: str, b: str) -> str:
    return a if _EPS.get(a, 0.0) >= _EPS.get(b, 0.0) else b


def samples_match(
    recorded: tuple[float, ...], live: tuple[float, ...], recorded_dtype: Any, live_dtype: Any
) -> bool:
    """Whether ``live`` samples come from the same base values as ``recorded``.

    Same dtype: bit-exact. Different dtypes: equal within one rounding of the coarser dtype. The dtypes are
    torch dtypes or their names (``"bfloat16"``).
    """
    if len(recorded) != len(live):
        return False
    recorded_dtype, live_dtype = _name(recorded_dtype), _name(live_dtype)
    if recorded_dtype == live_dtype:
        return all((r == v) or (math.isnan(r) and math.isnan(v)) for r, v in zip(recorded, live, strict=True))
    coarse = _coarser(recorded_dtype, live_dtype)
    rtol, atol = _EPS.get(coarse, 2.0**-7), _ATOL.get(coarse, 0.0)
    return all(abs(r - v) <= atol + rtol * abs(r) for r, v in zip(recorded, live, strict=True))
