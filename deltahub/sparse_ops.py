"""Primitive operations on sparse (indices, values) pairs of one parameter.

Every combination method and the delta arithmetic are built from these. Indices are flat row-major positions,
sorted and unique within one input; values are any float dtype. Results are float32; indices stay int32 when all
inputs are int32 (sorting int32 is about twice as fast as int64, and the format stores int32 anyway).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch

Entries = tuple[torch.Tensor, torch.Tensor]


def union(indices: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sorted union of several sorted index sets, and where each input's entries land in it.

    Returns ``(positions, slots)`` with ``positions[slots[i]] == indices[i]``. One sort of the concatenation:
    O(total nnz log total nnz), never O(numel).
    """
    dtype = torch.int32 if all(i.dtype == torch.int32 for i in indices) else torch.int64
    if len(indices) == 1:
        only = indices[0].to(dtype)
        return only, [torch.arange(only.numel(), device=only.device)]
    cat = torch.cat([i.to(dtype) for i in indices])
    positions, inverse = torch.unique(cat, sorted=True, return_inverse=True)
    return positions, list(torch.split(inverse, [i.numel() for i in indices]))


def weighted_sum(entries: Sequence[Entries], weights: Sequence[float]) -> Entries:
    """sum_i weights[i] * entries[i], accumulated in float32 at the union of positions."""
    positions, slots = union([idx for idx, _ in entries])
    total = torch.zeros(positions.numel(), dtype=torch.float32, device=positions.device)
    for (_, values), slot, weight in zip(entries, slots, weights, strict=True):
        total.index_add_(0, slot, values.to(torch.float32), alpha=float(weight))
    return positions, total


def top_fraction(indices: torch.Tensor, values: torch.Tensor, fraction: float) -> Entries:
    """Keep the ``ceil(fraction * nnz)`` entries of largest magnitude (ties broken by lower position).

    ``ceil`` so that a non-zero fraction never empties a non-empty parameter.
    """
    n = values.numel()
    # Ceil of the exact decimal the caller wrote: in binary floats 0.07 * 100 is 7.000000000000001, whose plain
    # ceil would keep 8 entries instead of 7.
    keep = min(n, math.ceil(Fraction(repr(float(fraction))) * n))
    if keep >= n:
        return indices, values
    if keep == 0:
        return indices[:0], values[:0]
    # A stable descending sort on magnitude makes the choice among equal magnitudes deterministic.
    order = torch.sort(values.abs().to(torch.float32), descending=True, stable=True).indices[:keep]
    order = torch.sort(order).values  # back to position order, so indices stay sorted
    return indices[order], values[order]


def drop_zeros(indices: torch.Tensor, values: torch.Tensor) -> Entries:
    """Remove entries whose value is exactly zero (they change nothing when added)."""
    keep = values != 0
    if bool(keep.all()):
        return indices, values
    return indices[keep], values[keep]
