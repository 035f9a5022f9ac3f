"""push_delta / pull_delta / Hub references, against the loopback Hub (deltahub.demo.localhub) through the real
huggingface_hub client over HTTP: nothing in huggingface_hub is patched beyond the endpoint constants that the
``hub_env`` fixture points at the server (as HF_ENDPOINT would)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants
from tiny import random_delta, tiny_llama

from deltahub import DeltaExistsError, DeltaFormatError, SparseDelta, load_delta, load_model, save_delta
from deltahub.errors import (
    HubAuthError,
    HubConnectionError,
    HubError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    NotADeltaError,
)
from deltahub.hub import parse_delta_ref, pull_delta, push_delta

# The client's own LFS upload (lfs._upload_single_part) passes `data=<file>` to httpx2, which deprecates it.
# Every test also talks to the loopback Hub server (a server, threads, HTTP): slow.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning"),
    pytest.mark.slow,
]

BASE_ID = "tiny/llama"


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    return folder


def make_delta(seed: int = 0, **kwargs) -> SparseDelta:
    return random_delta(tiny_llama(), density=0.05, seed=seed, base_model=BASE_ID, **kwargs)


def saved(tmp_path: Path, name: str, seed: int = 0, **save_kwargs) -> Path:
    return save_delta(make_delta(seed), tmp_path / name, **save_kwargs)


def delta_bytes(folder: Path) -> dict[str, bytes]:
    """Every delta file but the card (the pushed card names the repo instead of a placeholder)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "README.md"}


def files_at(hub_env, repo_id: str, revision: str = "main") -> list[str]:
    return sorted(hub_env.api.list_repo_files(repo_id, revision=revision))


def test_parse_delta_ref():
    assert parse_delta_ref("acme/math") == ("acme/math", None)
    assert parse_delta_ref("acme/math@v1") == ("acme/math", "v1")
    assert parse_delta_ref("acme/math@refs/pr/1") == ("acme/math", "refs/pr/1")
    for bad in ["math", "acme/math@", "./acme/math", "a/b/c", "acme/ma..th", "", "acme/math.git"]:
        with pytest.raises(ValueError, match="expected a Hub repo id like 'org/name'"):
            parse_delta_ref(bad)


def test_push_then_pull_is_bit_identical(hub_env, tmp_path):
    folder = saved(tmp_path, "sharded", max_shard_size=4000)  # several shards and an index
    (folder / "notes.txt").write_text("not part of the delta\n")
    (folder / "optimizer.pt").write_bytes(b"pickle")
    repo_id = hub_env.new_repo_id("delta")

    result = push_delta(folder, repo_id)
    assert len(result.sha) == 40 and result.url.endswith(result.sha) and result.revision == "main"
    shards = sorted(n for n in delta_bytes(folder) if n.startswith("delta-"))
    assert len(shards) > 1
    expected = sorted(
        [".gitattributes", "README.md", "delta_config.json", "delta.safetensors.index.json", *shards]
    )
    assert files_at(hub_env, repo_id) == expected  # only the delta's own files went up
    assert len(hub_env.api.list_repo_commits(repo_id)) == 2  # the repo's creation and one commit

    pulled = pull_delta(repo_id)
    assert pulled.name == result.sha and str(pulled).startswith(constants.HF_HUB_CACHE)
    assert delta_bytes(pulled) == {
        k: v for k, v in delta_bytes(folder).items() if k not in ("notes.txt", "optimizer.pt")
    }
    assert "deltas=['" + repo_id + "']" in (pulled / "README.md").read_text()
    # The same bytes give the same delta; its origin pins the commit.
    delta = load_delta(repo_id)
    assert delta.equal(load_delta(folder))
    assert delta.origin == {"repo_id": repo_id, "revision": "main", "commit": result.sha, "path": str(pulled)}

    # A SparseDelta object is pushed the same way (saved to a temporary folder first).
    obj_repo = hub_env.new_repo_id("from-object")
    push_delta(make_delta(3), obj_repo)
    assert load_delta(obj_repo).equal(make_delta(3))


