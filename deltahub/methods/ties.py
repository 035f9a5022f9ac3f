"""``ties``: TIES merging (Yadav et al. 2023): trim, elect sign, disjoint mean.

Per parameter:

1. Trim: each delta keeps the ``ceil(density * nnz)`` entries of largest ``|value|`` among its own stored
   entries (exactly as ``magnitude``).
2. Weight: ``v_i = w_i * trimmed D_i`` in float32. Weights are applied BEFORE the election, so a negative
   weight flips a delta's vote.
3. Elect: at each position, the elected sign is ``sign(sum_i v_i)`` (the "total mass" rule).
4. Disjoint mean: the result is the mean of the ``v_i`` whose sign equals the elected sign (sum over count of
   those deltas, not over all deltas).

Positions whose total is exactly 0 have no elected sign: they get 0 and are dropped, as is every exact zero.
This is peft's ``ties`` with ``majority_sign_method="total"``, except that peft elects ``+`` for a zero total
and averages the positive values there; trimming is relative to stored entries, not to ``numel``.

Options:
    density: fraction of each delta's entries kept before the election, in (0, 1]; default 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..sparse_ops import Entries, drop_zeros, top_fraction, union


def ties(
    entries: Sequence[Entries], weights: Sequence[float], *, name: str, numel: int, density: float
) -> Entries:
    """Trim, elect sign by total mass, average the agreeing weighted values; exact zeros dropped."""
    trimmed = [top_fraction(idx, vals, density) for idx, vals in entries]
    positions, slots = union([idx for idx, _ in trimmed])
    slot = torch.cat(slots)
    weighted = torch.cat(
        [vals.to(torch.float32) * float(w) for (_, vals), w in zip(trimmed, weights, strict=True)]
    )

    total = torch.zeros(positions.numel(), dtype=torch.float32, device=positions.device)
    total.index_add_(0, slot, weighted)
    elected = torch.sign(total)

    # A zero v_i never agrees with a non-zero elected sign, so it neither adds nor counts; where the elected sign
    # is 0 only zeros agree, leaving a zero sum that drop_zeros removes.
    agrees = torch.sign(weighted) == elected[slot]
    agreeing_sum = torch.zeros_like(total).index_add_(0, slot, torch.where(agrees, weighted, 0.0))
    count = torch.zeros_like(total).index_add_(0, slot, agrees.to(torch.float32))
    return drop_zeros(positions, agreeing_sum / count.clamp_min(1.0))
