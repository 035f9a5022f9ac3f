"""``ties`` and ``magnitude`` on numpy arrays, for the merge's torch-free fast path (``sum`` needs neither: the
native kernel merges and adds in one pass).

These are twins of ``deltahub/methods/ties.py``, ``magnitude.py`` and ``sparse_ops.py``, written op for op
against them so that every float32 operation happens in the same order with the same rounding: the tests
(``tests/test_fast_merge.py``) compare the bits of both on random inputs. Read those modules for what the
methods mean; this one only says where numpy differs from torch.

Values arrive as float32/float16 arrays or, for bfloat16, as their raw uint16 bits (numpy has no bfloat16).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

Entries = tuple[np.ndarray, np.ndarray]


def as_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """Values as float32, exactly (bfloat16 is the top half of a float32)."""
    if dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


def top_fraction(indices: np.ndarray, values: np.ndarray, fraction: float) -> Entries:
    """sparse_ops.top_fraction: the ceil(fraction * nnz) largest magnitudes, lower position first on ties."""
    n = values.size
    keep = min(n, math.ceil(Fraction(repr(float(fraction))) * n))
    if keep >= n:
        return indices, values
    if keep == 0:
        return indices[:0], values[:0]
    # torch sorts |v| descending, stably, and keeps the first `keep` in position order: that is every entry above
    # the keep-th largest magnitude t, plus the first entries (by position) equal to t. A partition finds t in
    # O(nnz), where the sort cost O(nnz log nnz): 4x the whole ties merge's CPU time at 1B.
    magnitudes = np.abs(values)
    t = np.partition(magnitudes, n - keep)[n - keep]
    chosen = magnitudes > t
    at_t = np.flatnonzero(magnitudes == t)[: keep - int(np.count_nonzero(chosen))]
    chosen[at_t] = True
    order = np.flatnonzero(chosen)
    return indices[order], values[order]


def union(indices: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """sparse_ops.union: sorted unique positions and where each input's entries land in them."""
    if len(indices) == 1:
        return indices[0], [np.arange(indices[0].size)]
    # np.unique's own algorithm, with a stable sort: the inputs are sorted runs, which timsort merges in
    # linear time (np.unique's quicksort of the concatenation does not know that).
    cat = np.concatenate(indices)
    order = np.argsort(cat, kind="stable")
    ordered = cat[order]
    first = np.empty(cat.size, dtype=bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    positions = ordered[first]
    inverse = np.empty(cat.size, dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return positions, np.split(inverse, np.cumsum([i.size for i in indices])[:-1])


def drop_zeros(indices: np.ndarray, values: np.ndarray) -> Entries:
    keep = values != 0
    if bool(keep.all()):
        return indices, values
    return indices[keep], values[keep]


def _index_add(total: np.ndarray, slots: Sequence[np.ndarray], values: Sequence[np.ndarray]) -> None:
    """torch's index_add_ over the concatenated inputs: in input order, each position once per input (slots are
    unique within one input, so a fancy-index add per input adds in exactly that order)."""
    for slot, vals in zip(slots, values, strict=True):
        total[slot] += vals


def weighted_sum(entries: Sequence[Entries], weights: Sequence[float]) -> Entries:
    """sparse_ops.weighted_sum: ((0 + w_a v_a) + w_b v_b) + ... in float32 at the union of positions."""
    positions, slots = union([idx for idx, _ in entries])
    total = np.zeros(positions.size, dtype=np.float32)
    _index_add(total, slots, [vals * np.float32(w) for (_, vals), w in zip(entries, weights, strict=True)])
    return positions, total


def magnitude(entries: Sequence[Entries], weights: Sequence[float], *, density: float) -> Entries:
    trimmed = [top_fraction(idx, vals, density) for idx, vals in entries]
    return drop_zeros(*weighted_sum(trimmed, weights))


def ties(entries: Sequence[Entries], weights: Sequence[float], *, density: float) -> Entries:
    trimmed = [top_fraction(idx, vals, density) for idx, vals in entries]
    positions, slots = union([idx for idx, _ in trimmed])
    weighted = [vals * np.float32(w) for (_, vals), w in zip(trimmed, weights, strict=True)]
    total = np.zeros(positions.size, dtype=np.float32)
    _index_add(total, slots, weighted)
    elected = np.sign(total)
    agreeing = [
        np.where(np.sign(v) == elected[s], v, np.float32(0.0)) for v, s in zip(weighted, slots, strict=True)
    ]
    counts = [(np.sign(v) == elected[s]).astype(np.float32) for v, s in zip(weighted, slots, strict=True)]
    agreeing_sum = np.zeros_like(total)
    _index_add(agreeing_sum, slots, agreeing)
    count = np.zeros_like(total)
    _index_add(count, slots, counts)
    return drop_zeros(positions, agreeing_sum / np.maximum(count, np.float32(1.0)))


METHODS = {"ties": ties, "magnitude": magnitude}
