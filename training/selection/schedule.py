"""The reselection schedule, counted in optimizer update steps (not micro-batches).

With R = reselection_steps, A = selection_accumulation_steps and T total steps, reselections happen after steps
A, A + R, A + 2R, ... while below T. Each is preceded by a window of A steps in which statistics are gathered.
The first replaces every slot (the initial positions are random); later ones move a fraction
``p(t) = rate * (1 - t / T)`` (linear) or ``rate * (1 + cos(pi t / T)) / 2`` (cosine) of each weight's slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    reselection_steps: int
    accumulation_steps: int
    total_steps: int
    initial_rate: float
    policy: str = "linear"

    def is_reselection(self, step: int) -> bool:
        """Whether a reselection follows update step ``step`` (1-based)."""
        first = self.accumulation_steps
        return first <= step < self.total_steps and (step - first) % self.reselection_steps == 0

    def next_reselection(self, step: int) -> int | None:
        """The first reselection at or after ``step``, or None if there is none before the end."""
        first = self.accumulation_steps
        if step <= first:
            candidate = first
        else:
            candidate = first + math.ceil((step - first) / self.reselection_steps) * self.reselection_steps
        return candidate if candidate < self.total_steps else None

    def in_window(self, step: int) -> bool:
        """Whether update step ``step`` gathers statistics for the next reselection."""
        upcoming = self.next_reselection(step)
        return upcoming is not None and upcoming - step < self.accumulation_steps

    def rate(self, step: int) -> float:
        """Fraction of each weight's slots to move at the reselection after ``step``."""
        if step == self.accumulation_steps:
            return 1.0
        progress = step / self.total_steps
        if self.policy == "cosine":
            return self.initial_rate * 0.5 * (1 + math.cos(math.pi * progress))
        return self.initial_rate * (1 - progress)
