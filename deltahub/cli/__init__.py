"""The ``deltahub`` command: one click group, each verb a thin shell over a public function.

Each verb lives in its own module of this package and is registered explicitly at the bottom of this file.
Known errors (deltahub's own, missing files, bad values) print as ``error: ...`` with exit code 1; set
``DELTAHUB_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from .. import __version__
from ..errors import DeltahubError

KNOWN_ERRORS = (DeltahubError, FileNotFoundError, FileExistsError, ValueError)


# Verbs that live outside deltahub's core, imported only when invoked: `train` pulls in the training
# subsystem, which depends on deltahub (never the reverse).
LAZY_COMMANDS = {"train": "training.cli:train"}


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, name: str):
        if name in LAZY_COMMANDS and name not in self.commands:
            module, attr = LAZY_COMMANDS[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)

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


def _register() -> None:
    from .demo import demo
    from .hub import pull, push
    from .merge import extract, inspect, merge

    for command in (demo, push, pull, merge, inspect, extract):
        main.add_command(command)


_register()
