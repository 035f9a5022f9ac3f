"""The deployment merge: a base checkpoint plus sparse deltas, streamed into a standard model folder.

``merge(base, deltas, out=...)`` writes what ``transformers``, vLLM and friends load with no deltahub installed:
sharded safetensors with ``model.safetensors.index.json`` (or one ``model.safetensors``), the base's config,
generation config, tokenizer and chat template, and a ``README.md`` model card recording the base and every delta.

How it streams (see ``docs/merge.md``):

* Everything is validated before the first byte is written: deltas are loaded (they are small), the base is
  read from its safetensors headers only (names, shapes, dtypes, byte ranges), and the fingerprint check reads
  just the 8 sampled elements per touched parameter.
* The output layout is planned up front from header sizes, so the shard count, every shard's header and the index
  are known before writing; each shard is then written front to back, one tensor at a time.
* Every tensor kept in its dtype is copied file to file inside the kernel (``os.copy_file_range``, what ``cp``
  uses), never entering this process. For a touched one the deltas' combined entries for that tensor alone are
  then added in place through a shared map of just its pages in the output file, with
  :func:`deltahub.apply.add_in_place` (the one definition of the arithmetic, so the weights are bit-identical to
  :func:`deltahub.load_model`), and the map is closed before the next tensor. A tensor cast to another dtype is
  read with ``pread`` into a scratch buffer, cast, patched and written. No memory map of the base: pages of a
  mapped file count in the process's RSS until unmapped, so mapping a 14 GB base would report 14 GB.
* Combining a tensor's entries (a sort of their union) runs in a worker thread a few tensors ahead of the
  writer, overlapping the CPU work with the copies.
* Peak memory is about the loaded deltas plus the pages of the largest touched tensor (and its cast copy with
  ``dtype``), independent of model size.
* The folder is written under a hidden temporary sibling (``.NAME.merge-PID-XXXX``) and renamed into place at the
  end; a failure removes it, and one left by a killed run is removed by the next merge into the same place.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._atomic import check_output
from .._dtypes import dtype_name
from ..basecheck import check_base, common_base
from ..errors import InvalidArgumentError, OutOfSpaceError
from ..format.spec import parse_size
from ..inputs import DeltaSource, check_arguments, describe, load_inputs
from .base import BaseFiles, resolve_model
from .card import model_card
from .config import DeltaEntry, MergeConfig
from .plan import DeltaInfo, MergePlan, MergeResult, TensorPlan, shard_layout
from .write import combined, write_folder, write_shards

if TYPE_CHECKING:  # torch is imported inside merge() only when the fast path does not apply
    import torch

    from ..delta import SparseDelta

__all__ = [
    "DeltaEntry",
    "MergeConfig",
    "MergePlan",
    "MergeResult",
    "OutOfSpaceError",
    "merge",
    "model_card",
    "resolve_model",
]

# --------------------------------------------------------------------------------------------------------------
# The function


def merge(
    base: str | os.PathLike | None = None,
    deltas: DeltaSource | Sequence[DeltaSource] = (),
    *,
    out: str | os.PathLike,
    weights: Sequence[float] | None = None,
    method: str = "sum",
    method_options: Mapping[str, Any] | None = None,
    force: bool = False,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = True,
) -> MergeResult:
    """Merge sparse deltas into a base checkpoint and write a standard transformers model folder, streaming.

    The result equals ``load_model(base, deltas, weights=..., method=..., dtype=dtype)`` weight for weight (same
    float32 arithmetic, rounded once), so plain ``AutoModelForCausalLM.from_pretrained(out)`` gives the same
    logits. Tensors no delta touches are copied byte for byte.

    Args:
        base: a local model folder (safetensors) or a Hub id ``org/name[@revision]``; None: the base the deltas
            record (its id and revision), checked against their fingerprints like any other.
        deltas: delta folders, files, Hub ids (``org/name@revision``) or SparseDelta objects.
        out: the folder to create (refused if it exists and is not empty, unless ``overwrite``).
        weights: one per delta (default 1.0); negative subtracts.
        method, method_options: the combination method and its options (``{"density": 0.3}`` for ties).
        dtype: output dtype of floating tensors (float32, bfloat16, float16); default: the base's. The base is
            cast first and the deltas added in that dtype, as ``load_model(..., dtype=...)`` does.
        max_shard_size: bytes per output file, an int or a string like ``"5GB"`` or ``"2GiB"``.
        force: skip the base fingerprint checks, between the deltas and against the base (names and shapes are
            always checked).
        overwrite: replace an existing ``out`` (swapped in only once the new folder is complete).
        dry_run: validate and plan, write nothing; the result's ``out`` is None.
        progress: show a progress bar (hidden anyway when not writing to a terminal).

    Returns:
        A :class:`MergeResult` with the :class:`MergePlan` (``str(plan)`` is the dry-run report).

    Raises:
        DeltaFormatError, BaseMismatchError, CheckpointError, UnknownMethodError, MethodOptionError, ValueError,
        DeltaExistsError (``out`` exists), OutOfSpaceError: all but the last before anything is written.

    Example:
        >>> merge("meta-llama/Llama-3.2-1B@main", ["./math-delta", "./code-delta"], weights=[1.0, 0.5],
        ...       out="./llama-math-code", dtype="bfloat16")
    """
    if dtype is None:
        out_dtype = None
    else:
        from .._dtypes import VALUE_DTYPES, parse_dtype

        out_dtype = parse_dtype(dtype, allowed=VALUE_DTYPES, what="dtype")
    max_bytes = parse_size(max_shard_size)
    out = check_output(out, overwrite=overwrite, keyword="out")
    # Every argument checked before anything is loaded, and without torch: the fast path needs none.
    args = check_arguments(deltas, weights=weights, method=method, method_options=method_options, force=force)
    from .fast import eligible, fast_merge

    if base is not None and eligible(args.method, out_dtype, dry_run, args.items):
        result = fast_merge(
            base,
            list(args.items),
            list(args.weights),
            out=out,
            method=args.method,
            options=dict(args.options),
            max_bytes=max_bytes,
            max_shard_size=max_shard_size,
            force=force,
            overwrite=overwrite,
            progress=progress,
        )
        if result is not None:
            return result
    inputs = load_inputs(args)
    delta_list, weight_list, options = list(inputs.deltas), list(inputs.weights), dict(inputs.options)
    method = inputs.method
    shared = common_base(delta_list, force=force)
    if base is None:
        from ..apply import recorded_base

        name, revision = recorded_base(delta_list)
        base = name if revision is None or os.path.exists(name) else f"{name}@{revision}"
    base_folder, base_id, base_revision = resolve_model(base)
    base_files = BaseFiles(base_folder)
    try:
        _check_out(out, base_folder)
        wanted = list(dict.fromkeys(n for d in delta_list for n in d))
        base_files.resolve_aliases(wanted)
        check_base(delta_list, base_files, force=force)
        users: dict[str, list[str]] = {}
        for n in wanted:
            users.setdefault(base_files.aliases.get(n, n), []).append(n)
        _check_tied(users, delta_list, weight_list, method, options)
        tensors, shards = shard_layout(base_files, out_dtype, max_bytes, users)
        base_id = _base_name(base, base_id, base_files.config)
        plan = _plan(base_id, base_revision, delta_list, weight_list, method, options, out_dtype, tensors, shards,
                     out, max_shard_size)  # fmt: skip
        if dry_run:
            if len(delta_list) > 1:
                from ..overlap import overlap_inputs

                plan.overlap = overlap_inputs(inputs)
            return MergeResult(plan, None)
        nnz = write_folder(
            plan,
            base_folder,
            base_files.config,
            overwrite,
            _card(plan, base_id, base_revision, shared, force, delta_list),
            lambda tmp: write_shards(base_files, plan, tmp, delta_list, weight_list, progress),
        )
    finally:
        base_files.close()
    return MergeResult(plan, out, nnz)


def _base_name(base: object, base_id: str, config: Mapping[str, Any] | None) -> str:
    """What the merged model names as its base: the Hub id, or for a local folder the id its config records."""
    if base_id == str(base) and config and config.get("_name_or_path"):
        return config["_name_or_path"]
    return base_id


def _plan(
    base_id: str,
    base_revision: str | None,
    deltas: Sequence[Any],
    weights: Sequence[float],
    method: str,
    options: Mapping[str, Any],
    dtype: torch.dtype | None,
    tensors: list[TensorPlan],
    shards: dict[str, int],
    out: Path,
    max_shard_size: int | str,
) -> MergePlan:
    """The merge's plan and its merge.yaml (both paths; ``deltas`` SparseDelta or the fast path's RawDelta)."""
    plan = MergePlan(
        base=base_id,
        base_revision=base_revision,
        deltas=[_delta_info(d, i, w) for i, (d, w) in enumerate(zip(deltas, weights, strict=True))],
        method=method,
        options=dict(options),
        dtype=dtype,
        tensors=tensors,
        shards=shards,
        out=out,
    )
    plan.config = _config(plan, max_shard_size)
    return plan


def _card(
    plan: MergePlan,
    base_id: str,
    base_revision: str | None,
    shared: Mapping[str, Any],
    force: bool,
    deltas: Sequence[Any],
) -> str:
    """The merged folder's README.md (both paths write the same)."""
    hub_deltas = [d.origin["repo_id"] for d in deltas if d.origin.get("repo_id")]
    return model_card(plan, hub_base=_hub_base(base_id, base_revision, shared, force), hub_deltas=hub_deltas)


