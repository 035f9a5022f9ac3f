"""``magnitude``: magnitude pruning, then task arithmetic.

Each delta is trimmed on its own to the ``ceil(density * nnz)`` entries of largest ``|value|`` among ITS stored
entries of the parameter (equal magnitudes: the lower position wins; see :func:`sparse_ops.top_fraction`). The
trimmed deltas are then summed with their weights in float32 as in ``sum``.

Trimming is relative to the stored entries, not to ``numel``: a delta that is already 1% dense keeps
``density`` of its 1%. (peft's ``magnitude_prune`` trims dense task vectors, where the two coincide up to the
zeros it counts.) Exact zeros in the result carry no information and are dropped.

Options:
    density: fraction of each delta's entries kept, in (0, 1]; default 0.5. 1 is plain ``sum`` minus zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..sparse_ops import Entries, drop_zeros, top_fraction, weighted_sum


def magnitude(
    entries: Sequence[Entries], weights: Sequence[float], *, name: str, numel: int, density: float
) -> Entries:
    """Trim each input to its top ``density`` by magnitude, then weighted sum; exact zeros dropped."""
    trimmed = [top_fraction(idx, vals, density) for idx, vals in entries]
    return drop_zeros(*weighted_sum(trimmed, weights))
