"""The loopback Hub server (deltahub/demo/localhub) driven by the real huggingface_hub client over HTTP."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session
from huggingface_hub.utils.sha import git_hash
from safetensors.numpy import save_file

from deltahub.demo.localhub import HubServer

# The client's own LFS upload (lfs._upload_single_part) passes `data=<file>` to httpx2, which deprecates it.
# Every test talks to the loopback Hub server (a server, threads, HTTP): slow.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning"),
    pytest.mark.slow,
]


def _make_folder(root: Path, seed: int = 0) -> Path:
    """A text file, a nested file and a ~3 MB real .safetensors file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(f'{{"seed": {seed}}}\n')
    (root / "nested").mkdir(exist_ok=True)
    (root / "nested" / "notes.txt").write_text("notes\n")
    rng = np.random.default_rng(seed)
    save_file({"delta": rng.standard_normal((750, 1000)).astype(np.float32)}, str(root / "delta.safetensors"))
    return root


def _download(env, repo_id: str, filename: str, **kwargs) -> bytes:
    path = hf_hub_download(repo_id, filename, endpoint=env.url, token=env.token, **kwargs)
    return Path(path).read_bytes()


def test_upload_folder_roundtrip_is_byte_identical(hub_env, tmp_path):
    api, repo_id = hub_env.api, hub_env.new_repo_id()
    url = api.create_repo(repo_id)
    assert url.repo_id == repo_id and url.startswith(hub_env.url)
    folder = _make_folder(tmp_path / "up")
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="first")

    assert len(info.oid) == 40 and info.commit_url.endswith(info.oid)
    assert sorted(api.list_repo_files(repo_id)) == [
        ".gitattributes",
        "config.json",
        "delta.safetensors",
        "nested/notes.txt",
    ]
    for name in ["config.json", "nested/notes.txt", "delta.safetensors"]:
        assert _download(hub_env, repo_id, name) == (folder / name).read_bytes()

    # The .safetensors file went through the LFS batch API (Xet is off): sha256 metadata, ETag = sha256.
    weights = (folder / "delta.safetensors").read_bytes()
    model = api.model_info(repo_id, files_metadata=True)
    assert model.sha == info.oid and model.private is False
    siblings = {s.rfilename: s for s in model.siblings}
    assert siblings["delta.safetensors"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert siblings["config.json"].lfs is None and siblings["config.json"].blob_id == git_hash(
        b'{"seed": 0}\n'
    )
    meta = get_hf_file_metadata(
        hf_hub_url(repo_id, "delta.safetensors", endpoint=hub_env.url), token=hub_env.token
    )
    assert meta.etag == hashlib.sha256(weights).hexdigest() and meta.size == len(weights)
    assert meta.commit_hash == info.oid

    top = {entry.path: type(entry).__name__ for entry in api.list_repo_tree(repo_id)}
    assert top == {
        ".gitattributes": "RepoFile",
        "config.json": "RepoFile",
        "delta.safetensors": "RepoFile",
        "nested": "RepoFolder",
    }
    assert [e.path for e in api.list_repo_tree(repo_id, path_in_repo="nested")] == ["nested/notes.txt"]
    infos = api.get_paths_info(repo_id, ["delta.safetensors", "nested", "missing.txt"])
    assert [(e.path, type(e).__name__) for e in infos] == [
        ("delta.safetensors", "RepoFile"),
        ("nested", "RepoFolder"),
    ]

    # Re-uploading identical files is a no-op: the client compares the preupload `oid`s and skips the commit.
    again = api.upload_folder(repo_id=repo_id, folder_path=folder)
    assert again.oid == info.oid


def test_history_tags_and_old_revisions(hub_env, tmp_path):
    api, repo_id = hub_env.api, hub_env.new_repo_id()
    api.create_repo(repo_id)
    v1 = api.upload_folder(repo_id=repo_id, folder_path=_make_folder(tmp_path / "v1", seed=1)).oid
    api.create_tag(repo_id, tag="v1", revision=v1)
    old = (tmp_path / "v1" / "delta.safetensors").read_bytes()
    v2 = api.upload_folder(
        repo_id=repo_id, folder_path=_make_folder(tmp_path / "v2", seed=2), commit_message="v2"
    ).oid
    new = (tmp_path / "v2" / "delta.safetensors").read_bytes()

    assert v2 != v1 and old != new
    assert _download(hub_env, repo_id, "delta.safetensors") == new
    assert _download(hub_env, repo_id, "delta.safetensors", revision=v1) == old
    assert _download(hub_env, repo_id, "delta.safetensors", revision="v1") == old
    assert api.model_info(repo_id, revision="v1").sha == v1

    commits = api.list_repo_commits(repo_id)
    assert [c.commit_id for c in commits[:2]] == [v2, v1] and commits[0].title == "v2"
    assert commits[-1].title == "initial commit" and commits[0].authors == [hub_env.user]
    refs = api.list_repo_refs(repo_id)
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", v1)]
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", v2)]


def test_branch_upload_and_download(hub_env):
    api, repo_id = hub_env.api, hub_env.new_repo_id()
    api.create_repo(repo_id)
    api.create_branch(repo_id, branch="dev")
    api.create_branch(repo_id, branch="dev", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_branch(repo_id, branch="dev")
    assert exc.value.response.status_code == 409

    api.upload_file(path_or_fileobj=b"on dev", path_in_repo="dev.txt", repo_id=repo_id, revision="dev")
    assert _download(hub_env, repo_id, "dev.txt", revision="dev") == b"on dev"
    with pytest.raises(RemoteEntryNotFoundError):
        _download(hub_env, repo_id, "dev.txt", revision="main")
    assert {b.name for b in api.list_repo_refs(repo_id).branches} == {"main", "dev"}
    api.delete_branch(repo_id, branch="dev")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="dev")


def test_create_commit_pull_request_and_delete(hub_env):
    api, repo_id = hub_env.api, hub_env.new_repo_id()
    api.create_repo(repo_id)
    main_sha = api.upload_file(path_or_fileobj=b"base", path_in_repo="a.txt", repo_id=repo_id).oid
    pr = api.create_commit(
        repo_id, [CommitOperationAdd("b.txt", b"proposed")], commit_message="proposal", create_pr=True
    )
    assert pr.pr_revision == "refs/pr/1" and pr.pr_num == 1
    # "refs/pr/1" travels URL-encoded (refs%2Fpr%2F1) in /resolve and /api/.../revision URLs.
    assert _download(hub_env, repo_id, "b.txt", revision="refs/pr/1") == b"proposed"
    assert api.model_info(repo_id, revision="refs/pr/1").sha == pr.oid
    assert api.model_info(repo_id).sha == main_sha  # main untouched
    refs = api.list_repo_refs(repo_id, include_pull_requests=True)
    assert [(r.ref, r.target_commit) for r in refs.pull_requests] == [("refs/pr/1", pr.oid)]

    api.create_commit(repo_id, [CommitOperationDelete("a.txt")], commit_message="rm")
    assert "a.txt" not in api.list_repo_files(repo_id)
    with pytest.raises(RemoteEntryNotFoundError):
        api.create_commit(repo_id, [CommitOperationDelete("a.txt")], commit_message="rm again")
    # parent_commit guards against concurrent writers: a stale parent is refused (412).
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_commit(
            repo_id, [CommitOperationAdd("c.txt", b"c")], commit_message="stale", parent_commit=main_sha
        )
    assert exc.value.response.status_code == 412


def test_private_repo_needs_the_owners_token(hub_env, tmp_path):
    repo_id = hub_env.new_repo_id("private")
    hub_env.api.create_repo(repo_id, private=True)
    hub_env.api.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id=repo_id)
    assert hub_env.api.model_info(repo_id).private is True
    assert _download(hub_env, repo_id, "s.txt") == b"secret"

    anonymous = HfApi(endpoint=hub_env.url, token=False)
    other = HfApi(endpoint=hub_env.url, token=hub_env.other_token)
    for api in (anonymous, other):
        with pytest.raises(RepositoryNotFoundError):
            api.model_info(repo_id)
        assert not api.repo_exists(repo_id)
    for token in (False, hub_env.other_token):
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(repo_id, "s.txt", endpoint=hub_env.url, token=token, cache_dir=tmp_path / "c")
        with pytest.raises(RepositoryNotFoundError):
            snapshot_download(repo_id, endpoint=hub_env.url, token=token, cache_dir=tmp_path / "c")