def test_second_push_is_a_new_commit_and_old_revisions_stay(hub_env, tmp_path):
    api, repo_id = hub_env.api, hub_env.new_repo_id("history")
    first = push_delta(saved(tmp_path, "v1", seed=1, max_shard_size=4000), repo_id)
    api.create_tag(repo_id, tag="v1")
    second = push_delta(saved(tmp_path, "v2", seed=2), repo_id, commit_message="second delta")

    assert second.sha != first.sha
    assert api.list_repo_commits(repo_id)[0].title == "second delta"
    # The old shards were deleted in the same commit: main holds one delta, a single file.
    assert files_at(hub_env, repo_id) == [
        ".gitattributes",
        "README.md",
        "delta.safetensors",
        "delta_config.json",
    ]
    assert load_delta(repo_id).equal(make_delta(2))
    for ref in [f"{repo_id}@v1", f"{repo_id}@{first.sha}"]:
        old = load_delta(ref)
        assert old.equal(make_delta(1)) and old.origin["commit"] == first.sha
    assert load_delta(f"{repo_id}@v1").origin["revision"] == "v1"


def test_branch_push_pull_and_pull_request(hub_env, tmp_path):
    repo_id = hub_env.new_repo_id("branches")
    main = push_delta(saved(tmp_path, "main", seed=1), repo_id)
    exp = push_delta(saved(tmp_path, "exp", seed=2), repo_id, revision="exp")  # created from main
    assert exp.revision == "exp" and exp.sha != main.sha
    assert {b.name for b in hub_env.api.list_repo_refs(repo_id).branches} == {"main", "exp"}
    assert load_delta(repo_id).equal(make_delta(1))
    assert load_delta(f"{repo_id}@exp").equal(make_delta(2))
    assert pull_delta(repo_id, revision="exp").name == exp.sha

    pr = push_delta(saved(tmp_path, "pr", seed=3), repo_id, create_pr=True)
    assert pr.pr_url and pr.revision == "refs/pr/1"
    assert load_delta(f"{repo_id}@refs/pr/1").equal(make_delta(3))
    assert load_delta(repo_id).equal(make_delta(1))  # main untouched by the pull request

    hub_env.api.create_tag(repo_id, tag="frozen")
    with pytest.raises(ValueError, match="'frozen' is a tag; commits go to a branch"):
        push_delta(tmp_path / "pr", repo_id, revision="frozen")


def test_private_repo_needs_the_right_token(hub_env, tmp_path):
    folder = saved(tmp_path, "d")
    repo_id = hub_env.new_repo_id("private")
    push_delta(folder, repo_id, private=True, token=hub_env.token)
    assert hub_env.api.model_info(repo_id).private
    assert load_delta(repo_id, token=hub_env.token).equal(load_delta(folder))

    # Fresh caches: a cached copy would be served (huggingface_hub falls back to it on auth errors too).
    with pytest.raises(HubRepoNotFoundError) as err:
        pull_delta(repo_id, token=False, cache_dir=tmp_path / "c1")
    assert str(err.value) == (
        f"cannot pull {repo_id}@main: repo {repo_id} not found on {hub_env.url} (no token was sent); "
        "check the id, and if the repo is private pass a valid `token`, "
        "set HF_TOKEN, or run `hf auth login` with access to it"
    )
    with pytest.raises(HubRepoNotFoundError, match="with the token you passed"):
        pull_delta(repo_id, token=hub_env.other_token, cache_dir=tmp_path / "c2")
    with pytest.raises(HubAuthError, match=r"rejected the token \(invalid or expired\)") as err:
        pull_delta(repo_id, token="hf_wrong_token_123", cache_dir=tmp_path / "c3")
    assert isinstance(err.value, PermissionError) and err.value.repo_id == repo_id
    for c in ("c1", "c2", "c3"):
        assert not list((tmp_path / c).rglob("*.safetensors"))

    # Writing: someone else's namespace, no token, a wrong token; and --private onto an existing public repo.
    with pytest.raises(HubAuthError, match=f"the token has no write access to {repo_id}"):
        push_delta(folder, repo_id, token=hub_env.other_token)
    with pytest.raises(HubAuthError, match="needs a token for this and no token was sent"):
        push_delta(folder, hub_env.new_repo_id(), token=False)
    with pytest.raises(HubAuthError, match="rejected the token"):
        push_delta(folder, hub_env.new_repo_id(), token="hf_wrong_token_123")
    public = hub_env.new_repo_id("public")
    hub_env.api.create_repo(public)
    with pytest.raises(HubError, match="the repo exists and is public"):
        push_delta(folder, public, private=True)
    assert files_at(hub_env, public) == [".gitattributes"]


