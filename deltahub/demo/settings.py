"""The demo's budgets: the default run on SmolLM2-135M and the ``--fast`` run on a tiny random model."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class Settings:
    """Budgets for one run. The defaults take about 7 minutes on 2 CPU cores for SmolLM2-135M (measured; the
    limit is 10)."""

    steps: int
    density: float
    seq_len: int = 128
    batch_size: int = 4
    held_out_blocks: int = 24  # per task: 24 x 128 = 3,072 held-out tokens
    # Measured on SmolLM2-135M (60 steps, then 50): SM3 diverged at 3e-2 and 1e-1 within 20 steps; at 5e-3
    # (SM3) and 1e-3 (AdamW, RigL) each delta overshot: at 0.7 of its weight it scored as well on its own task
    # and hurt the other task ~10x less, so the two composed kept only 57% / 39% of their gains. At 2e-3 / 6e-4
    # (and 50 steps) each delta keeps 98% / 93% of that gain and the composition keeps 70% / 77% (sum) and 87% / 88% (ties).
    lr: dict[str, float] = field(default_factory=lambda: {"rigl": 6e-4, "sm3": 2e-3})
    # Cap on each training text: `deltahub train` evaluates on its last tenth before and after training, so
    # text beyond what the steps can use only costs time.
    train_chars: int | None = None
    sample_tokens: int = 32


DEFAULT = Settings(steps=50, density=0.01)
FAST = Settings(
    steps=150,
    density=0.05,
    seq_len=64,
    held_out_blocks=8,
    lr={"rigl": 1e-2, "sm3": 0.1},
    train_chars=40_000,
    sample_tokens=24,
)


def settings_for(fast: bool, steps: int | None = None, density: float | None = None) -> Settings:
    # Checked here, before the demo builds anything: NaN passes every comparison-based range check.
    if density is not None and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise InvalidArgumentError(f"`density` must be a number in (0, 1], e.g. 0.01 for 1%; got {density!r}")
    if steps is not None and not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise InvalidArgumentError(f"`steps` must be a positive integer; got {steps!r}")
    settings = FAST if fast else DEFAULT
    return replace(settings, steps=steps or settings.steps, density=density or settings.density)