def _hub_base(base_id: str, base_revision: str | None, shared: Mapping[str, Any], force: bool) -> str | None:
    """The base's Hub id for the card: its own when it came from the Hub (or its cache), else the one the deltas
    record, which the fingerprint check just confirmed (not under ``force``). None when neither is known."""
    from ..identity import is_hub_id

    if base_revision is not None and is_hub_id(base_id):
        return base_id
    recorded = shared.get("base_model")
    return recorded if not force and is_hub_id(recorded) else None


def _check_out(out: Path, base_folder: Path) -> None:
    """Refuse an ``out`` that is the base or holds it: replacing it would destroy the weights being read."""
    o, b = out.resolve(), base_folder.resolve()
    if o == b or o in b.parents:
        raise InvalidArgumentError(
            f"`out` {out} is (or contains) the base model folder {base_folder}; choose another folder"
        )


def _check_tied(
    users: Mapping[str, list[str]],
    deltas: Sequence[SparseDelta],
    weights: Sequence[float],
    method: str,
    options: Mapping[str, Any],
) -> None:
    """A tied tensor changed under two names must get the same change from both (as apply_deltas requires)."""
    from .._tensors import check_tied

    for stored, names in users.items():
        check_tied([names], lambda n: combined(n, deltas, weights, method, options), where=f" ({stored})")


def _config(plan: MergePlan, max_shard_size: int | str) -> MergeConfig:
    """The merge.yaml of this merge, revisions pinned to what was resolved (the base's commit for a Hub base)."""
    return MergeConfig(
        base=plan.base + (f"@{plan.base_revision}" if plan.base_revision else ""),
        deltas=tuple(DeltaEntry(d.source, d.weight, d.revision) for d in plan.deltas),
        method=plan.method,
        options=dict(plan.options),
        dtype=dtype_name(plan.dtype) if plan.dtype is not None else None,
        max_shard_size=max_shard_size,
    )


def _delta_info(delta: SparseDelta, position: int, weight: float) -> DeltaInfo:
    origin = delta.origin
    source = origin.get("repo_id") or origin.get("path") or describe(delta, position)
    revision = origin.get("commit") or origin.get("revision") or None
    return DeltaInfo(str(source), revision, weight, len(delta), delta.nnz)
