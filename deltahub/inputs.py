"""The one call shape of every public entry that takes deltas, checked once at the boundary.

``apply_deltas``, ``load_model``, ``merge``, ``combine`` and ``overlap_report`` all take::

    (..., deltas, *, weights=None, method="sum", method_options=None, force=False)

:func:`validate_inputs` checks all of it (the flag's type, the method and its options, one finite weight per
delta) before anything is loaded, then loads each delta with :func:`deltahub.load_delta`, and returns a frozen
:class:`DeltaInputs` that the inner functions trust without checking again.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Union

from .errors import ArgumentTypeError, InvalidArgumentError

if (
    TYPE_CHECKING
):  # the checks need no torch: the merge's fast path runs them before (instead of) importing it
    from .delta import SparseDelta

DeltaSource = Union["SparseDelta", str, os.PathLike]


@dataclass(frozen=True)
class DeltaInputs:
    """Validated inputs of a multi-delta call.

    Attributes:
        deltas: the loaded deltas, in order.
        weights: one float per delta.
        method: the registered combination method's name.
        options: every option of the method, defaults filled in (read-only).
        force: skip the base fingerprint checks (names and shapes are always checked).
    """

    deltas: tuple[SparseDelta, ...]
    weights: tuple[float, ...]
    method: str
    options: Mapping[str, float | int]
    force: bool


def check_weights(count: int, weights: Sequence[float] | float | None) -> list[float]:
    """One finite float weight per delta (default 1.0 each); ValueError listing every problem otherwise."""
    if weights is None:
        return [1.0] * count
    if isinstance(weights, numbers.Real):
        weights = [weights]
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise InvalidArgumentError(f"weights must be a list of numbers, one per delta; got {weights!r}")
    weights = list(weights)
    problems = []
    if len(weights) != count:
        problems.append(f"got {len(weights)} weights for {count} deltas; give one weight per delta, in order")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(float(w)):
            problems.append(f"weight {i} must be a finite number; got {w!r}")
    if problems:
        raise InvalidArgumentError("invalid weights: " + "; ".join(problems))
    return [float(w) for w in weights]


def _is_delta(x: object) -> bool:
    """A SparseDelta, without importing torch to ask (no SparseDelta exists before delta.py was imported)."""
    import sys

    module = sys.modules.get("deltahub.delta")
    return module is not None and isinstance(x, module.SparseDelta)


def _as_list(deltas: object) -> list[Any]:
    if _is_delta(deltas) or isinstance(deltas, (str, os.PathLike)):
        return [deltas]
    if isinstance(deltas, Mapping) or not isinstance(deltas, (Sequence, tuple, list)):
        raise ArgumentTypeError(
            "deltas must be a delta (a SparseDelta, a folder, a file or a Hub id 'org/name[@rev]') or a list of "
            f"them; got {type(deltas).__name__}"
        )
    items = list(deltas)
    bad = [
        f"{i} ({type(d).__name__})"
        for i, d in enumerate(items)
        if not (_is_delta(d) or isinstance(d, (str, os.PathLike)))
    ]
    if bad:
        raise ArgumentTypeError(
            "each delta must be a SparseDelta, a folder, a file or a Hub id 'org/name[@rev]'; items "
            f"{', '.join(bad)} are not"
        )
    return items


@dataclass(frozen=True)
class CallArguments:
    """A multi-delta call's arguments, checked, the deltas not loaded yet (what :func:`check_arguments` gives)."""

    items: tuple[Any, ...]  # SparseDelta objects, folders, files or Hub ids, in order
    weights: tuple[float, ...]
    method: str
    options: Mapping[str, float | int]
    force: bool


def check_arguments(
    deltas: DeltaSource | Sequence[DeltaSource],
    *,
    weights: Sequence[float] | float | None = None,
    method: str = "sum",
    method_options: Mapping[str, Any] | None = None,
    force: bool = False,
    allow_empty: bool = False,
) -> CallArguments:
    """:func:`validate_inputs`' checks of the arguments alone, loading nothing and importing no torch."""
    from .methods import get_method

    if not isinstance(force, bool):
        raise ArgumentTypeError(
            f"force must be True or False; got {force!r}. A combination method's options go in "
            "method_options={...}"
        )
    if method_options is not None and not isinstance(method_options, Mapping):
        raise ArgumentTypeError(
            f"method_options must be a mapping like {{'density': 0.5}}; got {type(method_options).__name__}"
        )
    spec = get_method(method)
    options = spec.resolve(dict(method_options or {}))
    items = _as_list(deltas)
    if not items and not allow_empty:
        raise InvalidArgumentError("need at least one delta")
    weight_list = check_weights(len(items), weights)
    return CallArguments(tuple(items), tuple(weight_list), spec.name, MappingProxyType(options), force)


def validate_inputs(
    deltas: DeltaSource | Sequence[DeltaSource],
    *,
    weights: Sequence[float] | float | None = None,
    method: str = "sum",
    method_options: Mapping[str, Any] | None = None,
    force: bool = False,
    allow_empty: bool = False,
) -> DeltaInputs:
    """Check a call's arguments (all before loading anything), then load the deltas.

    Raises:
        TypeError: ``force`` is not a bool, ``method_options`` is not a mapping, or a delta is of the wrong
            type. (A method option passed as ``force=...`` or a typo'd flag cannot silently change a check.)
        UnknownMethodError, MethodOptionError: the method or its options (every problem at once).
        ValueError: the weights do not pair up with the deltas, or no delta was given.
        DeltaFormatError, FileNotFoundError, HubError, UnconvertedAdapterError: loading a delta failed.
    """
    args = check_arguments(
        deltas,
        weights=weights,
        method=method,
        method_options=method_options,
        force=force,
        allow_empty=allow_empty,
    )
    return load_inputs(args)


def load_inputs(args: CallArguments) -> DeltaInputs:
    """The deltas of arguments :func:`check_arguments` accepted, loaded (what :func:`validate_inputs` does after
    checking)."""
    from .loading import load_delta

    loaded = tuple(d if _is_delta(d) else load_delta(d) for d in args.items)
    return DeltaInputs(loaded, args.weights, args.method, args.options, args.force)


def describe(delta: SparseDelta, position: int) -> str:
    """A short name for a delta in messages: where it came from, else its position."""
    where = delta.origin.get("repo_id") or delta.origin.get("path")
    return f"delta {position} ({where})" if where else f"delta {position}"
