"""Naming a base model: Hub ids with revisions, HF-cache snapshot paths mapped back to them, and local paths kept
out of anything that leaves the machine.

A delta records ``base_model`` (and ``base_revision``) as information for people and for loading the base by id;
whether a base fits is decided by content (the fingerprint), never by these strings. Locally a delta may
record a folder path; :func:`scrub_local_paths` is what ``push_delta`` uses so no path is ever uploaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

from .errors import InvalidRepoIdError
from .hub_ids import COMMIT_SHA

# The HF cache lays repos out as <cache>/models--<org>--<name>/snapshots/<commit>/...; repo ids never contain
# "--", so the folder name maps back to exactly one id.
_CACHE_REPO = re.compile(r"models--(?P<repo>.+)")
_REF_HELP = "expected a Hub model id like 'org/name' or 'org/name@revision' (a branch, tag or commit sha)"


def hf_cache_ref(path: str | os.PathLike[str]) -> tuple[str, str] | None:
    """``(repo_id, commit)`` when ``path`` lies in a Hugging Face cache snapshot, else None.

    Example:
        >>> hf_cache_ref("/home/me/.cache/huggingface/hub/models--acme--tiny/snapshots/3f2a.../")
        ('acme/tiny', '3f2a...')
    """
    parts = PurePath(os.fspath(path)).parts
    for i in range(len(parts) - 2):
        match = _CACHE_REPO.fullmatch(parts[i])
        if match and parts[i + 1] == "snapshots" and COMMIT_SHA.fullmatch(parts[i + 2]):
            repo_id = match.group("repo").replace("--", "/")
            if is_hub_id(repo_id):
                return repo_id, parts[i + 2]
    return None


def is_hub_id(text: object) -> bool:
    """Whether ``text`` follows the Hub's model id rules (``name`` or ``namespace/name``, see
    :mod:`deltahub.hub_ids`), so it may go in a card's ``base_model``; a path like ``./base`` or ``/models/x``
    does not."""
    from .hub_ids import is_repo_id

    return is_repo_id(text, namespaced=False)


def parse_model_id(text: str) -> tuple[str, str | None]:
    """Split ``"org/name@revision"`` into ``("org/name", "revision")``, checking the id (``--base-model``).

    Raises:
        ValueError: ``text`` is not a Hub model id (a local path, say: a base known only locally has no id).
    """
    if not isinstance(text, str):
        raise InvalidRepoIdError(f"invalid base model id {text!r}: {_REF_HELP}")
    repo_id, at, revision = text.partition("@")
    if not is_hub_id(repo_id) or (at and not revision.strip()):
        raise InvalidRepoIdError(f"invalid base model id {text!r}: {_REF_HELP}")
    return repo_id, (revision if at else None)


def model_identity(
    name_or_path: str | os.PathLike[str] | None, revision: str | None = None
) -> tuple[str | None, str | None]:
    """What a delta should record for the base it was made from: an HF-cache snapshot path becomes its repo
    id and commit; anything else is kept as given (a Hub id, or a local path that push later drops)."""
    if name_or_path is None or os.fspath(name_or_path) == "":
        return None, revision
    text = os.fspath(name_or_path)
    cached = hf_cache_ref(text)
    if cached is not None:
        return cached
    return text, revision


def looks_like_local_path(text: str) -> bool:
    """Whether a string names a place on this machine: absolute, home- or dot-relative, or an existing path
    with a separator in it. Hub ids (``org/name``) do not count unless such a folder exists here."""
    if not text or "\n" in text or len(text) > 4096:
        return False
    if text.startswith(("/", "~", "./", "../", ".\\", "..\\")) or text in (".", ".."):
        return True
    if re.match(r"[A-Za-z]:[\\/]", text):  # a Windows drive
        return True
    if ("/" in text or "\\" in text) and not re.match(r"[a-z][a-z0-9+.-]*://", text):
        try:
            return Path(text).exists()
        except OSError:
            return False
    return False


def scrub_local_paths(value: Any) -> tuple[Any, list[str]]:
    """``value`` (JSON-like) with every local path replaced: an HF-cache snapshot path by ``repo_id@commit``,
    any other by None. Returns the new value and the paths dropped (in order, without repeats)."""
    dropped: dict[str, None] = {}

    def walk(v: Any) -> Any:
        if isinstance(v, str) and looks_like_local_path(v):
            cached = hf_cache_ref(v)
            if cached is not None:
                return f"{cached[0]}@{cached[1]}"
            dropped[v] = None
            return None
        if isinstance(v, Mapping):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        return v

    return walk(value), list(dropped)
