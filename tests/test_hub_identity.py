"""Deltas on the (loopback) Hub: real ids and no local paths in what is pushed, cards the Hub links, the id-only
load of a delta and its recorded base, and the one loader online and offline. The real huggingface_hub client
talks to deltahub's loopback server over HTTP (see conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants, snapshot_download
from huggingface_hub.utils import validate_repo_id
from tiny import random_delta, tiny_llama, tokens

import deltahub
from deltahub import UnconvertedAdapterError, load_delta, push_delta, save_delta
from training import SftAdamW, SftConfig, SftSelector, get_sft_model


@pytest.fixture
def local_base(tmp_path) -> Path:
    folder = tmp_path / "models" / "my-base"
    tiny_llama().save_pretrained(folder)
    return folder


def upload_base(hub_env, folder: Path) -> tuple[str, str]:
    repo = hub_env.new_repo_id("tiny-base")
    hub_env.api.create_repo(repo)
    return repo, hub_env.api.upload_folder(repo_id=repo, folder_path=str(folder)).oid


def trained_from(folder: Path, steps: int = 3):
    """An SFT delta trained from a local base folder: it records that folder as its base."""
    from transformers import AutoModelForCausalLM

    model = get_sft_model(AutoModelForCausalLM.from_pretrained(folder), SftConfig(density=0.05, seed=1))
    optimizer = SftAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    selector = SftSelector(model, optimizer, total_update_steps=steps)
    for _ in range(steps):
        x = tokens(4, 16)
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        selector.step()
    return model.to_delta()


def every_pushed_file(hub_env, repo_id: str, tmp_path: Path) -> dict[str, bytes]:
    folder = Path(snapshot_download(repo_id, cache_dir=tmp_path / "grep-cache", endpoint=hub_env.url))
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_push_names_the_base_by_id_and_uploads_no_local_path(hub_env, tmp_path, local_base):
    trained = trained_from(local_base)
    assert trained.base_model == str(local_base)  # recorded locally, as given to from_pretrained
    provenance = {**trained.provenance, "data": str(tmp_path / "train.txt")}
    folder = save_delta(trained.replace(provenance=provenance), tmp_path / "delta")
    repo = hub_env.new_repo_id("from-local")
    result = push_delta(folder, repo, base_model="alice/tiny-base@v1")
    assert result.notes == (
        f"provenance named local paths {str(tmp_path / 'train.txt')!r}: left out of the pushed files",
    )

    files = every_pushed_file(hub_env, repo, tmp_path)
    assert sorted(files) == [".gitattributes", "README.md", "delta.safetensors", "delta_config.json"]
    for name, data in files.items():  # grep every pushed file for the local folders
        for local in (str(local_base), str(tmp_path), local_base.name):
            assert local.encode() not in data, (name, local)
    card = ModelCard(files["README.md"].decode())
    card.validate()
    assert card.data.base_model == "alice/tiny-base" and card.data.base_model_relation == "adapter"
    assert hub_env.api.model_info(repo).card_data["base_model_relation"] == "adapter"
    config = json.loads(files["delta_config.json"])
    assert (config["base_model"], config["base_revision"]) == ("alice/tiny-base", "v1")
    pulled = load_delta(repo)
    assert pulled.base_model == "alice/tiny-base" and pulled.provenance["data"] is None
    assert all(pulled[n].equal(trained[n]) for n in trained)

    # Without an id: the local base is dropped, said in one line, and the card has no base_model.
    bare = hub_env.new_repo_id("no-id")
    with pytest.warns(UserWarning, match="is a local path: left out of the pushed files"):
        result = push_delta(trained, bare)
    assert len(result.notes) == 1 and "--base-model ID[@REV]" in result.notes[0]
    files = every_pushed_file(hub_env, bare, tmp_path)
    assert not any(str(local_base).encode() in data for data in files.values())
    assert "base_model" not in ModelCard(files["README.md"].decode()).data.to_dict()


def test_a_hand_written_card_with_a_local_path_is_not_uploaded(hub_env, tmp_path, local_base):
    folder = save_delta(trained_from(local_base, steps=1), tmp_path / "delta")
    (folder / "README.md").write_text(f"---\nlibrary_name: deltahub\n---\nTrained on {local_base}\n")
    repo = hub_env.new_repo_id("hand")
    with pytest.raises(ValueError, match=r"README\.md mentions the local path .*my-base.*edit that file"):
        push_delta(folder, repo, base_model="alice/tiny-base")
    assert not hub_env.api.repo_exists(repo)  # refused before anything was sent


def test_re_push_keeps_the_hub_cards_metadata(hub_env, tmp_path):
    delta = random_delta(tiny_llama(), seed=1, base_model="alice/tiny-base")
    repo = hub_env.new_repo_id("keep")
    push_delta(delta, repo, license="apache-2.0")
    card = ModelCard.load(repo)
    card.data.tags = [*card.data.tags, "math"]
    card.data.datasets = ["alice/math-problems"]
    hub_env.api.upload_file(path_or_fileobj=str(card).encode(), path_in_repo="README.md", repo_id=repo)
    push_delta(random_delta(tiny_llama(), seed=2, base_model="alice/tiny-base"), repo)  # no license given
    data = ModelCard.load(repo).data
    assert data.license == "apache-2.0" and data.datasets == ["alice/math-problems"]
    assert data.tags == ["deltahub", "sparse-delta", "math"] and data.base_model == "alice/tiny-base"
    push_delta(delta, repo, license="mit")
    assert ModelCard.load(repo).data.license == "mit"
    push_delta(delta, repo, keep_card_metadata=False)
    fresh = ModelCard.load(repo).data.to_dict()
    assert (
        "license" not in fresh and "datasets" not in fresh and fresh["tags"] == ["deltahub", "sparse-delta"]
    )


def test_load_delta_by_commit_online_then_offline_from_the_cache(hub_env, tmp_path, monkeypatch):
    delta = random_delta(tiny_llama(), seed=3, base_model="alice/tiny-base")
    repo = hub_env.new_repo_id("pinned")
    sha = push_delta(delta, repo).sha
    push_delta(random_delta(tiny_llama(), seed=4), repo)  # main moves on
    online = load_delta(f"{repo}@{sha}")
    assert online.equal(delta) and online.origin["commit"] == sha
    assert load_delta(repo, revision=sha).equal(delta)
    requests = len(hub_env.server.log_lines)
    assert load_delta(f"{repo}@{sha}").equal(delta)  # a cached commit: not one request
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    offline = load_delta(f"{repo}@{sha}")
    assert offline.equal(delta) and offline.origin == online.origin
    assert len(hub_env.server.log_lines) == requests


def test_load_model_by_the_delta_id_alone_loads_the_recorded_base(hub_env, tmp_path, local_base):
    base_repo, commit = upload_base(hub_env, local_base)
    delta = random_delta(tiny_llama(), seed=5, scale=0.5).replace(base_model=base_repo, base_revision=commit)
    repo = hub_env.new_repo_id("id-only")
    push_delta(delta, repo)
    explicit = deltahub.load_model(str(local_base), [repo])
    by_id = deltahub.load_model(deltas=[repo])
    assert by_id.name_or_path == base_repo
    for name, t in explicit.state_dict().items():
        assert torch.equal(by_id.state_dict()[name], t), name
    x = tokens()
    with torch.no_grad():
        assert torch.equal(by_id(x).logits, explicit(x).logits)
        assert not torch.equal(by_id(x).logits, deltahub.load_model(str(local_base))(x).logits)
    # merge with no base: the same weights as naming the base
    plain = deltahub.merge(deltas=[repo], out=tmp_path / "by-id", progress=False)
    named = deltahub.merge(str(local_base), [repo], out=tmp_path / "named", progress=False)
    assert plain.plan.base == base_repo and plain.plan.base_revision == commit
    for f in named.out.glob("*.safetensors"):
        assert (plain.out / f.name).read_bytes() == f.read_bytes()
    # the recorded base is still checked: a delta that records this id but was made on other weights fails
    liar = random_delta(tiny_llama(seed=1), seed=5).replace(base_model=base_repo)
    with pytest.raises(deltahub.BaseMismatchError, match="made on a different base"):
        deltahub.load_model(deltas=[liar])


def test_the_merged_card_passes_the_hubs_metadata_checks(hub_env, tmp_path, local_base):
    base_repo, commit = upload_base(hub_env, local_base)
    deltas = []
    for seed in (1, 2):
        repo = hub_env.new_repo_id(f"d{seed}")
        push_delta(random_delta(tiny_llama(), seed=seed, base_model=base_repo), repo)
        deltas.append(repo)
    local = save_delta(
        random_delta(tiny_llama(), seed=3, base_model=str(local_base)), tmp_path / "local-delta"
    )
    for base in (f"{base_repo}@{commit}", str(local_base)):  # a Hub base, and a local copy the deltas name
        out = deltahub.merge(
            base, [*deltas, local], out=tmp_path / "merged", overwrite=True, progress=False
        ).out
        card = ModelCard((out / "README.md").read_text())
        card.validate()  # the server's /api/validate-yaml, through huggingface_hub
        assert card.data.base_model == [base_repo, *deltas] and card.data.base_model_relation == "merge"
        for model_id in card.data.base_model:
            validate_repo_id(model_id)  # huggingface_hub's own id rules: no local path can pass
        assert str(local_base) not in card.data.to_yaml()
    # merged with force, the deltas' recorded base was not verified, so it is not claimed
    out = deltahub.merge(str(local_base), [local], out=tmp_path / "forced", force=True, progress=False).out
    assert "base_model" not in ModelCard((out / "README.md").read_text()).data.to_dict()


def test_a_hub_repo_holding_a_fork_adapter_names_deltahub_convert(hub_env, tmp_path):
    repo = hub_env.new_repo_id("fork-adapter")
    hub_env.api.create_repo(repo)
    hub_env.api.upload_file(
        path_or_fileobj=b'{"peft_type": "SFT"}', path_in_repo="adapter_config.json", repo_id=repo
    )
    with pytest.raises(
        UnconvertedAdapterError, match=rf"{repo} holds a peft adapter.*`deltahub convert {repo} --out"
    ):
        load_delta(repo)
