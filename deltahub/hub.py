"""Sharing deltas on the Hugging Face Hub (or any Hub-compatible server): ``push_delta`` / ``pull_delta``.

Both go through the real ``huggingface_hub`` client, so tokens, the cache, ``HF_ENDPOINT`` and offline mode
(``HF_HUB_OFFLINE=1``) behave exactly as they do for ``from_pretrained``. Only a delta's own files travel:
safetensors shards (+ index), ``delta_config.json`` and the ``README.md`` card; never a pickle, never stray files.
Client errors are turned into one-line :class:`~deltahub.errors.HubError` subclasses naming the repo, the
revision and the fix (:mod:`deltahub.hub_errors`); tokens never appear in them.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from ._atomic import atomic_folder, check_output
from ._hub_guard import check_revision, guarded, resolve_commit
from ._version import __version__
from .card import model_card
from .delta import SparseDelta
from .errors import (
    ArgumentTypeError,
    DeltaFormatError,
    HubError,
    InvalidArgumentError,
    NotADeltaError,
    PathNotFoundError,
)
from .format import load_delta, save_delta
from .format.spec import CARD_FILE, CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from .hub_errors import hub_endpoint, hub_errors
from .hub_ids import COMMIT_SHA, check_repo_id, is_ref, parse_ref
from .publish import check_no_local_paths, existing_card_metadata, scrub_for_upload

# What a delta repo may hold that deltahub reads or writes. Shards follow `spec.SHARD_PATTERN`.
DELTA_FILE_PATTERNS = [CONFIG_FILE, SINGLE_FILE, INDEX_FILE, "delta-*-of-*.safetensors", CARD_FILE]


@dataclass(frozen=True)
class PushResult:
    """What :func:`push_delta` committed.

    Attributes:
        repo_id: the repo pushed to.
        revision: the branch committed to (``"main"`` unless one was given).
        sha: the new commit's sha (with ``create_pr``, the commit on the pull request's ref).
        url: the commit's URL.
        pr_url: the pull request's URL when ``create_pr=True``, else None.
        notes: one line per thing left out of the pushed files (a local path as the base, say).
    """

    repo_id: str
    revision: str
    sha: str
    url: str
    pr_url: str | None = None
    notes: tuple[str, ...] = ()


# The Hub's naming rules live in hub_ids; these two names are the public spelling of its helpers.
parse_delta_ref = parse_ref
is_delta_ref = is_ref


def _is_delta_file(path_in_repo: str) -> bool:
    # Top-level files only: fnmatch's '*' also matches '/', so "sub/delta-1-of-2.safetensors" must be excluded.
    return "/" not in path_in_repo and any(fnmatch.fnmatchcase(path_in_repo, p) for p in DELTA_FILE_PATTERNS)


# ---- push ---------------------------------------------------------------------------------------------------------


def _delta_files(folder: Path) -> list[str]:
    """The files of a validated delta folder that make up the delta (the card is handled separately)."""
    if (folder / INDEX_FILE).is_file():
        index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        shards = sorted(set(index["weight_map"].values()))
        return [CONFIG_FILE, INDEX_FILE, *shards]
    return [CONFIG_FILE, SINGLE_FILE]


def _own_card(folder: Path, original: SparseDelta, license: str | None) -> bytes | None:
    """The folder's README when the user wrote it (pushed as is), else None (push generates the card).

    A README equal to what :func:`save_delta` generated says ``deltas=['path/to/this-delta']``; the pushed one
    should say ``deltas=['org/name']`` instead, name the base by id and carry the Hub card's metadata over. A
    hand-edited README is the author's and is kept as is, unless ``license`` asks for a regenerated one.
    """
    card = folder / CARD_FILE
    if license is None and card.is_file():
        text = card.read_text(encoding="utf-8")
        if text != model_card(original):
            return text.encode("utf-8")
    return None


def _ensure_branch(api, repo_id: str, branch: str) -> None:
    refs = api.list_repo_refs(repo_id)
    if branch in {b.name for b in refs.branches}:
        return
    if branch in {t.name for t in refs.tags}:
        raise InvalidArgumentError(
            f"cannot push to {repo_id}@{branch}: {branch!r} is a tag; commits go to a branch (pass another "
            "`revision`, then tag the new commit)"
        )
    api.create_branch(repo_id, branch=branch)  # from main, as `git switch -c` would from the default branch


def push_delta(
    delta_or_folder: SparseDelta | str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    token: str | bool | None = None,
    endpoint: str | None = None,
    license: str | None = None,
    base_model: str | None = None,
    keep_card_metadata: bool = True,
) -> PushResult:
    """Upload a delta to a Hub repo in one commit, creating the repo (and the branch) if needed.

    The delta is validated before anything is sent. Only its own files are uploaded (``delta_config.json``,
    ``delta.safetensors`` or the shards and their index, ``README.md``); delta files of an earlier push that
    the new delta does not have (old shards) are deleted in the same commit, so the revision always holds
    exactly one delta.

    Args:
        delta_or_folder: a :class:`~deltahub.SparseDelta` (saved to a temporary folder first) or a delta folder.
        repo_id: ``"namespace/name"``.
        private: visibility of a repo this call creates. ``True`` also refuses to push into an existing
            public repo (make it private on the Hub first); ``None``/``False`` leave an existing repo as it is.
        revision: the branch to commit to (default ``main``); created from ``main`` when it does not exist.
        commit_message: the commit's title (default: a summary of the delta).
        create_pr: open a pull request with the commit instead of committing to the branch.
        token: a Hub token; ``None`` uses huggingface_hub's lookup (``HF_TOKEN``, ``hf auth login``).
        endpoint: the Hub URL; ``None`` uses ``HF_ENDPOINT`` (default ``https://huggingface.co``).
        license: a license id for the card's metadata (regenerates a hand-written card).
        base_model: the base's Hub id ``"org/name[@rev]"``, recorded in every pushed file instead of what the
            delta records (a local path, say).
        keep_card_metadata: carry over metadata the card already on the Hub has (license, extra tags,
            datasets...) into the regenerated card; ``license``, ``base_model`` and deltahub's tags still win.

    No local filesystem path is ever uploaded: a ``base_model`` that is a local path is replaced by
    ``base_model=``, an HF-cache snapshot path by its repo id and commit, else dropped; local paths in the
    provenance are dropped too. Each drop is one line in ``PushResult.notes`` (and a warning).

    Returns:
        A :class:`PushResult` with the commit's ``sha`` and ``url``, and ``notes``.

    Raises:
        DeltaFormatError: the folder is not a valid delta (nothing was uploaded).
        HubAuthError, HubRepoNotFoundError, HubRevisionNotFoundError, HubConnectionError, HubError: the Hub
            refused or could not be reached; the message names the repo, the revision and the fix.

    Example:
        >>> push_delta("./math-delta", "acme/math-delta", private=True).url
        'https://huggingface.co/acme/math-delta/commit/...'
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    check_repo_id(repo_id)
    branch = revision or "main"
    if COMMIT_SHA.fullmatch(branch):
        raise InvalidArgumentError(
            f"cannot push to {repo_id}@{branch}: a commit sha is not a branch; pass a branch name"
        )
    with tempfile.TemporaryDirectory(prefix="deltahub-push-") as tmp:
        if isinstance(delta_or_folder, SparseDelta):
            delta = delta_or_folder
            folder = save_delta(delta, Path(tmp) / "delta")
        elif isinstance(delta_or_folder, (str, os.PathLike)):
            folder = Path(delta_or_folder)
            if not folder.is_dir():
                raise PathNotFoundError(
                    f"no delta folder at {os.fspath(delta_or_folder)!r}: push_delta takes a folder written by "
                    "save_delta, or a SparseDelta"
                )
            from .convert.detect import unconverted_error

            problem = unconverted_error(folder)
            if problem is not None:
                raise problem  # an adapter of another tool: say `deltahub convert`, not "no delta_config.json"
            delta = load_delta(folder)  # validate before anything leaves the machine
        else:
            raise ArgumentTypeError(
                f"push_delta takes a SparseDelta or a folder; got {type(delta_or_folder).__name__}"
            )
        outgoing = scrub_for_upload(delta, folder, Path(tmp), base_model=base_model)
        for note in outgoing.notes:
            warnings.warn(f"push to {repo_id}: {note}", UserWarning, stacklevel=2)
        files = _delta_files(outgoing.folder)
        own_card = _own_card(folder, delta, license)
        folder = outgoing.folder
        # Before anything is sent: the files as they will be uploaded hold no local path.
        check_no_local_paths(
            {**({CARD_FILE: own_card} if own_card is not None else {}), **{n: folder / n for n in files}},
            outgoing.local_paths,
        )
        message = commit_message or (
            f"Upload sparse delta ({len(delta)} parameters, {delta.nnz:,} nonzeros) with deltahub {__version__}"
        )

        api = HfApi(endpoint=endpoint, token=token, library_name="deltahub", library_version=__version__)
        with hub_errors("push", repo_id, branch, endpoint, token):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None and not branch.startswith("refs/pr/"):
                _ensure_branch(api, repo_id, branch)
            info = api.model_info(repo_id, revision=branch)
            if private and not info.private:
                raise HubError(
                    f"cannot push to {repo_id}@{branch} as private: the repo exists and is public; make it "
                    "private on the Hub first, or push without private=True",
                    repo_id=repo_id,
                    revision=branch,
                )
            if own_card is not None:
                card = own_card
            else:
                metadata = existing_card_metadata(info) if keep_card_metadata else {}
                card = model_card(
                    outgoing.delta, location=repo_id, license=license, metadata=metadata
                ).encode()
            keep = {*files, CARD_FILE}
            ops: list = [
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=folder / name) for name in files
            ]
            ops.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card))
            ops += [
                CommitOperationDelete(path_in_repo=s.rfilename)
                for s in info.siblings or []
                if _is_delta_file(s.rfilename) and s.rfilename not in keep
            ]
            commit = api.create_commit(
                repo_id,
                ops,
                commit_message=message,
                revision=branch,
                create_pr=create_pr,
                parent_commit=info.sha,  # refuse, rather than silently mix, if someone pushed meanwhile
            )
    return PushResult(
        repo_id=repo_id,
        revision=commit.pr_revision or branch,
        sha=commit.oid,
        url=commit.commit_url,
        pr_url=commit.pr_url,
        notes=tuple(outgoing.notes),
    )


