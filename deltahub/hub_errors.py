"""Client errors of ``huggingface_hub`` (and of deltahub's own checks in :mod:`deltahub._hub_guard`) turned into
one-line :class:`~deltahub.errors.HubError` subclasses that name the action, the repo, the revision, the host and
the fix. Tokens never appear in them: a server's words are redacted, and an error that quotes a server's body is
raised unchained.

    with hub_errors("pull", repo_id, revision, endpoint, token):
        ...  # any huggingface_hub call
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator

from ._hub_guard import TIMEOUT_ENV, HubStalled, UntrustedAnswer, hub_timeout
from .errors import (
    HubAuthError,
    HubConnectionError,
    HubError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
)

__all__ = ["hub_endpoint", "hub_errors"]


def hub_endpoint(endpoint: str | None) -> str:
    """The Hub's base URL: ``endpoint``, or the one huggingface_hub uses (HF_ENDPOINT), without a trailing /."""
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def _token_hint(token: str | bool | None) -> str:
    """Which token was used, in words: never the token itself."""
    if token is False:
        return "no token was sent"
    if isinstance(token, str):
        return "with the token you passed"
    from huggingface_hub import get_token

    return "with your saved token (HF_TOKEN or `hf auth login`)" if get_token() else "no token was found"


_TOKEN_FIX = "pass a valid `token`, set HF_TOKEN, or run `hf auth login`"


