"""What a pull trusts from a Hub, checked before ``huggingface_hub`` acts on it, and how long it waits.

``huggingface_hub`` builds cache paths from values the server sends: the commit sha of a revision
(``snapshots/<sha>``, ``trees/<sha>.json``), each file's ``ETag`` (``blobs/<etag>`` and a ``.lock`` beside it) and
``X-Repo-Commit``. A hostile server answering ``../../x`` makes it write outside the cache. So a pull

1. resolves the revision to a commit itself (:func:`resolve_commit`) and refuses anything but 40 hex digits
   before that commit names a folder, and
2. runs inside :func:`guarded`, which hooks the client's HTTP session for requests to that Hub: every response's
   ``X-Repo-Commit`` must be a sha, a download's ``ETag``/``X-Linked-Etag`` a plain token (no ``/``, ``\\`` or
   ``.``) and its sizes decimal; and every request waits at most ``DELTAHUB_HUB_TIMEOUT`` seconds (default 30)
   for an answer, once: after a request of the pull went unanswered that long, the pull makes no further
   request (huggingface_hub would retry a HEAD for minutes), so a stalled Hub fails the pull within about one
   timeout.

A refusal is :class:`UntrustedAnswer` or :class:`HubStalled`, which :mod:`deltahub.hub` turns into one-line
``HubError``\\ s naming the repo and revision.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .errors import InvalidArgumentError
from .hub_ids import COMMIT_SHA

TIMEOUT_ENV = "DELTAHUB_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 30.0

# A blob name in the cache: the Hub sends git sha1s and sha256s; anything without a separator or a dot is safe.
_ETAG = re.compile(r"[A-Za-z0-9_-]{1,128}")
_SIZE = re.compile(r"\d{1,18}")
# git check-ref-format's rules, as far as a path is concerned: no "..", no empty or dot-led part, no
# backslash, control character, space or ~^:?*[ ; a revision also names a file under the cache's refs/.
_BAD_REF = re.compile(r"(^|/)\.|\.\.|//|[\x00-\x20\x7f~^:?*\[\\]|/$|^/|\.lock(/|$)|@\{")


class UntrustedAnswer(Exception):
    """The Hub answered a value that would steer the client outside its cache (or is not what it claims)."""


class HubStalled(Exception):
    """A request of the pull got no answer within the timeout; the pull stops instead of retrying."""


def hub_timeout() -> float:
    """Seconds a pull waits for each answer: ``DELTAHUB_HUB_TIMEOUT`` or 30."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise InvalidArgumentError(
            f"{TIMEOUT_ENV} must be a positive number of seconds, like 30; got {raw!r}"
        )
    return value


def check_revision(revision: object) -> None:
    """Refuse a revision that is not a branch, tag, ``refs/pr/N`` or commit name (it also names a cache file)."""
    if revision is None:
        return
    if not isinstance(revision, str) or not revision or len(revision) > 256 or _BAD_REF.search(revision):
        raise InvalidArgumentError(
            f"invalid revision {str(revision)[:80]!r}: expected a branch, tag, 'refs/pr/N' or commit sha "
            "(no '..', spaces, backslashes or control characters)"
        )


def check_commit(value: object, what: str) -> str:
    if not isinstance(value, str) or not COMMIT_SHA.fullmatch(value):
        raise UntrustedAnswer(f"{what} {str(value)[:60]!r}, which is not a commit sha (40 hex digits)")
    return value


def resolve_commit(
    api, repo_id: str, revision: str | None, *, cache_dir, local_files_only: bool, token
) -> str:
    """The commit ``revision`` of ``repo_id`` points to, from the Hub (one request) or the cache's ``refs/``.

    ``HfApi.resolve_revision`` records the answer under ``refs/`` before returning it; an answer that is not a
    sha is removed from there again, so the cache never keeps it for a later offline pull.
    """
    resolved = api.resolve_revision(
        repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
    )
    try:
        return check_commit(resolved.resolved, "named the commit")
    except UntrustedAnswer:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        root = cache_dir if cache_dir is not None else constants.HF_HUB_CACHE
        ref = os.path.join(
            root, repo_folder_name(repo_id=repo_id, repo_type="model"), "refs", revision or "main"
        )
        with contextlib.suppress(OSError):
            os.unlink(ref)
        raise


