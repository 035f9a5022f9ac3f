"""Optimizers for sparse fine-tuning: per-slot state that reselection can reset or seed."""

import torch

from .adamw import SftAdamW
from .sm3 import SftSM3

__all__ = ["SftAdamW", "SftSM3", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer`` (which the Trainer uses)."""
    while not isinstance(optimizer, (SftAdamW, SftSM3)) and isinstance(
        getattr(optimizer, "optimizer", None), torch.optim.Optimizer
    ):
        optimizer = optimizer.optimizer
    return optimizer