def test_write_rights_and_org_namespace(hub_env):
    repo_id = hub_env.new_repo_id("public")
    hub_env.api.create_repo(repo_id)
    other = HfApi(endpoint=hub_env.url, token=hub_env.other_token)
    assert other.model_info(repo_id).id == repo_id  # public: readable by anyone
    with pytest.raises(HfHubHTTPError) as exc:
        other.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert exc.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as exc:
        other.create_repo(hub_env.new_repo_id("not-bobs"))
    assert exc.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(endpoint=hub_env.url, token=False).create_repo(hub_env.new_repo_id("anon"))
    assert exc.value.response.status_code == 401

    org_repo = hub_env.new_repo_id("org", namespace=hub_env.org)  # alice is a member of the org
    hub_env.api.create_repo(org_repo, private=True)
    hub_env.api.upload_file(path_or_fileobj=b"org", path_in_repo="o.txt", repo_id=org_repo)
    assert _download(hub_env, org_repo, "o.txt") == b"org"
    with pytest.raises(RepositoryNotFoundError):
        other.model_info(org_repo)


def test_invalid_token_is_a_401(hub_env):
    assert hub_env.api.whoami()["name"] == hub_env.user
    assert {o["name"] for o in hub_env.api.whoami()["orgs"]} == {hub_env.org}
    bad = HfApi(endpoint=hub_env.url, token="hf_not_a_valid_token")
    with pytest.raises(HfHubHTTPError) as exc:
        bad.whoami()
    assert exc.value.response.status_code == 401
    repo_id = hub_env.new_repo_id()
    hub_env.api.create_repo(repo_id)
    with pytest.raises(HfHubHTTPError) as exc:
        bad.model_info(repo_id)
    assert exc.value.response.status_code == 401 and not isinstance(exc.value, RepositoryNotFoundError)
    with pytest.raises(HfHubHTTPError) as exc:
        hf_hub_download(repo_id, ".gitattributes", endpoint=hub_env.url, token="hf_not_a_valid_token")
    assert exc.value.response.status_code == 401


