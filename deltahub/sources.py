"""Turning what users pass as "a delta" (an object, a folder, a file) into a ``SparseDelta``."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path

from .delta import SparseDelta
from .errors import ArgumentTypeError, HubRepoNotFoundError, InvalidArgumentError, PathNotFoundError

DeltaSource = SparseDelta | str | os.PathLike


def resolve_delta(source: DeltaSource) -> SparseDelta:
    """Load ``source`` unless it already is a SparseDelta.

    Accepts a delta folder, a lone ``.safetensors`` delta file, or a Hub reference ``"org/name"`` /
    ``"org/name@revision"`` (branch, tag or commit sha) when no local path of that name exists. Hub deltas are
    pulled through the Hugging Face cache (see :func:`deltahub.hub.pull_delta`; ``HF_HUB_OFFLINE=1`` serves the
    cache) and carry ``origin={"repo_id", "revision", "commit", "path"}``.
    """
    if isinstance(source, SparseDelta):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.exists():
            # The format module imports the type; import lazily to keep this light.
            from .format import load_delta

            return load_delta(path)
        # A local path wins over a Hub id of the same spelling, so an existing folder "org/name" is never
        # shadowed by a download.
        from .hub import is_delta_ref, load_hub_delta

        if isinstance(source, str) and is_delta_ref(source):
            try:
                return load_hub_delta(source)
            except HubRepoNotFoundError as err:
                raise HubRepoNotFoundError(
                    f"{err} (no local path {source!r} exists either)",
                    repo_id=err.repo_id,
                    revision=err.revision,
                ) from err
        raise PathNotFoundError(
            f"no delta at {str(source)!r}: expected a folder with delta.safetensors (or shards) and "
            "delta_config.json, a single .safetensors delta file, or a Hub repo id like 'org/name' or "
            "'org/name@revision'"
        )
    raise ArgumentTypeError(f"a delta must be a SparseDelta, a path or a Hub repo id; got {type(source).__name__}")


def check_weights(count: int, weights: Sequence[float] | float | None) -> list[float]:
    """One finite float weight per delta (default 1.0 each); ValueError listing every problem otherwise."""
    if weights is None:
        return [1.0] * count
    if isinstance(weights, numbers.Real):
        weights = [weights]
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


def resolve_deltas(
    deltas: DeltaSource | Sequence[DeltaSource], weights: Sequence[float] | None
) -> tuple[list[SparseDelta], list[float]]:
    """Normalise ``deltas`` (one or many) and their ``weights`` (default 1.0 each), checking they pair up
    before anything is loaded."""
    if isinstance(deltas, (SparseDelta, str, os.PathLike)):
        deltas = [deltas]
    deltas = list(deltas)
    weights = check_weights(len(deltas), weights)
    return [resolve_delta(d) for d in deltas], weights


def describe(delta: SparseDelta, position: int) -> str:
    """A short name for a delta in messages: where it came from, else its position."""
    where = delta.origin.get("repo_id") or delta.origin.get("path")
    return f"delta {position} ({where})" if where else f"delta {position}"
