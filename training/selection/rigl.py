"""RigL-style selection: grow where the accumulated dense gradient is largest.

During a selection window each micro-batch's dense weight gradient (the product full fine-tuning computes) is
observed once, in the layer's backward. On the first observation a candidate set of ``2k`` positions with the
largest ``|g|`` is chosen (twice the slots, so enough candidates remain after excluding kept positions);
afterwards only the candidates' sum of g and of g^2 (per update step) are kept: O(k) memory, never a dense
accumulator. In multi-process runs the first gradient is all-reduced before choosing candidates, and each update
step's candidate gradient is averaged over the ranks before it is folded into the sums: every rank then holds
the same statistics (a checkpoint of one rank is complete) and picks the same positions, and the squared sums are
those of the global batch's gradient, as in a single-process run on the union of the ranks' batches (summing
each rank's squares instead would add the ranks' disagreement to AdamW's seeded second moment).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class RiglStats:
    """Selection statistics of one layer for the current window."""

    def __init__(self, numel: int, k: int, group=None):
        self.numel, self.k, self.group = numel, k, group
        self.candidates: torch.Tensor | None = None  # flat positions, int64
        self.sum_g = self.sum_g2 = self.current = None
        self.steps = 0

    def observe(self, dense_grad: torch.Tensor) -> None:
        flat = dense_grad.reshape(-1)
        if self.candidates is None:
            if self.group is not None:
                flat = flat.clone()
                dist.all_reduce(flat, group=self.group)
                flat /= dist.get_world_size(self.group)
            n = min(self.numel, 2 * self.k)
            # every rank holds the same (all-reduced) gradient here, so topk picks the same candidates on each
            self.candidates = torch.topk(flat.abs(), n, sorted=False).indices
            self.sum_g = torch.zeros(n, dtype=torch.float32, device=flat.device)
            self.sum_g2 = torch.zeros_like(self.sum_g)
            self.current = torch.zeros_like(self.sum_g)
            if self.group is not None:  # the local gradient is what this rank accumulates
                flat = dense_grad.reshape(-1)
        self.current += flat.index_select(0, self.candidates).to(torch.float32)

    def end_step(self) -> None:
        """Fold the finished update step's gradient (summed over its micro-batches) into the window's sums."""
        if self.current is None:
            return
        if self.group is not None:
            dist.all_reduce(self.current, group=self.group)
            self.current /= dist.get_world_size(self.group)
        self.sum_g += self.current
        self.sum_g2 += self.current * self.current
        self.current.zero_()
        self.steps += 1

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean gradient and mean squared gradient per candidate over the window's update steps."""
        steps = max(self.steps, 1)
        return self.sum_g / steps, self.sum_g2 / steps

    def state_dict(self) -> dict:
        return {
            "candidates": self.candidates,
            "sum_g": self.sum_g,
            "sum_g2": self.sum_g2,
            "current": self.current,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.candidates, self.sum_g, self.sum_g2 = state["candidates"], state["sum_g"], state["sum_g2"]
        self.current, self.steps = state["current"], int(state["steps"])


def grow_rigl(
    stats: RiglStats, kept_mask: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to ``n`` candidate positions not kept (``kept_mask[position]`` False) with the largest |mean gradient|.

    Returns ``(positions, grad_mean, grad_sq_mean)`` of the chosen candidates.
    """
    mean_g, mean_g2 = stats.means()
    candidates = stats.candidates
    eligible = ~kept_mask[candidates]
    score = torch.where(eligible, mean_g.abs(), torch.full_like(mean_g, -1.0))
    n = min(n, int(eligible.sum()))
    chosen = torch.topk(score, n, sorted=False).indices
    return candidates[chosen], mean_g[chosen], mean_g2[chosen]