def test_missing_repo_revision_files_and_not_a_delta(hub_env, tmp_path):
    api = hub_env.api
    missing = hub_env.new_repo_id("missing")
    with pytest.raises(HubRepoNotFoundError, match=f"cannot pull {missing}@main: repo {missing} not found"):
        pull_delta(missing, local_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()

    repo_id = hub_env.new_repo_id("shards")
    push_delta(saved(tmp_path, "d", max_shard_size=4000), repo_id)
    with pytest.raises(HubRevisionNotFoundError, match="has no branch, tag or commit 'nope'") as err:
        pull_delta(repo_id, revision="nope", local_dir=tmp_path / "out")
    assert err.value.revision == "nope" and isinstance(err.value, LookupError)
    with pytest.raises(HubRevisionNotFoundError):
        load_delta(f"{repo_id}@{'0' * 40}")

    # A shard deleted on the Hub: the format check names the repo and the missing file.
    shard = next(f for f in files_at(hub_env, repo_id) if f.startswith("delta-00002"))
    api.delete_file(shard, repo_id)
    with pytest.raises(
        DeltaFormatError, match=f"{shard}: listed in delta.safetensors.index.json but missing"
    ) as err:
        pull_delta(repo_id, local_dir=tmp_path / "out")
    assert f"{repo_id}@main (commit " in str(err.value)
    assert not (tmp_path / "out").exists()

    model_repo = hub_env.new_repo_id("a-model")
    api.create_repo(model_repo)
    api.upload_file(
        path_or_fileobj=b'{"model_type": "llama"}', path_in_repo="config.json", repo_id=model_repo
    )
    with pytest.raises(
        NotADeltaError, match=f"{model_repo}@main is not a deltahub delta: it has no delta_config.json"
    ):
        load_delta(model_repo)

    # A string that is neither a local path nor a Hub id keeps the old message; a Hub miss mentions both.
    with pytest.raises(FileNotFoundError, match=r"no delta at '\./nowhere'"):
        load_delta("./nowhere")
    with pytest.raises(HubRepoNotFoundError, match=f"no local path '{missing}' exists either"):
        load_delta(missing)


def test_model_card_is_valid_hub_metadata(hub_env, tmp_path):
    delta = make_delta().replace(provenance={"algorithm": "RigL", "steps": 100}, base_revision="abc123")
    repo_id = hub_env.new_repo_id("card")
    push_delta(delta, repo_id, license="apache-2.0")
    text = (pull_delta(repo_id) / "README.md").read_text()
    card = ModelCard(text)
    card.validate()  # POSTs to the server's /api/validate-yaml (constants.ENDPOINT points there)
    assert card.data.library_name == "deltahub" and card.data.base_model == BASE_ID
    assert card.data.tags == ["deltahub", "sparse-delta", "rigl"] and card.data.license == "apache-2.0"
    info = hub_env.api.model_info(repo_id)  # what the Hub indexed from the front matter
    assert info.library_name == "deltahub" and info.card_data["base_model"] == BASE_ID
    assert f"deltahub.load_model(deltas=['{repo_id}'])" in text
    assert f"deltahub.load_model('{BASE_ID}', deltas=['{repo_id}'], revision='abc123')" in text
    assert f"deltahub merge {BASE_ID}@abc123 {repo_id} --out merged" in text
    assert "- base model: `tiny/llama` at revision `abc123`" in text and '"steps": 100' in text
    name, p = next(iter(delta.items()))
    assert f"| `{name}` | {'x'.join(map(str, p.shape))} | {p.nnz:,} | {p.density:.4g} |" in text

    # A base known only by a local path is not a Hub id: no base_model, and the card still validates.
    local = make_delta().replace(base_model="./models/my base")
    folder = save_delta(local, tmp_path / "local-base")
    ModelCard((folder / "README.md").read_text()).validate()
    assert "base_model" not in ModelCard((folder / "README.md").read_text()).data.to_dict()
    # A hand-written README is the author's: pushed as is.
    (folder / "README.md").write_text("---\nlibrary_name: deltahub\n---\n# My delta\n")
    own = hub_env.new_repo_id("own-card")
    push_delta(folder, own)
    assert (pull_delta(own) / "README.md").read_text().endswith("# My delta\n")


def test_load_model_with_a_hub_reference(hub_env, tmp_path, base_folder):
    folder = saved(tmp_path, "d", seed=5)
    repo_id = hub_env.new_repo_id("apply")
    result = push_delta(folder, repo_id)
    hub_env.api.create_tag(repo_id, tag="v1")
    push_delta(saved(tmp_path, "later", seed=6), repo_id)  # main moves on; v1 stays

    from_hub = load_model(str(base_folder), deltas=[f"{repo_id}@v1"])
    local = load_model(str(base_folder), deltas=[folder])
    base = load_model(str(base_folder))
    for name, tensor in local.state_dict().items():
        assert torch.equal(from_hub.state_dict()[name], tensor), name
    assert any(not torch.equal(base.state_dict()[n], t) for n, t in local.state_dict().items())
    origin = from_hub.applied_deltas.deltas[0].origin
    assert origin["repo_id"] == repo_id and origin["revision"] == "v1" and origin["commit"] == result.sha


def test_offline_mode_serves_the_cache(hub_env, tmp_path, monkeypatch):
    repo_id = hub_env.new_repo_id("offline")
    first = push_delta(saved(tmp_path, "d", seed=1), repo_id)
    hub_env.api.create_tag(repo_id, tag="v1")
    cached = pull_delta(repo_id, revision="v1")

    requests_before = len(hub_env.server.log_lines)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    assert pull_delta(repo_id, revision="v1") == cached
    delta = load_delta(f"{repo_id}@v1")
    assert delta.equal(make_delta(1)) and delta.origin["commit"] == first.sha
    assert load_delta(f"{repo_id}@{first.sha}").origin["path"] == str(cached)
    with pytest.raises(HubConnectionError, match="is not in the local cache and offline mode is on"):
        pull_delta(repo_id, revision="other")
    with pytest.raises(HubConnectionError, match="needs the network and offline mode is on"):
        push_delta(tmp_path / "d", repo_id)
    assert len(hub_env.server.log_lines) == requests_before  # not one request reached the server
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert pull_delta(repo_id, revision="v1", local_files_only=True) == cached


def test_unreachable_hub(hub_env, tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = f"http://127.0.0.1:{port}"
    repo_id = hub_env.new_repo_id()
    with pytest.raises(HubConnectionError, match=f"the Hub at {dead} cannot be reached") as err:
        pull_delta(repo_id, endpoint=dead, local_dir=tmp_path / "out")
    assert "no copy is in the local cache" in str(err.value) and isinstance(err.value, ConnectionError)
    assert not (tmp_path / "out").exists()
    with pytest.raises(
        HubConnectionError, match=f"cannot push {repo_id}@main: the Hub at {dead} cannot be reached"
    ):
        push_delta(saved(tmp_path, "d"), repo_id, endpoint=dead)


def test_pull_out_folder_is_atomic_and_never_clobbered(hub_env, tmp_path):
    folder = saved(tmp_path, "d", max_shard_size=4000)
    repo_id = hub_env.new_repo_id("out")
    push_delta(folder, repo_id)
    out = pull_delta(repo_id, local_dir=tmp_path / "copy")
    assert out == tmp_path / "copy" and delta_bytes(out) == delta_bytes(folder)
    assert not any(p.is_symlink() for p in out.iterdir())  # real files, not links into the cache
    (out / "delta_config.json").write_text("{}")
    with pytest.raises(DeltaExistsError, match="already exists and is not empty"):
        pull_delta(repo_id, local_dir=out)
    assert (out / "delta_config.json").read_text() == "{}"
    pull_delta(repo_id, local_dir=out, overwrite=True)
    assert delta_bytes(out) == delta_bytes(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "d"]  # no temporary folders left behind


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deltahub.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


SECRETS = ["hf_test_alice_0123456789", "hf_wrong_token_123"]  # conftest's HUB_TOKEN and a wrong one


def assert_no_secret(text: str) -> None:
    assert not any(s in text for s in SECRETS)


def test_cli_push_and_pull_as_subprocesses(hub_env, tmp_path):
    """What a user runs: separate processes configured only by environment variables and options."""
    assert hub_env.token == SECRETS[0]
    folder = saved(tmp_path, "d", seed=4)
    repo_id = hub_env.new_repo_id("cli")
    # HF_ENDPOINT, HF_HUB_DISABLE_XET=1 and HF_HOME (a temp folder) come from the fixtures' environment.
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    assert env["HF_ENDPOINT"] == hub_env.url and env["HF_HUB_DISABLE_XET"] == "1"

    push = _cli(
        "push", str(folder), repo_id, "--private", "-m", "from the CLI", "--token", hub_env.token, env=env
    )
    assert push.returncode == 0, push.stderr
    sha = hub_env.api.list_repo_commits(repo_id)[0].commit_id
    assert push.stdout.splitlines()[0] == f"pushed {folder} to {repo_id}@main: commit {sha}"
    assert hub_env.api.model_info(repo_id).private

    out = tmp_path / "pulled"
    pull = _cli("pull", f"{repo_id}@main", "--out", str(out), "--token", hub_env.token, env=env)
    assert pull.returncode == 0, pull.stderr
    assert pull.stdout.strip().splitlines()[-1] == str(out) and delta_bytes(out) == delta_bytes(folder)

    # --quiet: no bar from deltahub, huggingface_hub (uploads, "Fetching N files") or transformers; pull still
    # prints its one result, the folder
    changed = saved(tmp_path, "d2", seed=5)  # a real change: an unchanged push makes the client log a note
    quiet_push = _cli("push", str(changed), repo_id, "--quiet", "--token", hub_env.token, env=env)
    assert quiet_push.returncode == 0 and quiet_push.stdout == "" and quiet_push.stderr == ""
    quiet_pull = _cli(
        "pull", repo_id, "--out", str(tmp_path / "quiet"), "--quiet", "--token", hub_env.token, env=env
    )
    assert quiet_pull.returncode == 0 and quiet_pull.stderr == ""
    assert quiet_pull.stdout == f"{tmp_path / 'quiet'}\n"
    loud_pull = _cli("pull", repo_id, "--out", str(tmp_path / "loud"), "--token", hub_env.token, env=env)
    assert "Fetching" in loud_pull.stderr  # what --quiet silenced: huggingface_hub's own bar

    # No token: the private repo is invisible. One `error:` line, exit code 3, no traceback, nothing written.
    home = tmp_path / "fresh-home"  # no cached copy (one would be served when the Hub refuses)
    fresh = {**env, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub")}
    missing = _cli("pull", repo_id, "--out", str(tmp_path / "x"), env=fresh)
    assert missing.returncode == 3
    assert missing.stderr.strip().splitlines() == [
        f"error: cannot pull {repo_id}@main: repo {repo_id} not found on {hub_env.url} (no token was found); "
        "check the id, and if the repo is private pass a valid --token, set HF_TOKEN, or "
        "run `hf auth login` with access to it"
    ]
    assert not (tmp_path / "x").exists()

    # The token never shows up: not in any output, not in any file the runs wrote (caches, out folder).
    for proc in [push, pull, missing]:
        assert_no_secret(proc.stdout + proc.stderr)
    for root in [Path(env["HF_HOME"]), home, out]:
        for path in root.rglob("*"):
            if path.is_file():
                assert not any(s.encode() in path.read_bytes() for s in SECRETS), path


def test_cli_errors_and_help(hub_env, tmp_path, monkeypatch):
    """The same commands in-process (CliRunner) for the remaining exit codes and messages: no process start."""
    from click.testing import CliRunner

    from deltahub.cli import main

    folder = saved(tmp_path, "d", seed=4)
    repo_id = hub_env.new_repo_id("cli-errors")
    push_delta(folder, repo_id, private=True)
    runner = CliRunner()

    ok = runner.invoke(main, ["pull", repo_id])  # HF_TOKEN from the environment (hub_env sets it)
    assert ok.exit_code == 0, ok.output
    assert Path(ok.stdout.strip().splitlines()[-1]) == pull_delta(repo_id)
    out = tmp_path / "out"
    (out / "keep.txt").parent.mkdir()
    (out / "keep.txt").write_text("mine")
    exists = runner.invoke(main, ["pull", repo_id, "--out", str(out)])
    assert exists.exit_code == 4
    assert exists.stderr == f"error: {out} already exists and is not empty; pass --overwrite to replace it\n"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    monkeypatch.setattr(
        constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache")
    )  # nothing cached to fall back on
    wrong = runner.invoke(main, ["pull", repo_id, "--token", "hf_wrong_token_123"])
    assert wrong.exit_code == 7
    assert (
        wrong.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"error: cannot pull {repo_id}@main: {hub_env.url} rejected the token (invalid or expired); pass a valid"
        )
    )
    denied = runner.invoke(main, ["push", str(folder), repo_id, "--token", hub_env.other_token])
    assert denied.exit_code == 7 and "the token has no write access to" in denied.stderr
    bad_ref = runner.invoke(main, ["pull", "not-a-repo-id"])
    assert bad_ref.exit_code == 2 and "expected a Hub repo id like 'org/name'" in bad_ref.stderr
    for result in [ok, exists, wrong, denied, bad_ref]:
        assert_no_secret(result.output)

    for verb in ("push", "pull"):
        result = runner.invoke(main, [verb, "--help"])
        assert result.exit_code == 0 and "Examples:" in result.output and f"deltahub {verb} " in result.output