# ---- pull ---------------------------------------------------------------------------------------------------------


def fetch_snapshot(
    repo_id: str,
    revision: str | None,
    *,
    allow_patterns: list[str],
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    endpoint: str | None = None,
    action: str = "pull",
) -> tuple[Path, str]:
    """Download (or find in the HF cache) the files of ``repo_id@revision`` matching ``allow_patterns``, trusting
    the Hub with nothing that names a path: the revision is resolved to a commit first and must be 40 hex digits,
    and every answer is checked and every wait bounded while huggingface_hub downloads (see ``_hub_guard``).

    Returns:
        ``(snapshot folder, commit)``; the folder is ``.../snapshots/<commit>``.

    Raises:
        HubError (and subclasses): one line naming ``repo_id@revision``; never the server's text unfiltered.
    """
    from huggingface_hub import HfApi, ResolvedRevision, constants, snapshot_download

    check_repo_id(repo_id)
    check_revision(revision)
    rev = revision or "main"
    api = HfApi(endpoint=endpoint, token=token, library_name="deltahub", library_version=__version__)
    with hub_errors(action, repo_id, rev, endpoint, token), guarded(hub_endpoint(endpoint)):
        # The commit first, checked to be a sha: huggingface_hub would otherwise name cache folders after
        # whatever the server calls it ("../../x" included).
        commit = resolve_commit(
            api,
            repo_id,
            revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only or constants.HF_HUB_OFFLINE,
            token=token,
        )
        folder = Path(
            snapshot_download(
                repo_id,
                revision=ResolvedRevision(commit, initial=revision, repo_id=repo_id),
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
                endpoint=endpoint,
                allow_patterns=allow_patterns,
                library_name="deltahub",
                library_version=__version__,
            )
        )
    if folder.name != commit or folder.parent.name != "snapshots":
        raise HubError(
            f"cannot {action} {repo_id}@{rev}: the files came back in {folder}, not in the cache snapshot of "
            f"commit {commit}",
            repo_id=repo_id,
            revision=rev,
        )
    return folder, commit


