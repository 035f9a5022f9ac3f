"""``dare``: DARE (Yu et al. 2023): random drop with rescale, then task arithmetic.

Each delta's stored entries of the parameter are kept independently with probability ``density``; kept values
are divided by ``density`` (so the expected value of every entry is unchanged), then the deltas are summed with
their weights in float32 as in ``sum``. Exact zeros in the result are dropped.

The keep mask is reproducible: it is drawn on the CPU from a ``torch.Generator`` seeded with a SHA-256 hash of
``(seed, i, parameter name, nnz)``, where ``i`` is the delta's position in ``entries``, i.e. its rank among the
deltas that touch this parameter, in the order given to ``combine``. The same inputs and seed therefore give
the same result on every machine and device, and per parameter there is no dependence on other parameters
(a streaming merge that sees one tensor at a time draws the same mask as ``combine``). Python's ``hash`` is not
used because it is salted per process.

Options:
    density: keep probability, in (0, 1]; default 0.5. 1 keeps everything (plain ``sum`` minus zeros).
    seed: any integer; default 0.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from ..sparse_ops import Entries, drop_zeros, weighted_sum


def keep_mask(*, seed: int, position: int, name: str, nnz: int, density: float) -> torch.Tensor:
    """The CPU boolean mask of the entries DARE keeps for one delta's parameter."""
    key = f"deltahub.dare\x00{int(seed)}\x00{int(position)}\x00{name}\x00{int(nnz)}".encode()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1))
    return torch.rand(nnz, generator=generator, dtype=torch.float64) < density


def dare(
    entries: Sequence[Entries],
    weights: Sequence[float],
    *,
    name: str,
    numel: int,
    density: float,
    seed: int,
) -> Entries:
    """Drop entries at random (keep probability ``density``), rescale by ``1/density``, weighted sum."""
    if density >= 1.0:
        return drop_zeros(*weighted_sum(entries, weights))
    kept = []
    for position, (idx, vals) in enumerate(entries):
        mask = keep_mask(seed=seed, position=position, name=name, nnz=vals.numel(), density=density)
        mask = mask.to(vals.device)
        kept.append((idx[mask], vals[mask].to(torch.float32) / density))
    return drop_zeros(*weighted_sum(kept, weights))
