"""The ``deltahub`` command: one click group, each verb a thin shell over a public function, one module per verb.

Every failure prints one ``error: ...`` line and exits with the code of its kind (``_errors.EXIT_CODES``,
documented in ``docs/cli.md``); ``DELTAHUB_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import importlib
import inspect
import sys

import click

from .._version import __version__
from ._errors import exit_code_table, main_with_errors

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

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, command, rest = super().resolve_command(ctx, args)
        holder = ctx.meta.get("deltahub.command")
        if holder is not None:
            holder[0] = command  # the error layer rewrites keyword arguments into this verb's flags
        return name, command, rest

    def main(self, args=None, prog_name=None, **_: object):  # type: ignore[override]
        sys.exit(main_with_errors(self, args, prog_name or "deltahub"))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deltahub")
def main() -> None:
    """deltahub: sparse deltas for LLMs. Train, store, share, compose and merge them.

    \b
    Examples:
      deltahub demo                  # the end-to-end example on SmolLM2-135M-Instruct, offline (~7 min)
      deltahub demo --fast           # the same flow on a tiny random model (~30 s)
      deltahub inspect ./my-delta
      deltahub merge ./base ./my-delta --out ./merged

    \b
    Errors print one line, "error: ...", and exit with (DELTAHUB_DEBUG=1 adds the traceback):
    EXIT_CODES
    """


main.help = inspect.cleandoc(main.help or "").replace("EXIT_CODES", exit_code_table().strip("\n"))


def _register() -> None:
    from .convert import convert
    from .demo import demo
    from .extract import extract
    from .inspect import inspect
    from .merge import merge
    from .pull import pull
    from .push import push

    for command in (demo, push, pull, merge, inspect, extract, convert):
        main.add_command(command)


_register()
