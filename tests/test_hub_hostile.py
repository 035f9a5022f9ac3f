"""Pulling from a hostile Hub (tests/hostile_hub.py, started here on loopback): path-like commit shas and ETags,
sizes that lie, errors that echo the token, invalid JSON, a stall. Nothing may be written outside the cache or
the output folder, each failure is one typed HubError line naming repo@revision, the token appears nowhere, and
a stall ends within the documented timeout (DELTAHUB_HUB_TIMEOUT)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from hostile_hub import MODES, HostileHub

from deltahub import ParamDelta, SparseDelta, load_delta
from deltahub.errors import HubAuthError, HubConnectionError, HubError
from deltahub.format import save_delta
from deltahub.hub import pull_delta

pytestmark = pytest.mark.slow

TOKEN = "hf_SeCrEt0123456789abcdefTOKEN"
REPO = "evil/delta"
TIMEOUT = 2.0  # DELTAHUB_HUB_TIMEOUT for these tests

# mode -> (error class, words the one-line message must contain)
EXPECTED = {
    "sha-traversal": (HubError, "named the commit '../../escaped', which is not a commit sha"),
    "sha-folder": (HubError, "named the commit '..', which is not a commit sha"),
    "sha-not-hex": (HubError, "which is not a commit sha (40 hex digits)"),
    "etag-traversal": (
        HubError,
        "sent ETag '\"../../../../escaped-etag\"' for a file, which is not a plain token",
    ),
    "repo-commit-traversal": (HubError, "sent X-Repo-Commit '../../escaped', which is not a commit sha"),
    "lying-size": (HubError, "sent a file whose size differs from the size it announced"),
    "error-403-echo": (HubAuthError, "refused access to evil/delta (403"),
    "error-500-echo": (HubError, "answered 500: denied for Bearer <redacted>"),
    "invalid-json": (HubError, "answered something that is not JSON"),
    "stall": (HubConnectionError, f"did not answer within {TIMEOUT:g} s (DELTAHUB_HUB_TIMEOUT)"),
    "stall-downloads": (HubConnectionError, f"sent no answer within {TIMEOUT:g} s (DELTAHUB_HUB_TIMEOUT)"),
}
assert set(EXPECTED) == set(MODES) - {"honest"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    delta = SparseDelta(
        {"w": ParamDelta(torch.tensor([1, 3]), torch.tensor([0.5, -1.0]), (2, 4), torch.float32)},
        base_model="tiny/base",
    )
    folder = save_delta(delta, tmp_path_factory.mktemp("served") / "delta")
    with HostileHub(folder) as server:
        yield server


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("DELTAHUB_HUB_TIMEOUT", str(TIMEOUT))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def no_token_in(text: str) -> None:
    assert TOKEN not in text and TOKEN[3:] not in text, text


def test_an_honest_server_is_pulled(hub, env, tmp_path):
    hub.mode = "honest"
    folder = pull_delta(REPO, endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert folder.name == "0123456789abcdef0123456789abcdef01234567"
    delta = load_delta(REPO, endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert delta.origin["commit"] == folder.name and delta["w"].nnz == 2
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in hub.seen[-3:])  # it was sent, to be echoed


@pytest.mark.parametrize("mode", sorted(EXPECTED))
@pytest.mark.parametrize("how", ["pull --out", "load"])
def test_a_hostile_server_cannot_write_outside_the_cache(hub, env, tmp_path, mode, how):
    hub.mode = mode
    # Deep, so that a "../../../../x" from the server would land inside tmp_path, where it can be seen.
    cache = tmp_path / "a" / "b" / "c" / "d" / "cache"
    out = tmp_path / "out"
    before = files_under(tmp_path)
    error_class, words = EXPECTED[mode]
    start = time.monotonic()
    with pytest.raises(HubError) as info:
        if how == "load":
            load_delta(f"{REPO}@main", endpoint=hub.url, cache_dir=cache, token=TOKEN)
        else:
            pull_delta(REPO, revision="main", endpoint=hub.url, cache_dir=cache, local_dir=out)
    elapsed = time.monotonic() - start
    err = info.value
    assert type(err) is error_class, repr(err)
    message = str(err)
    assert "\n" not in message and message.startswith(f"cannot pull {REPO}@main: "), message
    assert words in message
    assert (err.repo_id, err.revision) == (REPO, "main")
    no_token_in(message)
    no_token_in("".join(traceback.format_exception(err)))  # not even in the chained causes
    written = files_under(tmp_path) - before
    outside = [p for p in written if cache not in p.parents]
    assert outside == [], outside  # --out untouched too: it appears complete or not at all
    assert not out.exists()
    for path in written:
        if path.is_file():
            no_token_in(path.read_bytes().decode("latin-1"))
    if mode.startswith("stall"):
        assert elapsed < 3 * TIMEOUT, elapsed  # one timeout, not huggingface_hub's minutes of retries


def test_a_poisoned_ref_is_not_kept_for_offline_use(hub, env, tmp_path, monkeypatch):
    """resolve_revision records the server's answer under refs/ before returning it: a bad one is removed."""
    hub.mode = "sha-traversal"
    cache = tmp_path / "cache"
    with pytest.raises(HubError):
        pull_delta(REPO, endpoint=hub.url, cache_dir=cache)
    assert not list(cache.rglob("refs/*"))
    # and one planted there (by an older client, say) is refused offline, not followed
    refs = cache / "models--evil--delta" / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text("../../../../etc")
    with pytest.raises(
        HubError, match=r"named the commit '\.\./\.\./\.\./\.\./etc', which is not a commit sha"
    ):
        pull_delta(REPO, endpoint=hub.url, cache_dir=cache, local_files_only=True)


@pytest.mark.parametrize("revision", ["../../x", "main/../../x", "a b", "..", "x\\y", "/abs", "x\x00y"])
def test_path_like_revisions_are_refused_before_any_request(hub, env, tmp_path, revision):
    hub.mode = "honest"
    seen = len(hub.seen)
    with pytest.raises(ValueError, match="invalid revision"):
        pull_delta(REPO, revision=revision, endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert len(hub.seen) == seen


# The CLI: one `error:` line, the documented exit code, no token on either stream.
CLI_CASES = {
    "error-500-echo": 8,
    "error-403-echo": 7,
    "lying-size": 8,
    "etag-traversal": 8,
    "stall": 8,
}


@pytest.mark.parametrize("mode", sorted(CLI_CASES))
def test_cli_pull_from_a_hostile_server(hub, tmp_path, mode):
    hub.mode = mode
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": TOKEN,
        "HF_HUB_CACHE": str(tmp_path / "cache"),
        "HF_HUB_DISABLE_XET": "1",
        "DELTAHUB_HUB_TIMEOUT": str(TIMEOUT),
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    env.pop("DELTAHUB_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "deltahub.cli", "pull", f"{REPO}@main", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    no_token_in(proc.stdout + proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "it/s]" not in line]
    assert proc.returncode == CLI_CASES[mode], proc.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and f"cannot pull {REPO}@main" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
