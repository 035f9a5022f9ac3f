"""The CLI's one error layer: every failure of every verb becomes one ``error: ...`` line on stderr and a
documented exit code (the table below, also in ``docs/cli.md`` and ``deltahub --help``); a traceback only with
``DELTAHUB_DEBUG=1``.

Library messages name keyword arguments (``pass overwrite=True``, ```out```); here they are rewritten into
the flags of the verb that ran (``pass --overwrite``, ``--out``), so the library never speaks CLI and the CLI
never speaks Python.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import traceback
from dataclasses import dataclass

import click

from .. import errors as E

DEBUG_ENV = "DELTAHUB_DEBUG"


@dataclass(frozen=True)
class ExitCode:
    code: int
    kind: str
    catches: tuple[type[BaseException], ...]


# First match wins, so subclasses come before the classes they refine. Every deltahub error also inherits a
# builtin (see deltahub.errors); the builtins below catch what the libraries underneath raise for the same kind.
EXIT_CODES: tuple[ExitCode, ...] = (
    ExitCode(
        2,
        "usage: a bad flag, argument or option value",
        (
            click.UsageError,
            E.InvalidArgumentError,
            E.UnknownMethodError,
            E.MethodOptionError,
            E.MergeConfigError,
        ),
    ),
    ExitCode(
        3,
        "not found: a missing file, folder, Hub repo or revision",
        (E.HubRepoNotFoundError, E.HubRevisionNotFoundError, FileNotFoundError),
    ),
    ExitCode(
        4,
        "the output exists: pass the verb's --overwrite (or choose another --out)",
        (E.DeltaExistsError, FileExistsError),
    ),
    ExitCode(
        5,
        "invalid input: a malformed delta, checkpoint or Hub repo that holds no delta, or an adapter "
        "`deltahub convert` must turn into one first",
        (
            E.DeltaFormatError,
            E.CheckpointError,
            E.NotADeltaError,
            E.ExtractionError,
            E.UnconvertedAdapterError,
            E.ConversionError,
        ),
    ),
    ExitCode(
        6, "wrong base: a delta does not belong to the base model (see --force)", (E.BaseMismatchError,)
    ),
    ExitCode(7, "Hub authentication: a missing, invalid or read-only token", (E.HubAuthError,)),
    ExitCode(
        8,
        "Hub unreachable or failing (offline without a cached copy, a server error)",
        (E.HubConnectionError, E.HubError),
    ),
    ExitCode(
        9,
        "the output cannot be written: out of disk space, a read-only filesystem, a file-size limit",
        (E.OutOfSpaceError, E.OutputNotWritableError),
    ),
    ExitCode(10, "an optional package is missing (the message says what to install)", (E.MissingExtraError,)),
    ExitCode(11, "other deltahub errors (e.g. a revert that would not restore the base)", (E.DeltahubError,)),
    ExitCode(
        1, "an unexpected error (a bug: please report it with DELTAHUB_DEBUG=1's traceback)", (Exception,)
    ),
)
INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


# What the OS says when an output cannot be written, raised by a library underneath (an extract's save, say):
# the same kind as OutOfSpaceError and OutputNotWritableError, not a bug.
_UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def exit_code(err: BaseException) -> int:
    if isinstance(err, OSError) and not isinstance(err, E.DeltahubError) and err.errno in _UNWRITABLE:
        return 9
    for entry in EXIT_CODES:
        if isinstance(err, entry.catches):
            return entry.code
    return 1


def exit_code_table() -> str:
    """The table for ``--help`` and the docs."""
    rows = [(0, "success"), *((e.code, e.kind) for e in EXIT_CODES), (INTERRUPTED, "interrupted (Ctrl-C)")]
    return "\n".join(f"  {code:>3}  {kind}" for code, kind in sorted(rows))


def _flag(param: click.Parameter) -> str:
    if isinstance(param, click.Argument):
        return param.human_readable_name
    longs = [o for o in param.opts if o.startswith("--")]
    return longs[0] if longs else param.opts[0]


_KEYWORD_VALUE = re.compile(r"\b([a-z_][a-z0-9_]*)=(True|False|'[^']*'|\"[^\"]*\"|[^\s,;)]+)")
_BACKQUOTED = re.compile(r"`([a-z_][a-z0-9_]*)`")


def to_flags(message: str, command: click.Command | None) -> str:
    """Rewrite the keyword arguments a library message names into ``command``'s flags: ``overwrite=True`` ->
    ``--overwrite``, ``on_mismatch='skip'`` -> ``--on-mismatch skip``, ```out``` -> ``--out``."""
    if command is None:
        return message
    params = {p.name: p for p in command.params if p.name}

    def keyword_value(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        param = params.get(name)
        if param is None:
            return match.group(0)
        if isinstance(param, click.Option) and param.is_flag:
            return _flag(param) if value == "True" else match.group(0)
        return f"{_flag(param)} {value.strip(chr(39) + chr(34))}"

    def backquoted(match: re.Match) -> str:
        param = params.get(match.group(1))
        return _flag(param) if param is not None else match.group(0)

    return _BACKQUOTED.sub(backquoted, _KEYWORD_VALUE.sub(keyword_value, message))


def _one_line(err: BaseException) -> str:
    if isinstance(err, click.UsageError):
        text = err.format_message()
        where = err.ctx.command_path if err.ctx is not None else "deltahub"
        return f"{text} (see `{where} --help`)"
    text = str(err).strip() or type(err).__name__
    if not isinstance(err, (E.DeltahubError, OSError, ValueError, LookupError)):
        text = f"internal error: {type(err).__name__}: {text} (set {DEBUG_ENV}=1 for the traceback and report it)"
    elif isinstance(err, OSError) and not isinstance(err, E.DeltahubError) and err.filename and err.strerror:
        text = f"{err.strerror}: {err.filename}"
    elif isinstance(err, OSError) and err.strerror:  # OutOfSpaceError & co: the message, not "[Errno 28] ..."
        text = err.strerror
    return text


def report(err: BaseException, command: click.Command | None) -> int:
    """Print ``err`` as the CLI does and return its exit code (a traceback first with DELTAHUB_DEBUG=1)."""
    if os.environ.get(DEBUG_ENV) == "1":
        traceback.print_exception(err)
    message = to_flags(_one_line(err), command)
    # Problems collected into one error stay one per line under the error line: still one message.
    click.echo(f"error: {message}", err=True)
    return exit_code(err)


def main_with_errors(group: click.Group, args: list[str] | None = None, prog_name: str = "deltahub") -> int:
    """Run ``group`` and turn every failure into one error line and an exit code."""
    command: list[click.Command | None] = [None]
    try:
        with group.make_context(prog_name, list(sys.argv[1:] if args is None else args)) as ctx:
            ctx.meta["deltahub.command"] = command
            group.invoke(ctx)
        return 0
    except click.exceptions.Exit as done:  # --help, --version
        return done.exit_code
    except click.Abort:
        click.echo("error: interrupted", err=True)
        return INTERRUPTED
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return INTERRUPTED
    except click.ClickException as err:
        if not isinstance(err, click.UsageError):
            click.echo(f"error: {err.format_message()}", err=True)
            return err.exit_code
        return report(err, command[0])
    except Exception as err:
        return report(err, command[0])
