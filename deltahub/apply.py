"""Applying deltas to a live model or state dict in place, and reverting them exactly.

``W' = W + sum_i w_i * D_i``: the combination is accumulated in float32 at the touched positions, added to the
base values in float32 and rounded once to the parameter's dtype. Only touched positions are read or written
(O(nnz) work and memory), so untouched weights stay bit-identical and hot-swapping deltas costs O(nnz).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ._tensors import check_tied, storage_key, tied_groups
from .delta import ParamDelta, SparseDelta, common_base
from .errors import ArgumentTypeError, BaseMismatchError, InvalidArgumentError, PathNotFoundError, RevertError
from .fingerprint import samples_match, tensor_samples
from .inputs import DeltaInputs, DeltaSource, describe, validate_inputs
from .methods import combine_inputs

_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _target_tensors(target: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every name a delta may use for a tensor of ``target``, tied aliases included."""
    if isinstance(target, nn.Module):
        named = dict(target.named_parameters(remove_duplicate=False))
        named.update(target.named_buffers(remove_duplicate=False))
        return {k: v.data if isinstance(v, nn.Parameter) else v for k, v in named.items()}
    if isinstance(target, Mapping):
        return dict(target)
    raise ArgumentTypeError(f"apply_deltas needs an nn.Module or a state dict; got {type(target).__name__}")


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
            "the deltas do not fit this base model (parameter names or shapes differ):", _first(problems, limit)
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


@dataclass
class _Saved:
    tensor: torch.Tensor
    indices: torch.Tensor  # int64, on the tensor's device
    original: torch.Tensor  # base values at ``indices``, in the tensor's dtype
    checksum: torch.Tensor  # of the values written, to notice later changes before reverting


