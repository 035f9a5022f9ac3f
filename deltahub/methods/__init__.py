"""Combination methods: an explicit registry of pure per-parameter functions, and :func:`combine`.

A method combines ONE parameter's sparse inputs and never densifies::

    fn(entries, weights, *, name, numel, **options) -> (indices, values)

``entries[i]`` is ``(indices, values)`` of the i-th delta that touches the parameter (deltas that do not touch
it are absent, with their weights), ``name`` the state-dict key, ``numel`` the parameter's element count. The
result has sorted unique integer indices (int32 or int64), a subset of the inputs' union, and float32 values.

Built-ins (one module each, registered below, explicitly): ``sum``, ``magnitude``, ``ties``, ``dare``. Register
another with :func:`register_method`.

Example:
    >>> merged = combine([math_delta, code_delta], weights=[1.0, 0.7], method="ties", method_options={"density": 0.3})
"""

from __future__ import annotations

import keyword
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from ..delta import ParamDelta, SparseDelta, common_base
from ..errors import ArgumentTypeError, InvalidArgumentError, MethodOptionError, UnknownMethodError
from ..sparse_ops import Entries
from .dare import dare
from .magnitude import magnitude
from .sum import task_arithmetic
from .ties import ties

if TYPE_CHECKING:
    from ..inputs import DeltaInputs, DeltaSource

__all__ = [
    "MethodFunction",
    "MethodOption",
    "MethodSpec",
    "available_methods",
    "combine",
    "combine_inputs",
    "get_method",
    "register_method",
    "resolve_options",
]

MethodFunction = Callable[..., Entries]

_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
# Keywords combine() or the method call already use: an option with one of these names could never be passed.
_RESERVED_OPTIONS = frozenset({"deltas", "weights", "method", "entries", "name", "numel"})


