"""The Hub's repo id rules, in one place (``huggingface_hub.utils.validate_repo_id``'s), and deltahub's
``org/name@revision`` references built on them.

A repo id is ``name`` or ``namespace/name``; each part is 1-96 ASCII letters, digits, ``-``, ``_`` or ``.``,
starts and ends with a letter, digit or ``_``, contains no ``--`` or ``..``, and the id does not end in
``.git``. Deltas are always namespaced: a bare name ("gpt2") is far more likely a mistyped local folder than a
delta repo, so :func:`parse_ref` (and so every delta argument) requires ``namespace/name``; a base model may be
bare (``is_repo_id(..., namespaced=False)``).
"""

from __future__ import annotations

import re

from .errors import InvalidRepoIdError

_PART = r"(?:[A-Za-z0-9_]|[A-Za-z0-9_][A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])"
_NAMESPACED = re.compile(rf"{_PART}/{_PART}", re.ASCII)
_ANY = re.compile(rf"(?:{_PART}/)?{_PART}", re.ASCII)
# A full commit id as the Hub names one (a branch or tag is anything else).
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
REF_HELP = "expected a Hub repo id like 'org/name' or 'org/name@revision' (a branch, tag or commit sha)"


def is_repo_id(text: object, *, namespaced: bool = True) -> bool:
    """Whether ``text`` follows the Hub's repo id rules (with ``namespaced``, also has an ``org/`` part)."""
    return (
        isinstance(text, str)
        and bool((_NAMESPACED if namespaced else _ANY).fullmatch(text))
        and "--" not in text
        and ".." not in text
        and not text.endswith(".git")
    )


def check_repo_id(repo_id: object) -> str:
    """``repo_id`` itself, or :class:`~deltahub.errors.InvalidRepoIdError` naming it and the expected form."""
    if not is_repo_id(repo_id):
        raise InvalidRepoIdError(f"invalid repo id {repo_id!r}: {REF_HELP}")
    return repo_id  # type: ignore[return-value]


def parse_ref(ref: object) -> tuple[str, str | None]:
    """Split ``"org/name@revision"`` into ``("org/name", "revision")``; no ``@`` gives ``("org/name", None)``.

    A repo id never contains ``@``, so everything after the first one is the revision (``refs/pr/1`` works).

    Raises:
        InvalidRepoIdError: ``ref`` is not of that form.

    Example:
        >>> parse_ref("acme/math-delta@v1")
        ('acme/math-delta', 'v1')
    """
    if not isinstance(ref, str):
        raise InvalidRepoIdError(f"invalid delta reference {ref!r}: {REF_HELP}")
    repo_id, at, revision = ref.partition("@")
    if not is_repo_id(repo_id) or (at and (not revision.strip() or any(c.isspace() for c in revision))):
        raise InvalidRepoIdError(f"invalid delta reference {ref!r}: {REF_HELP}")
    return repo_id, (revision if at else None)


def is_ref(text: object) -> bool:
    """Whether ``text`` has the shape of a Hub reference (``org/name`` or ``org/name@rev``)."""
    try:
        parse_ref(text)
    except InvalidRepoIdError:
        return False
    return True
