"""`deltahub demo`: the README's main job."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("deltahub-demo"),
    show_default=True,
    help="Folder for the base, the fine-tunes and the deltas (an earlier demo's output there is replaced).",
)
@click.option(
    "--steps", type=click.IntRange(1), default=60, show_default=True, help="Fine-tuning steps per task."
)
@click.option(
    "--density",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.1,
    show_default=True,
    help="Fraction of each weight kept in the extracted deltas.",
)
@click.option("--seed", type=int, default=0, show_default=True)
def demo(out: Path, steps: int, density: float, seed: int) -> None:
    """Run deltahub end to end on a tiny model built from a config (no internet, no GPU).

    Fine-tunes a tiny Llama on two synthetic tasks, extracts sparse deltas, saves them, reports their
    overlap, then composes them at load time (alone, summed, one negated) and prints held-out losses.

    \b
    Example:
      deltahub demo --out ./demo-out
    """
    from ..demo import run_demo

    run_demo(out, steps=steps, density=density, seed=seed, echo=click.echo)
