"""The ``deltahub`` command: one click group, each verb a thin shell over a public function.

Known errors (deltahub's own, missing files, bad values) print as ``error: ...`` with exit code 1; set
``DELTAHUB_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from . import __version__
from .errors import DeltahubError

KNOWN_ERRORS = (DeltahubError, FileNotFoundError, FileExistsError, ValueError)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KNOWN_ERRORS as err:
            if os.environ.get("DELTAHUB_DEBUG") == "1":
                raise
            click.echo(f"error: {err}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deltahub")
def main() -> None:
    """deltahub: sparse deltas for LLMs. Train, store, share, compose and merge them.

    \b
    Examples:
      deltahub demo                  # the end-to-end example on a tiny model, offline
      deltahub demo --out ./demo-out --steps 100
    """


@main.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("deltahub-demo"),
    show_default=True,
    help="Folder for the base, the fine-tunes and the deltas (replaced if it exists).",
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
    from .demo import run_demo

    run_demo(out, steps=steps, density=density, seed=seed, echo=click.echo)


if __name__ == "__main__":
    main()
