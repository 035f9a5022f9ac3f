"""Optimizers for sparse fine-tuning: per-slot state that reselection can reset or seed."""

from .adamw import SftAdamW
from .sm3 import SftSM3

__all__ = ["SftAdamW", "SftSM3"]