def _checksum(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    # Position-weighted sum of the raw bits: cheap, exact (integer arithmetic wraps deterministically on any
    # device and in any reduction order), and it changes when any written value is overwritten.
    bits = values.contiguous().view(_BITS[values.element_size()]).to(torch.int64)
    return (bits * (indices + 1)).sum()


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if t.is_contiguous():
        return t.view(-1).index_select(0, idx)
    return t[torch.unravel_index(idx, t.shape)]


def _scatter(t: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    if t.is_contiguous():
        t.view(-1).index_copy_(0, idx, values)
    else:
        t.index_put_(torch.unravel_index(idx, t.shape), values)


def add_in_place(t: torch.Tensor, p: ParamDelta, *, revertible: bool = True) -> _Saved | None:
    """``t += p`` at p's positions: float32 sum (float64 for float64 tensors), rounded once to t's dtype.

    The one definition of the arithmetic, shared by load-time application and the streaming merge so both give
    bit-identical weights. Returns what a revert needs, or None with ``revertible=False`` (the merge writes the
    tensor out and never reverts, so it skips the checksum pass).
    """
    idx = p.indices.to(t.device, torch.int64)
    original = _gather(t, idx)
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    new = (original.to(acc) + p.values.to(t.device, acc)).to(t.dtype)
    _scatter(t, idx, new)
    return _Saved(t, idx, original, _checksum(new, idx)) if revertible else None


class AppliedDeltas:
    """What ``apply_deltas`` did, and how to undo it: ``revert()`` restores the base bit-exactly.

    Also a context manager: ``with apply_deltas(model, [d]): ...`` reverts on exit. Handles applied on top of
    each other are reverted in reverse order; a handle whose positions were overwritten since (by a later,
    still-applied delta or by training) refuses to revert rather than silently corrupt the base.

    Attributes:
        deltas: the input deltas; weights, method, options: how they were combined;
        combined: the single SparseDelta that was added.
    """

    def __init__(self, deltas, weights, method, options, combined: SparseDelta, saved: dict[str, _Saved]):
        self.deltas: list[SparseDelta] = deltas
        self.weights: list[float] = weights
        self.method: str = method
        self.options: dict[str, Any] = options
        self.combined = combined
        self._saved = saved
        self.active = True

    @property
    def nbytes(self) -> int:
        """Memory held to make the revert exact (original values and positions)."""
        return sum(s.original.nbytes + s.indices.nbytes for s in self._saved.values())

    def revert(self, *, force: bool = False) -> None:
        """Restore the base values at every touched position.

        Raises RevertError if already reverted, or if touched values changed since applying (revert later
        handles first; ``force=True`` restores the saved originals anyway).
        """
        if not self.active:
            raise RevertError("these deltas were already reverted; apply them again to use them")
        if not force:
            changed = [
                name
                for name, s in self._saved.items()
                if not torch.equal(_checksum(_gather(s.tensor, s.indices), s.indices), s.checksum)
            ]
            if changed:
                raise RevertError(
                    f"{len(changed)} parameters changed since these deltas were applied (e.g. {changed[:3]}): "
                    "revert deltas applied later first (reverse order of applying), or call revert(force=True) "
                    "to write back the saved base values anyway"
                )
        with torch.no_grad():
            for s in self._saved.values():
                _scatter(s.tensor, s.indices, s.original)
        self._saved = {}
        self.active = False

    def __enter__(self) -> AppliedDeltas:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            self.revert()

    def __repr__(self) -> str:
        state = "active" if self.active else "reverted"
        return (
            f"AppliedDeltas({len(self.deltas)} deltas, weights={self.weights}, method={self.method!r}, "
            f"nnz={self.combined.nnz}, {state})"
        )


def apply_deltas(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    deltas: DeltaSource | Sequence[DeltaSource],
    *,
    weights: Sequence[float] | None = None,
    method: str = "sum",
    method_options: Mapping[str, Any] | None = None,
    force: bool = False,
) -> AppliedDeltas:
    """Add the combination of ``deltas`` to a model's (or state dict's) tensors in place.

    Args:
        model_or_state_dict: a ``torch.nn.Module`` (any device, any floating dtype) or a ``{name: tensor}`` dict.
        deltas: one or more SparseDelta objects, delta folders or files, or Hub ids ``org/name[@rev]``.
        weights: one per delta (default 1.0); negative subtracts.
        method: a combination method (``deltahub.methods.available_methods()``); ``sum`` is task arithmetic.
        method_options: the method's options, e.g. ``{"density": 0.5}`` for ``ties``.
        force: skip the base fingerprint checks (names and shapes are always checked).

    Returns:
        An :class:`AppliedDeltas` handle; ``handle.revert()`` restores the base bit-exactly.

    Example:
        >>> handle = apply_deltas(model, ["./math-delta", "acme/code-delta@v1"], weights=[1.0, 0.5])
        >>> handle.revert()
    """
    inputs = validate_inputs(
        deltas, weights=weights, method=method, method_options=method_options, force=force
    )
    return apply_inputs(model_or_state_dict, inputs)


def apply_inputs(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], inputs: DeltaInputs
) -> AppliedDeltas:
    """:func:`apply_deltas` on inputs already checked by :func:`deltahub.inputs.validate_inputs`."""
    delta_list, weight_list = list(inputs.deltas), list(inputs.weights)
    tensors = _target_tensors(model_or_state_dict)
    check_base(delta_list, tensors, force=inputs.force)
    combined = combine_inputs(inputs)

    # Tied parameters: several names, one tensor. Apply once; two different deltas for one tensor is an error.
    groups = tied_groups((name, tensors[name]) for name in combined)
    check_tied(groups, combined.__getitem__)
    saved: dict[str, _Saved] = {}
    with torch.no_grad():
        for names in groups:
            saved[names[0]] = add_in_place(tensors[names[0]], combined[names[0]])
    return AppliedDeltas(delta_list, weight_list, inputs.method, dict(inputs.options), combined, saved)


def _own_touched_weights(model: nn.Module, names: set[str]) -> None:
    """Give the parameters the deltas touch their own memory before writing to them.

    transformers memory-maps safetensors checkpoints, so a fresh model's weights are copy-on-write views of the
    file: scattered writes then fault one page at a time, about 5x slower than copying each touched tensor once
    (measured in benchmarks/compose.py). Only safe here, where nobody else holds references to these tensors.
    """
    copies: dict[object, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in names and param.device.type == "cpu":
            key = storage_key(param.data) or ("alone", name)
            if key not in copies:
                copies[key] = param.data.clone()
            param.data = copies[key]


def load_model(
    base: str | os.PathLike[str] | None = None,
    deltas: DeltaSource | Sequence[DeltaSource] = (),
    *,
    weights: Sequence[float] | None = None,
    method: str = "sum",
    method_options: Mapping[str, Any] | None = None,
    force: bool = False,
    model_class: Any = None,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Load a transformers model and apply deltas at load time.

    The deltas are read and validated before the base is loaded, so a bad delta fails fast. The returned model
    carries the handle as ``model.applied_deltas`` (call ``model.applied_deltas.revert()`` to get the base back).

    Args:
        base: a local model folder or Hub id for ``from_pretrained``. None: the base the deltas record (its id
            and revision, as ``AutoPeftModelForCausalLM`` does), verified against their fingerprints like any.
        deltas, weights, method, method_options, force: as in :func:`apply_deltas`.
        model_class: the class whose ``from_pretrained`` loads the base (default ``AutoModelForCausalLM``).
        **from_pretrained_kwargs: passed through (``dtype=torch.bfloat16``, ``device_map=...``).

    Example:
        >>> model = load_model("./smollm2", ["./shakespeare-delta"], dtype=torch.bfloat16)
        >>> model = load_model(deltas=["acme/shakespeare-delta@v1"])  # the base it records, from the Hub
    """
    inputs = validate_inputs(
        deltas, weights=weights, method=method, method_options=method_options, force=force, allow_empty=True
    )
    if base is None:
        base, revision = recorded_base(inputs.deltas)
        if revision is not None and from_pretrained_kwargs.setdefault("revision", revision) != revision:
            raise InvalidArgumentError(
                f"revision={from_pretrained_kwargs['revision']!r} conflicts with the revision {revision!r} "
                f"the deltas record for their base {base}; pass base= explicitly"
            )
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    model = model_class.from_pretrained(base, **from_pretrained_kwargs)
    handle = None
    if inputs.deltas:
        _own_touched_weights(model, {name for d in inputs.deltas for name in d})
        handle = apply_inputs(model, inputs)
    model.applied_deltas = handle
    return model


def recorded_base(deltas: Sequence[SparseDelta]) -> tuple[str, str | None]:
    """The base the deltas record (``common_base``'s choice: a Hub id first), for loading it by name.

    Raises:
        ValueError: no delta records a base, or the one recorded is a local path that does not exist here.
    """
    if not deltas:
        raise InvalidArgumentError("load_model needs a base, or deltas that record theirs")
    base = common_base(deltas, force=True)  # which name to load; the fingerprints are checked after loading
    name, revision = base["base_model"], base["base_revision"]
    if not name:
        raise InvalidArgumentError(
            "none of the deltas records its base model; pass base= (a model folder or a Hub id 'org/name')"
        )
    from .identity import is_hub_id

    if not is_hub_id(name) and not os.path.exists(name):
        raise PathNotFoundError(
            f"the deltas record their base as {name!r}, a local path that does not exist here; pass base= (a "
            "model folder or a Hub id 'org/name')"
        )
    return name, revision