def _snapshot(
    repo_id: str,
    revision: str | None,
    *,
    cache_dir: str | os.PathLike[str] | None,
    token: str | bool | None,
    local_files_only: bool,
    endpoint: str | None,
) -> tuple[Path, SparseDelta]:
    """Download (or find in the cache) the delta's files and load them, with ``origin`` recorded."""
    folder, commit = fetch_snapshot(
        repo_id,
        revision,
        allow_patterns=DELTA_FILE_PATTERNS,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        endpoint=endpoint,
    )
    rev = revision or "main"
    where = f"{repo_id}@{rev}"
    if not (folder / CONFIG_FILE).is_file():
        raise NotADeltaError(
            f"{where} is not a deltahub delta: it has no {CONFIG_FILE}; check the repo id and revision (a "
            "model repo is loaded with from_pretrained, not as a delta)",
            repo_id=repo_id,
            revision=rev,
        )
    try:
        delta = load_delta(folder)
    except DeltaFormatError as err:
        # Name the repo rather than only the cache folder: that is what the user typed and can report.
        source = f"{where} (commit {commit}, cached at {folder})"
        raise DeltaFormatError(source, err.problems) from None
    delta.origin = {"repo_id": repo_id, "revision": rev, "commit": commit, "path": str(folder)}
    return folder, delta


