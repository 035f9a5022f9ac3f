"""Extraction: a full fine-tune and its base give a sparse delta (the top-k entries of ``|finetuned - base|``).

Both models are read through :func:`deltahub.checkpoint.as_tensor_source`, one parameter pair at a time, so
extracting from two checkpoint folders never holds more than one parameter of each (plus the kept entries).
Differences are computed in float32; exact zeros are never stored.

Selection is deterministic: entries above the k-th largest magnitude are kept, and ties at that magnitude are
broken by parameter order (names sorted with numbers compared as numbers, so ``layers.2`` precedes
``layers.10``, whatever order the source stores them in) and then by flat position.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ._dtypes import BASE_DTYPES, VALUE_DTYPES, dtype_name, parse_dtype
from .checkpoint import Checkpoint, TensorSource, as_tensor_source
from .delta import ParamDelta, SparseDelta
from .errors import ArgumentTypeError, ExtractionError, InvalidArgumentError
from .fingerprint import tensor_samples
from .identity import model_identity, parse_model_id
from .magnitude_budget import check_budget, entries_for, positions_above, threshold_of

ModelLike = nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike | TensorSource
_FLOATING = frozenset(BASE_DTYPES.values())


def extract_delta(
    base: ModelLike,
    finetuned: ModelLike,
    *,
    density: float | None = None,
    num: int | None = None,
    scope: str = "parameter",
    values_dtype: torch.dtype | str = torch.float32,
    on_mismatch: str = "error",
    include: str | re.Pattern[str] | Callable[[str], bool] | None = None,
    progress: bool = True,
    base_model: str | None = None,
) -> SparseDelta:
    """The sparse delta that best approximates ``finetuned - base`` with a budget of entries.

    Args:
        base, finetuned: each an ``nn.Module``, a state dict, or a folder written by ``save_pretrained``
            (read lazily, tensor by tensor). Tied aliases count once, under their first name.
        density: fraction of entries to keep, in (0, 1]. Give exactly one of ``density`` and ``num``.
        num: number of entries to keep over all parameters.
        scope: ``"parameter"``: each parameter keeps ``round(density * numel)`` entries (with ``num``, its share
            ``floor(num * numel / total)``); ``"global"``: the top entries over all parameters together, found in
            two streaming passes (the first keeps only a running top-k of magnitudes).
        values_dtype: dtype of the stored values (float32, bfloat16 or float16), cast from the float32 difference.
        on_mismatch: ``"error"`` raises :class:`ExtractionError` listing every tensor that is in only one model,
            has different shapes (a resized embedding, say) or is not floating-point and differs; ``"skip"``
            leaves them out and records their names in ``provenance["skipped"]``. Non-floating tensors that are
            equal in both models carry no change and are ignored.
        include: only consider names matching this regex (``re.search``) or for which this callable is true.
        progress: show a progress bar over parameters (hidden anyway when not writing to a terminal).
        base_model: the base's Hub id ``"org/name[@rev]"`` to record. Default: the base's own name: a folder in
            the HF cache becomes its repo id and commit, a module its ``name_or_path`` (and commit), another
            folder its path (which ``push_delta`` leaves out of what it uploads).

    Returns:
        A :class:`SparseDelta` on ``base`` (its ``base_model`` is the base's model id), fingerprinted on the base
        values, with ``provenance = {"method": "extract", "density" or "num", "scope", "finetuned", "skipped"}``.

    Example:
        >>> delta = extract_delta("models/llama-base", "models/llama-sft", density=0.01, scope="global")
        >>> save_delta(delta, "deltas/llama-sft-1pct")
    """
    budget = check_budget(density, num, scope)
    if on_mismatch not in ("error", "skip"):
        raise InvalidArgumentError(f"on_mismatch must be 'error' or 'skip'; got {on_mismatch!r}")
    values_dtype = parse_dtype(values_dtype, allowed=VALUE_DTYPES, what="values_dtype")
    match = _matcher(include)
    base_src, ft_src = as_tensor_source(base), None
    try:
        ft_src = as_tensor_source(finetuned)
        names, skipped = _pair_up(base_src, ft_src, match, on_mismatch)
        sizes = {n: math.prod(base_src.shape(n)) for n in names}
        total = sum(sizes.values())
        if scope == "global":
            k = min(entries_for(budget, total, total), total)
            params, fingerprint = _extract_global(base_src, ft_src, sizes, k, values_dtype, progress)
        else:
            ks = {n: min(entries_for(budget, size, total), size) for n, size in sizes.items()}
            params, fingerprint = _extract(base_src, ft_src, ks, None, values_dtype, progress, "extract")
    finally:
        # Close only what we opened: a Checkpoint passed in belongs to the caller.
        for given, src in ((base, base_src), (finetuned, ft_src)):
            if isinstance(src, Checkpoint) and not isinstance(given, Checkpoint):
                src.close()
    if base_model is not None:
        base_id, base_revision = parse_model_id(base_model)
    else:
        base_id, base_revision = _identity(base, base_src)
    ft_id, ft_revision = _identity(finetuned, ft_src)
    provenance: dict[str, Any] = {
        "method": "extract",
        budget[0]: budget[1],
        "scope": scope,
        "finetuned": f"{ft_id}@{ft_revision}" if ft_id and ft_revision else ft_id,
        "skipped": skipped,
    }
    return SparseDelta(
        params,
        base_model=base_id,
        base_revision=base_revision,
        fingerprint=fingerprint,
        provenance=provenance,
    )


def _identity(given: ModelLike, source: TensorSource) -> tuple[str | None, str | None]:
    """How a model was named: a folder by its path (an HF-cache snapshot by its repo id and commit), a module by
    what ``from_pretrained`` was given; never the ``_name_or_path`` a stranger's config.json may carry."""
    if isinstance(given, (str, os.PathLike)):
        return model_identity(given)
    if isinstance(given, nn.Module):
        config = getattr(given, "config", None)
        return model_identity(
            getattr(given, "name_or_path", None) or None, getattr(config, "_commit_hash", None)
        )
    return source.model_id, None


def _matcher(include: Any) -> Callable[[str], bool]:
    if include is None:
        return lambda name: True
    if isinstance(include, str):
        try:
            include = re.compile(include)
        except re.error as err:
            raise InvalidArgumentError(
                f"include={include!r} is not a valid regular expression: {err}"
            ) from err
    if isinstance(include, re.Pattern):
        return lambda name: include.search(name) is not None
    if callable(include):
        return include
    raise ArgumentTypeError(
        f"include must be a regex string, a compiled pattern or a callable; got {type(include).__name__}"
    )


def natural_key(name: str) -> list[Any]:
    """Sort key comparing digit runs as numbers: ``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _pair_up(
    base: TensorSource, ft: TensorSource, match: Callable[[str], bool], on_mismatch: str
) -> tuple[list[str], list[str]]:
    """The names to extract (in selection order) and those left out, checked from headers before any work."""
    # A TensorSource promises keys(), not iteration.
    base_names = {n for n in base.keys() if match(n)}  # noqa: SIM118
    ft_names = {n for n in ft.keys() if match(n)}  # noqa: SIM118
    names, problems, skipped = [], [], []
    for name in sorted(base_names | ft_names, key=natural_key):
        problem = None
        if name not in ft_names:
            problem = f"{name}: only in the base (shape {list(base.shape(name))})"
        elif name not in base_names:
            problem = f"{name}: only in the fine-tune (shape {list(ft.shape(name))})"
        elif base.shape(name) != ft.shape(name):
            problem = (
                f"{name}: shape {list(base.shape(name))} in the base, {list(ft.shape(name))} in the fine-tune"
            )
        elif base.dtype(name) not in _FLOATING or ft.dtype(name) not in _FLOATING:
            bd, fd = base.dtype(name), ft.dtype(name)
            if bd in _FLOATING or fd in _FLOATING or bd != fd:
                problem = f"{name}: dtype {dtype_name(bd)} in the base, {dtype_name(fd)} in the fine-tune"
            else:
                # Integer buffers are small; only a changed one is a problem, since a delta cannot carry it.
                b = base.get(name)
                if torch.equal(b, ft.get(name).to(b.device)):
                    continue
                problem = f"{name}: non-floating ({dtype_name(bd)}) and changed, which a delta cannot express"
        if problem is None:
            names.append(name)
        else:
            problems.append(problem)
            skipped.append(name)
    if problems and on_mismatch == "error":
        raise ExtractionError(
            f"the base and the fine-tune do not line up on {len(problems)} tensor(s):\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nExtract the rest with on_mismatch='skip' (the names are recorded in provenance['skipped']), or "
            "restrict the parameters with include= (a regex or a callable on names)."
        )
    if not names:
        considered = sorted(base.keys(), key=natural_key)
        raise ExtractionError(
            f"nothing to extract: no floating-point tensor of the base is selected (include matched "
            f"{len(base_names)} of {len(considered)} base tensors, {len(skipped)} skipped); base names look like "
            f"{considered[:3]}"
        )
    return names, skipped


def _abs_diff(base_t: torch.Tensor, ft_t: torch.Tensor) -> torch.Tensor:
    """``|ft - base|`` flattened, in float32, with one float32 allocation (the signed values are recomputed
    later at the kept positions only)."""
    diff = ft_t.reshape(-1).to(device=base_t.device, dtype=torch.float32, copy=True)
    diff.sub_(base_t.reshape(-1))
    return diff.abs_()


def _extract(
    base: TensorSource,
    ft: TensorSource,
    ks: Mapping[str, int],
    cut: tuple[float, int] | None,
    values_dtype: torch.dtype,
    progress: bool,
    desc: str,
) -> tuple[dict[str, ParamDelta], dict[str, tuple[float, ...]]]:
    """One pass keeping, per parameter, its own top ``ks[name]``, or (``cut`` given) the entries above a global
    threshold plus the global budget of ties, in parameter order."""
    params, fingerprint, bad = {}, {}, []
    ties_left = cut[1] if cut else 0
    for name, k in tqdm(ks.items(), desc=desc, unit="tensor", disable=None if progress else True):
        if k <= 0:
            continue  # nothing to keep: do not even read the tensors
        base_t, ft_t = base.get(name), ft.get(name)
        mag = _abs_diff(base_t, ft_t)
        if cut is None:
            if not bool(torch.isfinite(mag).all()):
                bad.append(name)
                continue
            threshold, ties = threshold_of(mag, k)
        else:
            threshold, ties = cut[0], ties_left
        idx = positions_above(mag, threshold, ties)
        if cut is not None and threshold > 0:
            ties_left -= int((mag[idx] == threshold).sum())
        del mag
        if idx.numel() == 0:
            continue
        # Same float32 subtraction as in _abs_diff, so the stored value is exactly the difference selected on.
        vals = ft_t.reshape(-1)[idx.to(ft_t.device)].to(base_t.device, torch.float32)
        vals = (vals - base_t.reshape(-1)[idx].to(torch.float32)).to(values_dtype)
        if not bool(torch.isfinite(vals).all()):
            bad.append(
                f"{name} (a difference overflows {dtype_name(values_dtype)}: use values_dtype=torch.float32)"
            )
            continue
        params[name] = ParamDelta._trusted(idx.cpu(), vals.cpu(), tuple(base_t.shape), base_t.dtype)
        fingerprint[name] = tensor_samples(name, base_t)
    _raise_non_finite(bad)
    return params, fingerprint


def _extract_global(
    base: TensorSource,
    ft: TensorSource,
    sizes: Mapping[str, int],
    k: int,
    values_dtype: torch.dtype,
    progress: bool,
) -> tuple[dict[str, ParamDelta], dict[str, tuple[float, ...]]]:
    """Global top-k in two streaming passes: pass 1 merges each parameter's top-k magnitudes into a running top-k
    (about 2k floats, never all differences) to find the threshold; pass 2 keeps the entries at or above it."""
    if k <= 0:
        return {}, {}
    running = torch.empty(0, dtype=torch.float32)
    bad = []
    for name in tqdm(sizes, desc="extract (1/2)", unit="tensor", disable=None if progress else True):
        mag = _abs_diff(base.get(name), ft.get(name))
        if not bool(torch.isfinite(mag).all()):
            bad.append(name)
            continue
        local = torch.topk(mag, min(k, mag.numel()), sorted=False).values.cpu()
        del mag
        merged = torch.cat([running, local])
        running = torch.topk(merged, min(k, merged.numel()), sorted=False).values
    _raise_non_finite(bad)
    # k never exceeds the total, so the running top-k is full and its minimum is the k-th largest magnitude.
    threshold = running.min()
    cut = (float(threshold), k - int((running > threshold).sum()))
    return _extract(base, ft, dict.fromkeys(sizes, k), cut, values_dtype, progress, "extract (2/2)")


def _raise_non_finite(bad: list[str]) -> None:
    if bad:
        raise ExtractionError(
            f"{len(bad)} parameter(s) have NaN or infinite differences, which a delta cannot store: {bad}. "
            "Check the fine-tune's weights (a diverged run?), or leave them out with include="
        )
