"""SM3 selection: grow where the row x column second-moment estimate ``r_i * c_j`` is largest.

No dense gradient is needed, but the scores of all inactive positions are an outer product the size of the
weight. The reference materialised it (plus masks) per weight at once; here rows are scored in chunks of at
most ``CHUNK_ELEMENTS`` and a running top-n is kept, which makes the same choice with bounded memory.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32 scores at a time


def grow_sm3(row: torch.Tensor, col: torch.Tensor, kept_mask: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` positions not kept (``kept_mask`` is a flat bool mask) with the largest ``row[i] * col[j]``."""
    rows, cols = row.numel(), col.numel()
    if n <= 0:
        return torch.empty(0, dtype=torch.int64, device=row.device)
    chunk_rows = max(1, CHUNK_ELEMENTS // cols)
    best_scores = torch.empty(0, dtype=torch.float32, device=row.device)
    best_positions = torch.empty(0, dtype=torch.int64, device=row.device)
    for start in range(0, rows, chunk_rows):
        stop = min(rows, start + chunk_rows)
        scores = (row[start:stop, None] * col[None, :]).reshape(-1)
        scores.masked_fill_(kept_mask[start * cols : stop * cols], -1.0)  # scores are >= 0: kept never win
        take = min(n, scores.numel())
        top = torch.topk(scores, take, sorted=False)
        best_scores = torch.cat([best_scores, top.values])
        best_positions = torch.cat([best_positions, top.indices + start * cols])
        if best_scores.numel() > n:
            keep = torch.topk(best_scores, n, sorted=False).indices
            best_scores, best_positions = best_scores[keep], best_positions[keep]
    valid = best_scores >= 0
    return best_positions[valid]
