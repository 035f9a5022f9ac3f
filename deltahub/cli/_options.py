"""Options several verbs share, defined once: ``--quiet``, ``--token``, ``--overwrite``, the dtype choices, and
the merge-method flags generated from the method registry."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import click

from .._dtypes import VALUE_DTYPES
from ..methods import available_methods, get_method

DTYPES = list(VALUE_DTYPES)


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, without NaN: ``nan`` fails no comparison, so FloatRange lets it through."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        result = super().convert(value, param, ctx)
        if not math.isfinite(result):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return result
TOKEN_HELP = "Hub token (default: HF_TOKEN or the `hf auth login` cache). Never printed."


def silence_progress() -> None:
    """Turn off every progress bar this process could draw: deltahub's (callers pass ``progress=False``),
    huggingface_hub's downloads and uploads, and transformers' weight loading, each through its own switch."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency, but keep --quiet independent of it
        return
    hf_logging.disable_progress_bar()


def _quiet_callback(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        silence_progress()
    return value


quiet_option = click.option(
    "--quiet",
    "-q",
    is_flag=True,
    callback=_quiet_callback,
    expose_value=True,
    help="No progress bars (deltahub's, huggingface_hub's, transformers') and no summary; errors still print.",
)
token_option = click.option("--token", metavar="TOKEN", help=TOKEN_HELP)


def _method_option_specs() -> dict[str, tuple[type, str]]:
    """``{option: (type, help)}`` over every registered method: which methods take it, its range, default."""
    specs: dict[str, tuple[type, list[str]]] = {}
    for name in available_methods():
        for key, option in get_method(name).options.items():
            specs.setdefault(key, (option.kind, []))[1].append(f"{name}: {option.help}, {option.range}, default {option.default:g}")
    return {key: (kind, "; ".join(parts) + ".") for key, (kind, parts) in specs.items()}


METHOD_OPTIONS = _method_option_specs()


def method_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--method`` and one flag per option of the registered methods (``--density``, ``--seed``, ...),
    generated from the registry so a new option gets its flag and help with no CLI edit. The command receives
    ``method`` and ``method_options`` (only the flags given)."""
    for key, (kind, help_text) in reversed(list(METHOD_OPTIONS.items())):
        command = click.option(f"--{key.replace('_', '-')}", key, type=kind, help=help_text)(command)
    return click.option(
        "--method", type=click.Choice(available_methods()), help="How to combine the deltas.  [default: sum]"
    )(command)


def pop_method_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove the generated method flags from a command's keyword arguments; those given, as a dict."""
    return {k: v for k in METHOD_OPTIONS if (v := kwargs.pop(k)) is not None}