def _causes(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from or while handling, outermost first."""
    chain = [err]
    while len(chain) < 20:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt is None or nxt in chain:
            break
        chain.append(nxt)
    return chain


def _redacted(text: str, token: object) -> str:
    """A server's words made safe to print: one line, at most 160 characters, and nothing that looks like a
    token (the one sent, HF_TOKEN's, any ``hf_...`` string, whatever follows ``Bearer``/``token``)."""
    from huggingface_hub import get_token

    text = " ".join(str(text).split())
    for secret in {token if isinstance(token, str) else None, get_token()}:
        if secret:
            text = text.replace(secret, "<redacted>")
    text = re.sub(
        r"(?i)\b(bearer|token|authorization)(\s*[:=]?\s*)(?!<redacted>)\S+", r"\1\2<redacted>", text
    )
    text = re.sub(r"\bhf_[A-Za-z0-9_-]{6,}", "<redacted>", text)
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= 160 else text[:157] + "..."


def _translate(
    err: Exception, *, action: str, repo_id: str, revision: str, endpoint: str | None, token: object
) -> HubError | None:
    """The deltahub error for a client error raised while ``action``-ing ``repo_id@revision``, or None."""
    import httpx2
    from huggingface_hub import errors as hf

    where = f"{repo_id}@{revision}"
    host = hub_endpoint(endpoint)
    ids = {"repo_id": repo_id, "revision": revision}
    causes = _causes(err)
    http = next((c for c in causes if isinstance(c, hf.HfHubHTTPError)), None)
    status = getattr(getattr(http, "response", None), "status_code", None)

    # What deltahub refused before huggingface_hub could act on it (see _hub_guard).
    untrusted = next((c for c in causes if isinstance(c, (UntrustedAnswer, HubStalled))), None)
    if isinstance(untrusted, HubStalled):
        return HubConnectionError(
            f"cannot {action} {where}: the Hub at {host} sent {untrusted}; nothing was kept; retry later, "
            f"raise {TIMEOUT_ENV}, or check HF_ENDPOINT",
            **ids,
        )
    if untrusted is not None:
        return HubError(
            f"cannot {action} {where}: the Hub at {host} {_redacted(str(untrusted), token)}; refused before "
            "anything was written outside the cache: check HF_ENDPOINT (is this a Hugging Face Hub?)",
            **ids,
        )

    if isinstance(err, hf.RevisionNotFoundError):
        return HubRevisionNotFoundError(
            f"cannot {action} {where}: repo {repo_id} on {host} has no branch, tag or commit {revision!r}; "
            "check the branch, tag or commit sha (the repo's page lists its branches and tags)",
            **ids,
        )
    if http is not None and status == 401:
        if "Invalid credentials" in str(err) or "Invalid credentials" in str(
            getattr(err, "server_message", "")
        ):
            why = f"{host} rejected the token (invalid or expired)"
        else:
            why = f"{host} needs a token for this and {_token_hint(token)}"
        return HubAuthError(f"cannot {action} {where}: {why}; {_TOKEN_FIX}", **ids)
    if status == 403 and action != "push":
        return HubAuthError(
            f"cannot {action} {where}: {host} refused access to {repo_id} (403, {_token_hint(token)}): it may be "
            f"gated or restricted; request access on its page, or {_TOKEN_FIX} with access to it",
            **ids,
        )
    if http is not None and status == 403:
        return HubAuthError(
            f"cannot {action} {where}: the token has no write access to {repo_id} on {host}; use a token "
            f"with write access to the '{repo_id.split('/')[0]}' namespace ({_TOKEN_FIX}), or push to a "
            "namespace you own",
            **ids,
        )
    if isinstance(err, hf.RepositoryNotFoundError):
        return HubRepoNotFoundError(
            f"cannot {action} {where}: repo {repo_id} not found on {host} ({_token_hint(token)}); check the "
            f"id, and if the repo is private {_TOKEN_FIX} with access to it",
            **ids,
        )
    if isinstance(err, hf.OfflineModeIsEnabled) or (
        isinstance(err, (hf.LocalEntryNotFoundError, hf.RevisionResolutionError))
        and not isinstance(err, hf.IncompleteSnapshotError)
        and (
            any(isinstance(c, hf.OfflineModeIsEnabled) for c in causes)
            or "outgoing traffic has been disabled" in str(err)
            or "'local_files_only=True' is set" in str(err)
        )
    ):
        what = "is not in the local cache" if action != "push" else "needs the network"
        return HubConnectionError(
            f"cannot {action} {where}: it {what} and offline mode is on (HF_HUB_OFFLINE=1 or "
            "local_files_only); pull it once online, or unset HF_HUB_OFFLINE",
            **ids,
        )
    transport = next((c for c in causes if isinstance(c, httpx2.TransportError)), None)
    if transport is not None and not isinstance(err, hf.IncompleteSnapshotError):
        cached = " and no copy is in the local cache" if action != "push" else ""
        offline = ", or use HF_HUB_OFFLINE=1 with a cached copy" if action != "push" else ""
        if isinstance(transport, httpx2.TimeoutException):
            why = f"did not answer within {hub_timeout():g} s ({TIMEOUT_ENV})"
        else:
            why = f"cannot be reached ({type(transport).__name__})"
        return HubConnectionError(
            f"cannot {action} {where}: the Hub at {host} {why}{cached}; check the network and HF_ENDPOINT{offline}",
            **ids,
        )
    if isinstance(err, hf.IncompleteSnapshotError):
        return HubError(
            f"cannot {action} {where}: the cached copy is incomplete and the Hub at {host} cannot be reached; "
            "pull it again with network access",
            **ids,
        )
    if http is not None:
        # Never the server's body as is: it may echo the Authorization header, and it is not ours to print.
        text = getattr(http, "server_message", None) or str(http)
        first = next((line for line in text.splitlines() if line.strip()), type(http).__name__)
        said = _redacted(first, token)
        return HubError(f"cannot {action} {where}: {host} answered {status}: {said}", **ids)
    if any(isinstance(c, json.JSONDecodeError) for c in causes):
        return HubError(
            f"cannot {action} {where}: {host} answered something that is not JSON; it is not a Hub-compatible "
            "server, or not working: check HF_ENDPOINT",
            **ids,
        )
    if isinstance(err, OSError) and "Consistency check failed" in str(err):
        return HubError(
            f"cannot {action} {where}: {host} sent a file whose size differs from the size it announced "
            "(nothing was kept); retry, and if it persists check HF_ENDPOINT",
            **ids,
        )
    if isinstance(err, ValueError) and "Invalid pointer path" in str(err):
        return HubError(
            f"cannot {action} {where}: {host} listed a file name that is a path out of the repo; refused before "
            "anything was written outside the cache: check HF_ENDPOINT",
            **ids,
        )
    return None


@contextlib.contextmanager
def hub_errors(
    action: str, repo_id: str, revision: str, endpoint: str | None, token: object
) -> Iterator[None]:
    """Raise the deltahub error for a client error inside the block (``action``: "push" or "pull"); anything
    it does not recognise passes through unchanged."""
    try:
        yield
    except HubError:
        raise
    except Exception as err:
        mapped = _translate(
            err, action=action, repo_id=repo_id, revision=revision, endpoint=endpoint, token=token
        )
        if mapped is None:
            raise
        from huggingface_hub.errors import HfHubHTTPError

        if any(isinstance(c, HfHubHTTPError) for c in _causes(err)):
            # The client's error quotes the server's body, which may echo the token: not even a traceback
            # (DELTAHUB_DEBUG=1) shows it.
            raise mapped from None
        # Chained otherwise, so a Python traceback still shows the client's error (URL, cause); the CLI prints
        # only the one-line message.
        raise mapped from err
