"""composable-sft's ``pytorch_diff.bin`` (``cambridgeltl/composable-sft``) as a delta.

The file is a ``torch.save`` of a dict. Its sparse part is ``"diffs"`` (``"body"`` in early releases): per
parameter name either an encoding ``{"size", "index_steps", "values"}`` or a torch sparse COO tensor. The
encoding lists positions as steps (the first one absolute, then differences) of a flat index in which the FIRST
dimension varies fastest (column-major for a matrix), sorted, with the values in that order. We turn those into
row-major positions. Its dense part, ``"abs"`` (``"head"`` early on), holds parameters that REPLACE the base's
values (a model head): a delta only adds, so it is refused unless ``drop_head`` leaves it out.

The file is read with ``torch.load(weights_only=True)``; the only extra constructors allowed are numpy's scalar and
integer dtypes, which the encoder leaves in ``index_steps`` (plain data, no code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..delta import ParamDelta, SparseDelta
from ..errors import ConversionError
from ..fingerprint import tensor_samples
from .base import BaseLike, base_tensor, open_base
from .detect import COMPOSABLE_FILE
from .sft_fork import sorted_sum
from .weights import load_weights_only


def _numpy_scalar_globals() -> list[Any]:
    from numpy._core.multiarray import scalar

    dtypes = [
        np.dtype,
        *(
            type(np.dtype(t))
            for t in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
        ),
    ]
    # Files written with numpy 1.x name the scalar constructor by its old module path.
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), *dtypes]


def _row_major(colmajor: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Flat indices with the first dimension fastest -> flat row-major positions (the last dimension fastest)."""
    rest = colmajor.clone()
    coords = []
    for extent in size:
        coords.append(rest % extent)
        rest = rest // extent
    out = torch.zeros_like(colmajor)
    for coord, extent in zip(coords, size, strict=True):
        out = out * extent + coord
    return out


def _decode(name: str, entry: Any, what: str) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor]:
    """``(size, row-major positions, values)`` of one encoded or sparse COO diff."""
    if isinstance(entry, torch.Tensor) and entry.layout == torch.sparse_coo:
        t = entry.coalesce()
        size = tuple(int(s) for s in t.shape)
        coords = t.indices().to(torch.int64)
        flat = torch.zeros(coords.shape[1], dtype=torch.int64)
        for d, extent in enumerate(size):
            flat = flat * extent + coords[d]
        return size, flat, t.values().reshape(-1)
    if not (isinstance(entry, dict) and {"size", "index_steps", "values"} <= set(entry)):
        raise ConversionError(
            f"{what}: the diff of {name} is {type(entry).__name__}, not an encoding with size, index_steps and "
            "values, nor a sparse tensor"
        )
    size = tuple(int(s) for s in entry["size"])
    steps = torch.tensor([int(s) for s in entry["index_steps"]], dtype=torch.int64)
    values = entry["values"]
    if not isinstance(values, torch.Tensor):
        values = torch.as_tensor(np.asarray(values))
    colmajor = torch.cumsum(steps, 0)
    numel = int(np.prod(size, dtype=np.int64)) if size else 1
    if colmajor.numel() != values.numel():
        raise ConversionError(f"{what}: {name} has {colmajor.numel()} positions but {values.numel()} values")
    if colmajor.numel() and (int(colmajor.min()) < 0 or int(colmajor.max()) >= numel):
        raise ConversionError(f"{what}: {name} has positions outside its size {list(size)}")
    return size, _row_major(colmajor, size), values.reshape(-1)


def convert_composable(
    path: Path, *, base: BaseLike | None, drop_head: bool, values_dtype: torch.dtype | None
) -> SparseDelta:
    file = path / COMPOSABLE_FILE if path.is_dir() else path
    what = f"the composable-sft diff {file}"
    data = load_weights_only(file, _numpy_scalar_globals())
    if not isinstance(data, dict):
        raise ConversionError(f"{what} must hold a dict with 'diffs' (or 'body'); got {type(data).__name__}")
    diffs = data.get("diffs", data.get("body"))
    head = data.get("abs", data.get("head")) or {}
    if not isinstance(diffs, dict):
        raise ConversionError(f"{what} has no 'diffs' (or 'body') dict of sparse differences")
    if head and not drop_head:
        raise ConversionError(
            f"{what} also holds {len(head)} dense parameter(s) that REPLACE the base's values (its "
            f"'{'abs' if 'abs' in data else 'head'}' part, e.g. {sorted(head)[:3]}: a task head); a delta only adds. "
            "Pass drop_head=True (--drop-head) to convert the sparse differences without them (load the head "
            "yourself if you need it)"
        )
    params: dict[str, ParamDelta] = {}
    fingerprint: dict[str, tuple[float, ...]] = {}
    repeats = 0
    with open_base(base, (None, None), what) as opened:
        for name, entry in diffs.items():
            size, positions, values = _decode(name, entry, what)
            weight = base_tensor(opened, name, what)
            if tuple(weight.shape) != size:
                raise ConversionError(
                    f"{what}: {name} has size {list(size)} but the base's is {list(weight.shape)}; pass the base "
                    "it was trained on"
                )
            idx, vals, n = sorted_sum(positions, values)
            repeats += n
            if values_dtype is not None:
                vals = vals.to(values_dtype)
            elif vals.dtype == torch.float64:
                vals = vals.to(torch.float32)
            try:
                params[name] = ParamDelta(idx, vals, size, weight.dtype)
            except ValueError as err:
                raise ConversionError(f"{what}: {name}: {err}") from None
            fingerprint[name] = tensor_samples(name, weight)
        return SparseDelta(
            params,
            base_model=opened.model_id,
            base_revision=opened.revision,
            fingerprint=fingerprint,
            provenance={
                "method": "convert",
                "source_format": "composable-sft",
                "repeated_positions_summed": repeats,
                "dropped": sorted(head) if head else [],
            },
        )
