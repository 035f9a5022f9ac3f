"""Whether deltas belong together and fit a base: the checks every composition and merge runs first.

:func:`common_base` says which base several deltas share (and refuses deltas of different bases);
:func:`check_base` checks deltas against a base's names, shapes, dtypes and fingerprint samples, through a
:class:`BaseView` (live tensors here; safetensors headers and ``pread`` samples in the streaming merge). No
torch: the merge's fast path runs these on numpy-backed deltas without importing it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .errors import BaseMismatchError
from .fingerprint import samples_match, tensor_samples
from .inputs import describe

if TYPE_CHECKING:
    import torch

    from .delta import SparseDelta


def common_base(deltas: Iterable[SparseDelta], *, force: bool = False) -> dict[str, Any]:
    """The base identity several deltas share: base_model, base_revision and the union of fingerprints.

    Deltas belong to the same base when they agree on what they can see of it: the shape of every parameter
    two of them touch, and the fingerprint samples both recorded for it (compared as
    :func:`deltahub.fingerprint.samples_match` does: exactly in one dtype, within one rounding across dtypes).
    The ``base_model`` strings are information, never the test: ``./models/base``, an HF-cache snapshot path
    and ``alice/tiny-base`` name the same weights when the fingerprints say so. The result names the first
    recorded base that looks like a Hub id (with that delta's revision), else the first recorded one.

    Args:
        deltas: the deltas to combine.
        force: skip the fingerprint comparison (shapes are always compared: a sum of mismatched shapes is
            meaningless).

    Raises:
        BaseMismatchError: naming every parameter whose shape or fingerprint differs between two deltas.
    """
    from .identity import is_hub_id

    deltas = list(deltas)
    named = [(d.base_model, d.base_revision) for d in deltas if d.base_model]
    hub_named = [(m, r) for m, r in named if is_hub_id(m)]
    base_model, base_revision = (hub_named or named or [(None, None)])[0]
    fingerprint: dict[str, tuple[float, ...]] = {}
    seen: dict[str, tuple[tuple[int, ...], Any, int]] = {}  # name -> shape, base dtype, first delta
    shape_problems, value_problems = [], []
    for i, d in enumerate(deltas):
        for name, p in d.items():
            if name not in seen:
                seen[name] = (p.shape, p.dtype, i)
            elif seen[name][0] != p.shape:
                shape_problems.append(
                    f"{name}: delta {i} has shape {list(p.shape)}, delta {seen[name][2]} has {list(seen[name][0])}"
                )
        for name, samples in d.fingerprint.items():
            if name not in fingerprint:
                fingerprint[name] = samples
                continue
            first_dtype, first = seen[name][1], seen[name][2]
            if not force and not samples_match(fingerprint[name], samples, first_dtype, d[name].dtype):
                value_problems.append(
                    f"{name}: delta {i} was made on base values {[round(s, 6) for s in samples[:3]]}..., "
                    f"delta {first} on {[round(s, 6) for s in fingerprint[name][:3]]}..."
                )
    if shape_problems:
        raise BaseMismatchError(
            "these deltas were made for different models (parameter shapes differ):", shape_problems
        )
    if value_problems:
        raise BaseMismatchError(
            f"these deltas were made on different base weights ({len(value_problems)} parameters differ); "
            "combine deltas of one base, or pass force=True (--force) to combine anyway:",
            value_problems,
        )
    return {"base_model": base_model, "base_revision": base_revision, "fingerprint": fingerprint}


def _prefix_hint(missing: list[str], available: Sequence[str]) -> str:
    """Suggest the fix when the names differ only by a prefix (a delta for ``LlamaForCausalLM`` applied to a
    bare ``LlamaModel``, say)."""
    name = missing[0]
    for other in available:
        if other.endswith(name) or name.endswith(other):
            return f" (the target has {other!r}: the delta was made for a different model class or prefix)"
    return ""


@runtime_checkable
class BaseView(Protocol):
    """What :func:`check_base` needs to know about a base: names, shapes and dtypes, and the few fingerprint
    samples. Implemented over live tensors here, and over safetensors headers by the streaming merge (which reads
    only the sampled elements, never a whole tensor)."""

    def names(self) -> Collection[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def samples(self, name: str) -> tuple[float, ...]:
        """The base values at ``sample_positions(name, numel)``, as float32 Python floats."""
        ...

    def problem(self, name: str) -> str | None:
        """Why this tensor's values cannot be used (e.g. it is on the meta device), or None."""
        ...


class _TensorsView:
    """A :class:`BaseView` over a ``{name: tensor}`` mapping (a live model's tensors, tied aliases included)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = tensors

    def names(self) -> Collection[str]:
        return self._tensors.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def samples(self, name: str) -> tuple[float, ...]:
        return tensor_samples(name, self._tensors[name])

    def problem(self, name: str) -> str | None:
        if self._tensors[name].device.type == "meta":
            return "is on the meta device; load the base weights before applying"
        return None


def check_base(
    deltas: Sequence[SparseDelta],
    tensors: Mapping[str, torch.Tensor] | BaseView,
    *,
    force: bool = False,
    limit: int = 10,
) -> None:
    """Raise BaseMismatchError unless every delta fits the base: names present, shapes equal, floating
    dtypes, and (unless ``force``) the fingerprint samples match. Costs a few element reads per parameter.

    ``tensors`` is a ``{name: tensor}`` mapping or any :class:`BaseView` (the merge passes one that reads
    safetensors headers and single elements).
    """
    view = tensors if isinstance(tensors, BaseView) else _TensorsView(tensors)
    available = view.names()
    problems: list[str] = []
    fingerprint_problems: list[str] = []
    for i, delta in enumerate(deltas):
        who = describe(delta, i)
        missing = [n for n in delta if n not in available]
        if missing:
            problems.append(
                f"{who}: {len(missing)} parameters not in the base, e.g. {missing[:3]}"
                + _prefix_hint(missing, list(available))
            )
        for name, p in delta.items():
            if name not in available:
                continue
            shape, dtype = view.shape(name), view.dtype(name)
            if shape != p.shape:
                problems.append(
                    f"{who}: {name} has shape {list(shape)} in the base, {list(p.shape)} in the delta"
                )
            elif not dtype.is_floating_point:
                problems.append(
                    f"{who}: {name} is {dtype} in the base; deltas only apply to floating tensors"
                )
            else:
                problem = view.problem(name)
                if problem:
                    problems.append(f"{who}: {name} {problem}")
        if not force and not problems:
            for name, recorded in delta.fingerprint.items():
                if name not in available:
                    continue
                live = view.samples(name)
                if not samples_match(recorded, live, delta[name].dtype, view.dtype(name)):
                    fingerprint_problems.append(
                        f"{who}: {name}: base values differ from those the delta was made on (expected "
                        f"{[round(s, 6) for s in recorded[:3]]}..., found {[round(s, 6) for s in live[:3]]}...)"
                    )
    if problems:
        raise BaseMismatchError(
            "the deltas do not fit this base model (parameter names or shapes differ):",
            _first(problems, limit),
        )
    if fingerprint_problems:
        raise BaseMismatchError(
            f"the deltas were made on a different base ({len(fingerprint_problems)} parameters differ); load the "
            "base named in the delta's config, or pass force=True to apply anyway:",
            _first(fingerprint_problems, limit),
        )


def _first(problems: list[str], limit: int) -> list[str]:
    """The first ``limit`` problems, and how many more there are (a 70B model can have hundreds)."""
    if len(problems) <= limit:
        return problems
    return [*problems[:limit], f"... and {len(problems) - limit} more"]
