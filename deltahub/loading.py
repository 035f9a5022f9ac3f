"""``deltahub.load_delta``: the one loader. A local folder or file, else the Hugging Face cache, else the Hub.

Every entry that takes a delta by name goes through it, so ``./math-delta``, ``acme/math-delta``,
``acme/math-delta@v1`` and ``acme/math-delta@<commit>`` work everywhere alike. (``deltahub.format.load_delta``
is the file reader underneath: local paths only.)
"""

from __future__ import annotations

import os
from pathlib import Path

from .delta import SparseDelta
from .errors import (
    ArgumentTypeError,
    HubRepoNotFoundError,
    InvalidArgumentError,
    NotADeltaError,
    PathNotFoundError,
    UnconvertedAdapterError,
)
from .hub_ids import COMMIT_SHA


def load_delta(
    ref: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    endpoint: str | None = None,
) -> SparseDelta:
    """Load a delta by path or Hub id.

    Resolution order:

    1. A local path that exists: a delta folder, or one ``.safetensors`` file of a delta. (A local path always
       wins over a Hub id of the same spelling.)
    2. A Hub id ``org/name``, ``org/name@revision`` or with ``revision=``: a pinned commit sha already in the
       Hugging Face cache is served from it without any request; a branch or tag is asked of the Hub (one
       request) and its files come from the cache when they are there. Offline (``HF_HUB_OFFLINE=1`` or
       ``local_files_only=True``), or with the Hub unreachable, the cached copy of that revision is used,
       as ``from_pretrained`` does.

    Args:
        ref: a path, or a Hub id with an optional ``@revision`` (a branch, tag or commit sha).
        revision: the revision, instead of ``@revision`` (giving two different ones is an error).
        cache_dir, token, local_files_only, endpoint: as in :func:`deltahub.hub.pull_delta`.

    Returns:
        The :class:`~deltahub.SparseDelta`. Its ``origin`` says where it came from: ``{"path"}`` for a local
        one; ``{"repo_id", "revision", "commit", "path"}`` for a Hub one (``commit`` pins it exactly).

    Raises:
        DeltaFormatError: the files break the format.
        UnconvertedAdapterError: the path or repo holds an adapter of the SFT fork, a peft LoRA or a
            composable-sft diff; the message gives the ``deltahub convert`` command that makes it a delta.
        FileNotFoundError: neither a local path nor a Hub id.
        HubError (and subclasses): the Hub refused or could not be reached, and no cached copy exists.

    Example:
        >>> load_delta("acme/math-delta@v1").origin["commit"]
        '3f2a...'
    """
    from .convert.detect import unconverted_error
    from .format import load_delta as read_delta
    from .hub import is_delta_ref, parse_delta_ref

    if not isinstance(ref, (str, os.PathLike)):
        raise ArgumentTypeError(
            f"load_delta takes a path or a Hub id 'org/name[@rev]'; got {type(ref).__name__}"
        )
    path = Path(ref)
    if path.exists():
        if revision is not None:
            raise InvalidArgumentError(
                f"revision={revision!r} was given for the local path {os.fspath(ref)!r}"
            )
        problem = unconverted_error(path)
        if problem is not None:
            raise problem
        return read_delta(path)
    if not (isinstance(ref, str) and is_delta_ref(ref)):
        raise PathNotFoundError(
            f"no delta at {os.fspath(ref)!r}: expected a folder with delta.safetensors (or shards) and "
            "delta_config.json, a single .safetensors delta file, or a Hub repo id like 'org/name' or "
            "'org/name@revision'"
        )
    repo_id, ref_revision = parse_delta_ref(ref)
    if revision is not None and ref_revision is not None and revision != ref_revision:
        raise InvalidArgumentError(
            f"two revisions for {repo_id}: {ref_revision!r} in {ref!r} and revision={revision!r}"
        )
    rev = revision or ref_revision
    try:
        return _from_hub(repo_id, rev, cache_dir, token, local_files_only, endpoint)
    except HubRepoNotFoundError as err:
        raise HubRepoNotFoundError(
            f"{err} (no local path {ref!r} exists either)", repo_id=err.repo_id, revision=err.revision
        ) from err
    except NotADeltaError as err:
        adapter = _hub_adapter_error(repo_id, rev, token, endpoint, local_files_only)
        if adapter is not None:
            raise adapter from err
        raise


def _from_hub(repo_id, revision, cache_dir, token, local_files_only, endpoint) -> SparseDelta:
    from huggingface_hub import try_to_load_from_cache

    from .format.spec import CONFIG_FILE
    from .hub import _snapshot

    if revision is not None and COMMIT_SHA.fullmatch(revision) and not local_files_only:
        # A commit never changes: when the cache has it, asking the Hub again would only cost a round trip.
        cached = try_to_load_from_cache(repo_id, CONFIG_FILE, cache_dir=cache_dir, revision=revision)
        if isinstance(cached, str):
            local_files_only = True
    _, delta = _snapshot(
        repo_id,
        revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        endpoint=endpoint,
    )
    return delta


def _hub_adapter_error(
    repo_id, revision, token, endpoint, local_files_only
) -> UnconvertedAdapterError | None:
    """When a Hub repo that is not a delta holds an adapter ``deltahub convert`` reads, say so (one request;
    nothing when offline or when the request fails: the NotADeltaError stands)."""
    from huggingface_hub import HfApi, constants

    from .convert.detect import ADAPTER_CONFIG, COMPOSABLE_FILE, convert_hint

    if local_files_only or constants.HF_HUB_OFFLINE:
        return None
    try:
        files = set(HfApi(endpoint=endpoint, token=token).list_repo_files(repo_id, revision=revision))
    except Exception:
        return None
    ref = repo_id + (f"@{revision}" if revision else "")
    if ADAPTER_CONFIG in files:
        what = f"{repo_id} holds a peft adapter ({ADAPTER_CONFIG})"
    elif COMPOSABLE_FILE in files:
        what = f"{repo_id} holds a composable-sft diff ({COMPOSABLE_FILE})"
    else:
        return None
    return UnconvertedAdapterError(f"{what}, not a deltahub delta: {convert_hint(ref)}")