def _copy_out(folder: Path, out: Path, overwrite: bool) -> Path:
    """Copy the snapshot's delta files (real bytes, not cache symlinks) to ``out``, atomically."""
    with atomic_folder(out, overwrite=overwrite) as tmp:
        for path in sorted(folder.iterdir()):
            if path.is_file() and _is_delta_file(path.name):
                shutil.copyfile(path, tmp / path.name)
    return out


def pull_delta(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    endpoint: str | None = None,
    local_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Download a delta's files (only those) into the Hugging Face cache, validate it, return its folder.

    Offline mode (``HF_HUB_OFFLINE=1``) and ``local_files_only=True`` serve the cached copy without any
    request; an unreachable Hub also falls back to the cache, as ``from_pretrained`` does.

    Args:
        repo_id: ``"namespace/name"`` (use :func:`parse_delta_ref` for ``"namespace/name@revision"``).
        revision: a branch, tag or commit sha (default ``main``).
        cache_dir: the cache root (default: huggingface_hub's, ``HF_HUB_CACHE``).
        token: a Hub token; ``None`` uses huggingface_hub's lookup (``HF_TOKEN``, ``hf auth login``).
        local_files_only: never touch the network.
        endpoint: the Hub URL; ``None`` uses ``HF_ENDPOINT``.
        local_dir: also copy the delta's files into this folder (atomically: it appears complete or not at
            all) and return it instead of the cache folder.
        overwrite: replace a non-empty ``local_dir``.

    Returns:
        The delta folder: the cache snapshot (``.../snapshots/<commit sha>``), or ``local_dir``.

    Raises:
        NotADeltaError: the repo has no ``delta_config.json`` at that revision.
        DeltaFormatError: the files are there but break the format.
        HubAuthError, HubRepoNotFoundError, HubRevisionNotFoundError, HubConnectionError, HubError: see the
            message; it names the repo, the revision and the fix.
        DeltaExistsError: ``local_dir`` is not empty and ``overwrite`` is False.

    Example:
        >>> folder = pull_delta("acme/math-delta", revision="v1")
        >>> delta = load_delta(folder)
    """
    # checked before any download: a refusal should cost nothing
    out = None if local_dir is None else check_output(local_dir, overwrite=overwrite, keyword="local_dir")
    folder, _ = _snapshot(
        repo_id,
        revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        endpoint=endpoint,
    )
    return folder if out is None else _copy_out(folder, out, overwrite)