def test_missing_repo_revision_and_file(hub_env):
    api, repo_id = hub_env.api, hub_env.new_repo_id()
    missing = hub_env.new_repo_id("missing")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(missing)
    with pytest.raises(RepositoryNotFoundError):
        _download(hub_env, missing, "config.json")
    api.create_repo(repo_id)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        _download(hub_env, repo_id, ".gitattributes", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files(repo_id, revision="0" * 40)
    with pytest.raises(RemoteEntryNotFoundError):
        _download(hub_env, repo_id, "no/such/file.txt")
    assert api.file_exists(repo_id, ".gitattributes") and not api.file_exists(repo_id, "nope.txt")


def test_create_repo_exist_ok_and_delete(hub_env):
    api, repo_id = hub_env.api, hub_env.new_repo_id()
    api.create_repo(repo_id)
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo(repo_id)
    assert exc.value.response.status_code == 409
    assert api.create_repo(repo_id, exist_ok=True).repo_id == repo_id  # reads `url` from the 409 body
    api.delete_repo(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id)
    api.delete_repo(repo_id, missing_ok=True)


def test_snapshot_download_with_allow_patterns(hub_env, tmp_path):
    api, repo_id = hub_env.api, hub_env.new_repo_id()
    api.create_repo(repo_id)
    folder = _make_folder(tmp_path / "up")
    api.upload_folder(repo_id=repo_id, folder_path=folder)

    path = Path(
        snapshot_download(repo_id, endpoint=hub_env.url, token=hub_env.token, allow_patterns=["*.json"])
    )
    assert sorted(p.name for p in path.rglob("*") if p.is_file()) == ["config.json"]
    path = Path(
        snapshot_download(repo_id, endpoint=hub_env.url, token=hub_env.token, allow_patterns=["nested/*"])
    )
    assert (path / "nested" / "notes.txt").read_bytes() == (folder / "nested" / "notes.txt").read_bytes()
    local = Path(
        snapshot_download(repo_id, endpoint=hub_env.url, token=hub_env.token, local_dir=tmp_path / "all")
    )
    for name in ["config.json", "nested/notes.txt", "delta.safetensors"]:
        assert (local / name).read_bytes() == (folder / name).read_bytes()
    assert str(path).startswith(constants.HF_HUB_CACHE)  # the autouse fixture's temp cache, not ~/.cache


def test_offline_mode_serves_from_cache(hub_env, tmp_path, monkeypatch):
    api, repo_id = hub_env.api, hub_env.new_repo_id()
    api.create_repo(repo_id)
    folder = _make_folder(tmp_path / "up")
    api.upload_folder(repo_id=repo_id, folder_path=folder)
    snapshot = snapshot_download(repo_id, endpoint=hub_env.url, token=hub_env.token)

    # In-process: the client reads constants.HF_HUB_OFFLINE at call time (the env var only at import).
    requests_before = len(hub_env.server.log_lines)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert snapshot_download(repo_id, endpoint=hub_env.url) == snapshot
    cached = hf_hub_download(repo_id, "delta.safetensors", endpoint=hub_env.url)
    assert Path(cached).read_bytes() == (folder / "delta.safetensors").read_bytes()
    assert len(hub_env.server.log_lines) == requests_before  # the server saw no request

    # A fresh process with HF_HUB_OFFLINE=1 in its environment, sharing the same cache (HF_HUB_CACHE env).
    script = textwrap.dedent(f"""
        from huggingface_hub import constants, hf_hub_download
        assert constants.HF_HUB_OFFLINE
        print(hf_hub_download({repo_id!r}, "delta.safetensors"))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (
        Path(out.stdout.strip().splitlines()[-1]).read_bytes() == (folder / "delta.safetensors").read_bytes()
    )
    assert len(hub_env.server.log_lines) == requests_before


def test_model_card_yaml_is_validated(hub_env):
    api, repo_id = hub_env.api, hub_env.new_repo_id()
    api.create_repo(repo_id)
    card = "---\nbase_model: tiny/llama\nlibrary_name: deltahub\ntags: [sparse-delta]\n---\n# Delta\n"
    api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo_id)
    model = api.model_info(repo_id)
    assert model.card_data["base_model"] == "tiny/llama" and model.library_name == "deltahub"
    assert model.tags == ["sparse-delta"]

    bad_cards = [
        "---\nbase_model: {name: x}\n---\n",
        "---\nlibrary_name: [1, 2]\n---\n",
        "---\nkey: [unclosed\n---\n",
    ]
    for bad in bad_cards:
        with pytest.raises(ValueError, match=r"Invalid metadata in README\.md"):
            api.upload_file(path_or_fileobj=bad.encode(), path_in_repo="README.md", repo_id=repo_id)
    # ModelCard.validate() posts to constants.ENDPOINT (it has no `endpoint=`): hub_env points that at the server.
    ModelCard(card).validate()
    with pytest.raises(ValueError, match="base_model"):
        ModelCard(bad_cards[0]).validate()
    with pytest.warns(UserWarning, match="empty or missing yaml metadata"):
        api.upload_file(path_or_fileobj=b"# no metadata\n", path_in_repo="README.md", repo_id=repo_id)


def test_tokens_never_reach_storage_or_logs(hub_env, tmp_path):
    repo_id = hub_env.new_repo_id("leak-check")
    hub_env.api.create_repo(repo_id, private=True)
    hub_env.api.upload_folder(repo_id=repo_id, folder_path=_make_folder(tmp_path / "up"))
    _download(hub_env, repo_id, "config.json")
    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=hub_env.url, token="hf_wrong_token_xyz").model_info(repo_id)

    secrets = [hub_env.token.encode(), hub_env.other_token.encode(), b"hf_wrong_token_xyz"]
    stored = [p for p in hub_env.root.rglob("*") if p.is_file()]
    assert any(p.name == "repo.json" for p in stored)
    for path in stored:
        data = path.read_bytes()
        assert not any(s in data for s in secrets), path
    log = "\n".join(hub_env.server.log_lines)
    assert repo_id in log and not any(s.decode() in log for s in secrets)


def test_xet_enabled_client_with_inline_only_server(tmp_path, monkeypatch):
    """With Xet on (the client's default), `lfs=False` keeps every file inline and upload_folder still works."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    folder = _make_folder(tmp_path / "up")
    with HubServer(tmp_path / "hub", {"tok": "carol"}, lfs=False) as server:
        api = HfApi(endpoint=server.url, token="tok")
        api.create_repo("carol/inline")
        api.upload_folder(repo_id="carol/inline", folder_path=folder)  # Xet pipeline path, regular files only
        path = hf_hub_download("carol/inline", "delta.safetensors", endpoint=server.url, token="tok")
        assert Path(path).read_bytes() == (folder / "delta.safetensors").read_bytes()
        assert api.model_info("carol/inline", files_metadata=True).siblings[-1].lfs is None
        # On this path create_pr opens the PR first (POST /discussions), then commits to refs/pr/1.
        (folder / "config.json").write_text('{"proposed": true}')
        pr = api.upload_folder(repo_id="carol/inline", folder_path=folder, create_pr=True)
        assert pr.pr_revision == "refs/pr/1"
        path = hf_hub_download(
            "carol/inline", "config.json", revision="refs/pr/1", endpoint=server.url, token="tok"
        )
        assert Path(path).read_text() == '{"proposed": true}'


def test_resolve_headers_and_range(hub_env):
    """What file_download.py reads: X-Repo-Commit, quoted ETag (sha256 + X-Linked-* for LFS), sizes, Range."""
    repo_id = hub_env.new_repo_id()
    hub_env.api.create_repo(repo_id)
    data = bytes(range(256)) * 10
    sha = hub_env.api.upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id=repo_id).oid
    session, auth = get_session(), {"authorization": f"Bearer {hub_env.token}"}
    url = hf_hub_url(repo_id, "w.safetensors", revision=sha, endpoint=hub_env.url)
    head = session.head(url, headers=auth)
    assert head.status_code == 200 and head.headers["X-Repo-Commit"] == sha
    assert head.headers["ETag"] == head.headers["X-Linked-Etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert head.headers["X-Linked-Size"] == head.headers["Content-Length"] == str(len(data))
    part = session.get(url, headers={**auth, "Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == data[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    missing = session.head(hf_hub_url(repo_id, "nope", endpoint=hub_env.url), headers=auth)
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"
    assert missing.headers["X-Repo-Commit"] == sha


def test_standalone_command_line(tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deltahub.demo.localhub",
            "--port",
            "0",
            "--root",
            str(tmp_path),
            "--token",
            "t0k:dave",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        api = HfApi(endpoint=url, token="t0k")
        assert api.whoami()["name"] == "dave"
        api.create_repo("dave/cli")
        assert api.list_repo_files("dave/cli") == [".gitattributes"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert (tmp_path / "repos" / "dave" / "cli" / "repo.json").is_file()