# ---- the HTTP hooks ---------------------------------------------------------------------------------------------


@dataclass
class _Pull:
    origin: tuple[str, str, int]
    timeout: float
    stalled: str | None = None


@dataclass
class _Sent:
    pull: _Pull
    request: object
    start: float = field(default_factory=time.monotonic)
    answered: bool = False


_lock = threading.Lock()
_pulls: dict[tuple[str, str, int], list[_Pull]] = {}
_last = (
    threading.local()
)  # the last request this thread sent for a guarded pull (retries come from the same thread)


def _origin(url: object) -> tuple[str, str, int]:
    parts = urlsplit(str(url))
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


def _pull_for(url: object) -> _Pull | None:
    with _lock:
        pulls = _pulls.get(_origin(url))
        return pulls[-1] if pulls else None


def _on_request(request) -> None:
    pull = _pull_for(request.url)
    if pull is None:
        return
    last: _Sent | None = getattr(_last, "sent", None)
    now = time.monotonic()
    if last is not None and last.pull is pull and not last.answered and now - last.start >= pull.timeout:
        # The previous request of this thread got no answer for a whole timeout: it timed out. huggingface_hub
        # would now retry (a HEAD with a 60 s timeout, 5 times); stop here instead.
        pull.stalled = pull.stalled or f"{request.method} {request.url.path}"
    if pull.stalled is not None:
        raise HubStalled(f"no answer within {pull.timeout:g} s (DELTAHUB_HUB_TIMEOUT)")
    # Each phase bounded: the client's own default is to wait forever for an API answer.
    timeouts = dict(request.extensions.get("timeout") or {})
    for key in ("connect", "read", "write", "pool"):
        value = timeouts.get(key)
        timeouts[key] = pull.timeout if value is None else min(value, pull.timeout)
    request.extensions["timeout"] = timeouts
    _last.sent = _Sent(pull, request)


def _on_response(response) -> None:
    pull = _pull_for(response.request.url)
    if pull is None:
        return
    last: _Sent | None = getattr(_last, "sent", None)
    if last is not None and last.request is response.request:
        last.answered = True
    headers = response.headers
    commit = headers.get("X-Repo-Commit")
    if commit is not None:
        check_commit(commit, "sent X-Repo-Commit")
    if "/resolve/" in response.request.url.path:
        for name in ("X-Linked-Etag", "ETag"):
            value = headers.get(name)
            if value is not None:
                token = value.strip().removeprefix("W/").strip('"')
                if not _ETAG.fullmatch(token):
                    raise UntrustedAnswer(
                        f"sent {name} {value[:60]!r} for a file, which is not a plain token"
                    )
        for name in ("X-Linked-Size", "Content-Length"):
            value = headers.get(name)
            if value is not None and not _SIZE.fullmatch(value.strip()):
                raise UntrustedAnswer(f"sent {name} {value[:40]!r}, which is not a size in bytes")


def _install(client) -> None:
    hooks = client.event_hooks
    if _on_request not in hooks["request"] or _on_response not in hooks["response"]:
        client.event_hooks = {
            "request": [*hooks["request"], _on_request],
            "response": [*hooks["response"], _on_response],
        }


@contextlib.contextmanager
def guarded(endpoint: str) -> Iterator[None]:
    """Check the answers of, and bound the waits for, every request to ``endpoint`` while the block runs."""
    from huggingface_hub.utils import get_session

    pull = _Pull(_origin(endpoint), hub_timeout())
    _install(get_session())  # idempotent; again each time, as the session may have been replaced
    with _lock:
        _pulls.setdefault(pull.origin, []).append(pull)
    try:
        yield
    finally:
        with _lock:
            _pulls[pull.origin].remove(pull)
            if not _pulls[pull.origin]:
                del _pulls[pull.origin]
