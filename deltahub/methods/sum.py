"""``sum``: task arithmetic, ``sum_i w_i * D_i``.

Every input entry is multiplied by its delta's weight and the products are added in float32 at the union of
the inputs' positions. Exact zeros are kept (a position where two deltas cancel stays in the result with value
0), so ``combine(deltas, weights, method="sum")`` equals :func:`deltahub.delta.add_deltas` bit for bit. No
options.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..sparse_ops import Entries, weighted_sum


def task_arithmetic(
    entries: Sequence[Entries], weights: Sequence[float], *, name: str, numel: int
) -> Entries:
    """``sum_i weights[i] * entries[i]`` in float32 over the union of positions."""
    return weighted_sum(entries, weights)