def _fmt(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class MethodOption:
    """One option of a method: its type, default, allowed range and help text.

    Args:
        default: the value used when the option is not given; must itself be valid.
        help: one line, shown by the CLI.
        kind: ``float`` (any real number accepted, stored as float) or ``int`` (integers only; bools refused).
        low, high: bounds, None for unbounded.
        include_low, include_high: whether each bound is allowed.

    Example:
        >>> MethodOption(0.5, "fraction kept", low=0.0, high=1.0, include_low=False).range
        'a number in (0, 1]'
    """

    default: float | int
    help: str
    kind: type = float
    low: float | None = None
    high: float | None = None
    include_low: bool = True
    include_high: bool = True

    def __post_init__(self) -> None:
        if self.kind not in (float, int):
            raise InvalidArgumentError(f"MethodOption kind must be float or int; got {self.kind!r}")
        problem = self.problem(self.default)
        if problem:
            raise InvalidArgumentError(f"MethodOption default {self.default!r} is invalid: it {problem}")

    @property
    def range(self) -> str:
        """The allowed values in words, e.g. ``"a number in (0, 1]"``, ``"a number >= 0"``, ``"an integer"``."""
        what = "an integer" if self.kind is int else "a number"
        if self.low is None and self.high is None:
            return what
        if self.high is None:
            return f"{what} {'>=' if self.include_low else '>'} {_fmt(self.low)}"  # type: ignore[arg-type]
        if self.low is None:
            return f"{what} {'<=' if self.include_high else '<'} {_fmt(self.high)}"
        left, right = "[" if self.include_low else "(", "]" if self.include_high else ")"
        return f"{what} in {left}{_fmt(self.low)}, {_fmt(self.high)}{right}"

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` as a phrase ("must be ..."), or None when it is valid."""
        wanted = numbers.Integral if self.kind is int else numbers.Real
        if isinstance(value, bool) or not isinstance(value, wanted):
            return f"must be {self.range}"
        # Integers are compared as they are: float() of a huge seed would overflow.
        if self.kind is float and not math.isfinite(float(value)):
            return f"must be {self.range}"
        too_low = self.low is not None and (value < self.low or (value == self.low and not self.include_low))
        too_high = self.high is not None and (
            value > self.high or (value == self.high and not self.include_high)
        )
        return f"must be {self.range}" if too_low or too_high else None

    def coerce(self, value: Any) -> float | int:
        return int(value) if self.kind is int else float(value)


@dataclass(frozen=True, eq=False)
class MethodSpec:
    """A registered combination method.

    Args:
        name: lowercase identifier used everywhere (``combine(method=...)``, the CLI, provenance).
        function: the pure per-parameter function (see the module docstring).
        options: ``{option name: MethodOption}``; the function receives every one as a keyword argument.
        description: one line for listings and ``--help``.
    """

    name: str
    function: MethodFunction
    options: Mapping[str, MethodOption] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.name, str) or not _NAME.match(self.name) or keyword.iskeyword(self.name):
            problems.append(
                f"name must be a lowercase identifier (letters, digits, '_', starting with a letter), e.g. "
                f"'my_merge'; got {self.name!r}"
            )
        if not callable(self.function):
            problems.append(f"function must be callable; got {type(self.function).__name__}")
        for key, option in dict(self.options).items():
            if not isinstance(key, str) or not _NAME.match(key) or keyword.iskeyword(key):
                problems.append(f"option name {key!r} must be a lowercase identifier")
            elif key in _RESERVED_OPTIONS:
                problems.append(f"option name {key!r} is reserved ({', '.join(sorted(_RESERVED_OPTIONS))})")
            if not isinstance(option, MethodOption):
                problems.append(f"option {key!r} must be a MethodOption; got {type(option).__name__}")
        if not isinstance(self.description, str) or "\n" in self.description:
            problems.append("description must be one line of text")
        if problems:
            raise InvalidArgumentError("invalid MethodSpec: " + "; ".join(problems))
        # Frozen all the way down: a registered method's options cannot be edited behind the registry's back.
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def defaults(self) -> dict[str, float | int]:
        return {key: option.default for key, option in self.options.items()}

    def resolve(self, options: Mapping[str, Any]) -> dict[str, float | int]:
        """Every option of this method, given values checked and filled in with defaults.

        Raises MethodOptionError listing every unknown option and out-of-range value at once.
        """
        problems = []
        unknown = [key for key in options if key not in self.options]
        if unknown:
            names = ", ".join(repr(k) for k in unknown)
            if self.options:
                problems.append(
                    f"combination method {self.name!r} has no option{'s' if len(unknown) > 1 else ''} {names}; "
                    f"valid options: {', '.join(sorted(self.options))}"
                )
            else:
                problems.append(f"combination method {self.name!r} takes no options; got {names}")
        resolved = self.defaults
        for key, value in options.items():
            option = self.options.get(key)
            if option is None:
                continue
            problem = option.problem(value)
            if problem:
                problems.append(
                    f"option {key!r} of combination method {self.name!r} {problem}; got {value!r}"
                )
            else:
                resolved[key] = option.coerce(value)
        if problems:
            raise MethodOptionError("; ".join(problems))
        return resolved


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a combination method to the registry; returns ``spec``.

    Raises ValueError when the name is taken (the spec itself checks its name is a lowercase identifier).
    """
    if not isinstance(spec, MethodSpec):
        raise ArgumentTypeError(f"register_method expects a MethodSpec; got {type(spec).__name__}")
    if spec.name in _REGISTRY:
        raise InvalidArgumentError(
            f"combination method {spec.name!r} is already registered ({_REGISTRY[spec.name].description}); "
            "choose another name"
        )
    _REGISTRY[spec.name] = spec
    return spec


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    """The registered method called ``name``; UnknownMethodError listing the valid names otherwise."""
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        raise UnknownMethodError(
            f"unknown combination method {name!r}; valid methods: {', '.join(available_methods())}"
        )
    return spec


def resolve_options(method: str, options: Mapping[str, Any]) -> dict[str, float | int]:
    """``method``'s full option dict (defaults filled in), after checking ``options``; for callers that validate
    before doing any work (the CLI, the streaming merge)."""
    return get_method(method).resolve(options)


def combine_param(
    spec: MethodSpec,
    options: Mapping[str, Any],
    name: str,
    deltas: Sequence[SparseDelta],
    weights: Sequence[float],
) -> ParamDelta:
    """One parameter of :func:`combine`: the method over the deltas that touch ``name``, float32 values.

    A lone delta at weight 1 under ``sum`` is itself (values cast to float32): the shortcut lives here, once, so
    ``combine`` (and so ``load_model``) and the streaming merge cannot disagree about it.
    """
    if len(deltas) == 1 and weights[0] == 1.0 and spec.name == "sum":
        return deltas[0][name].with_values_dtype(torch.float32)
    touching = [(d[name], w) for d, w in zip(deltas, weights, strict=True) if name in d]
    first = touching[0][0]
    idx, vals = spec.function(
        [(p.indices, p.values) for p, _ in touching],
        [w for _, w in touching],
        name=name,
        numel=first.numel,
        **options,
    )
    vals = vals.to(torch.float32)
    # Built-ins keep positions sorted and in range by construction; only float32 overflow of huge weights can
    # break them, so check that alone (the full check costs several O(nnz) passes per parameter).
    if spec.name in _BUILTINS and bool(torch.isfinite(vals).all()):
        return ParamDelta._trusted(idx, vals, first.shape, first.dtype)
    try:
        return ParamDelta(idx, vals, first.shape, first.dtype)
    except ValueError as e:
        raise InvalidArgumentError(
            f"combination method {spec.name!r} gave an invalid result for {name}: {e}"
        ) from e


def combine(
    deltas: Sequence[DeltaSource] | DeltaSource,
    *,
    weights: Sequence[float] | None = None,
    method: str = "sum",
    method_options: Mapping[str, Any] | None = None,
    force: bool = False,
) -> SparseDelta:
    """Combine several deltas of the same base into one with a registered method.

    Args:
        deltas: the inputs (SparseDelta objects, delta folders or files, Hub ids ``org/name[@rev]``), all for
            the same base (checked with :func:`deltahub.delta.common_base`).
        weights: one finite weight per delta (default 1 each); -1 subtracts.
        method: a name from :func:`available_methods` (``sum``, ``magnitude``, ``ties``, ``dare``).
        method_options: the method's options, e.g. ``{"density": 0.3, "seed": 1}`` for ``dare``.
        force: combine even when the deltas' base fingerprints disagree (shapes are always checked).

    Returns:
        A SparseDelta with float32 values, parameters in first-seen order, positions a subset of the inputs'
        union; every parameter an input touches is present (possibly with nnz 0 after trimming).

    Raises:
        UnknownMethodError, MethodOptionError, ValueError (weights), TypeError, BaseMismatchError; all before
        any work.

    Example:
        >>> merged = combine([a, b], weights=[1.0, -0.5], method="dare", method_options={"density": 0.2})
    """
    from ..inputs import validate_inputs

    return combine_inputs(
        validate_inputs(deltas, weights=weights, method=method, method_options=method_options, force=force)
    )


def combine_inputs(inputs: DeltaInputs) -> SparseDelta:
    """:func:`combine` on inputs already checked by :func:`deltahub.inputs.validate_inputs`."""
    spec = get_method(inputs.method)
    deltas, weights = inputs.deltas, inputs.weights
    base = common_base(deltas, force=inputs.force)

    names: dict[str, None] = {}  # an ordered set: parameters in first-seen order
    for d in deltas:
        names.update(dict.fromkeys(d))
    params = {name: combine_param(spec, inputs.options, name, deltas, weights) for name in names}
    provenance = {
        "operation": "combine",
        "method": spec.name,
        "options": dict(inputs.options),
        "inputs": [{"weight": w, "provenance": d.provenance} for d, w in zip(deltas, weights, strict=True)],
    }
    return SparseDelta(params, provenance=provenance, **base)


_BUILTINS = frozenset({"sum", "magnitude", "ties", "dare"})
_DENSITY_HELP = "fraction of each delta's entries kept"
register_method(MethodSpec("sum", task_arithmetic, {}, "task arithmetic: sum_i w_i * D_i in float32"))
register_method(
    MethodSpec(
        "magnitude",
        magnitude,
        {"density": MethodOption(0.5, _DENSITY_HELP, low=0.0, high=1.0, include_low=False)},
        "keep each delta's largest-magnitude entries, then weighted sum",
    )
)
register_method(
    MethodSpec(
        "ties",
        ties,
        {
            "density": MethodOption(
                0.5, _DENSITY_HELP + " before the sign election", low=0.0, high=1.0, include_low=False
            )
        },
        "TIES: trim by magnitude, elect sign by total weighted mass, mean of agreeing values",
    )
)
register_method(
    MethodSpec(
        "dare",
        dare,
        {
            "density": MethodOption(
                0.5, "keep probability of each entry", low=0.0, high=1.0, include_low=False
            ),
            "seed": MethodOption(0, "seed of the random keep mask", kind=int),
        },
        "DARE: drop entries at random, rescale kept ones by 1/density, weighted sum",
    )
)
