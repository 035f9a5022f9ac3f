"""The CLI side of issue 14: merge across base names and --force, merge and push with real ids, convert, and
the error that names `deltahub convert`. In-process (CliRunner) where that is enough; the train-and-push flow a
user runs is a real subprocess against the loopback Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard, snapshot_download
from safetensors.torch import save_file
from tiny import random_delta, save_char_tokenizer, tiny_llama, tokens

import deltahub
from deltahub import load_delta, push_delta, save_delta
from deltahub.cli import main


def cli(*args, code: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output + (result.stderr or "")
    return result


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli-identity") / "models" / "base"
    tiny_llama().save_pretrained(folder)
    save_char_tokenizer(folder)
    return folder


def test_merge_across_base_names_and_force(tmp_path, base):
    model = tiny_llama()
    d1 = save_delta(random_delta(model, seed=1, base_model="./models/base"), tmp_path / "d1")
    d2 = save_delta(random_delta(model, seed=2, base_model="alice/tiny-base"), tmp_path / "d2")
    cli("merge", base, d1, d2, "--out", tmp_path / "merged", "-q")
    composed = deltahub.load_model(str(base), [d1, d2])
    merged = deltahub.load_model(str(tmp_path / "merged"))
    with torch.no_grad():
        assert torch.equal(composed(tokens()).logits, merged(tokens()).logits)

    other = save_delta(
        random_delta(tiny_llama(seed=1), seed=3, base_model="alice/tiny-base"), tmp_path / "d3"
    )
    refused = cli("merge", base, d1, other, "--out", tmp_path / "x", code=6)
    assert "these deltas were made on different base weights" in refused.stderr
    assert "model.layers.0.self_attn.q_proj.weight: delta 1" in refused.stderr
    cli("merge", base, d1, other, "--out", tmp_path / "forced", "--force", "-q")
    assert (tmp_path / "forced" / "model.safetensors").is_file()


def test_every_verb_names_deltahub_convert_for_a_fork_folder(tmp_path, base):
    fork = tmp_path / "fork"
    fork.mkdir()
    (fork / "adapter_config.json").write_text(
        json.dumps({"peft_type": "SFT", "base_model_name_or_path": str(base)})
    )
    idx = torch.tensor([7, 3, 100], dtype=torch.int32)
    vals = torch.tensor([0.5, -0.25, 1.0])
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.sft_delta.indices": idx,
            "base_model.model.model.layers.0.self_attn.q_proj.sft_delta.values": vals,
        },
        str(fork / "adapter_model.safetensors"),
    )
    hint = f"`deltahub convert {fork} --out fork-delta`"
    for args in (["inspect", fork], ["merge", base, fork, "--out", tmp_path / "m"], ["merge", fork, "--out", tmp_path / "m"],
                 ["push", fork, "alice/never"]):  # fmt: skip
        result = cli(*args, code=5)
        assert hint in result.stderr and result.stderr.count("\n") == 1, args
    done = cli("convert", fork, "--out", tmp_path / "converted")
    assert f"converted sft-fork {fork}: 1 parameters, nnz 3" in done.output
    delta = load_delta(tmp_path / "converted")
    assert delta["model.layers.0.self_attn.q_proj.weight"].indices.tolist() == [3, 7, 100]
    expected = tiny_llama().state_dict()["model.layers.0.self_attn.q_proj.weight"].clone()
    expected.view(-1)[idx.long()] += vals
    merged = cli("merge", tmp_path / "converted", "--out", tmp_path / "merged", "-q")  # base it records
    assert merged.exit_code == 0
    got = deltahub.load_model(str(tmp_path / "merged")).state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(got, expected)


def test_convert_a_lora_adapter_reports_the_error(tmp_path, base):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(tmp_path / "lora")
    result = cli("convert", tmp_path / "lora", "--density", "0.25", "--out", tmp_path / "d", "-q")
    assert result.output == ""
    result = cli("convert", tmp_path / "lora", "--density", "0.25", "--out", tmp_path / "d", "--overwrite")
    error = load_delta(tmp_path / "d").provenance["relative_error"]
    assert f"relative error dropped {error:.4g}" in result.output and 0 < error < 1
    assert cli("convert", tmp_path / "lora", "--out", tmp_path / "e", code=2).stderr.startswith(
        "error: give exactly one of density"
    )


def test_merge_by_the_delta_id_alone(hub_env, tmp_path, base):
    repo_base = hub_env.new_repo_id("tiny-base")
    hub_env.api.create_repo(repo_base)
    commit = hub_env.api.upload_folder(repo_id=repo_base, folder_path=str(base)).oid
    repo = hub_env.new_repo_id("delta")
    push_delta(random_delta(tiny_llama(), seed=4).replace(base_model=repo_base, base_revision=commit), repo)
    cli("merge", repo, "--out", tmp_path / "by-id", "-q")
    cli("merge", base, repo, "--out", tmp_path / "named", "-q")
    for f in (tmp_path / "named").glob("*.safetensors"):
        assert (tmp_path / "by-id" / f.name).read_bytes() == f.read_bytes()
    data = ModelCard((tmp_path / "by-id" / "README.md").read_text()).data
    assert data.base_model == [repo_base, repo] and data.base_model_relation == "merge"


@pytest.mark.slow
def test_train_locally_then_push_with_base_model_leaves_no_local_path(hub_env, tmp_path, base):
    """What a user runs: `deltahub train` on a local folder, `deltahub push --base-model`, separate processes."""
    text = tmp_path / "data.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    env = dict(os.environ)

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "deltahub.cli", *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc

    run("train", base, text, "--out", tmp_path / "delta", "--steps", 4, "--density", 0.05, "--seq-len", 32,
        "--batch-size", 4, "--quiet")  # fmt: skip
    assert load_delta(tmp_path / "delta").base_model == str(base)  # recorded locally
    repo = hub_env.new_repo_id("trained")
    pushed = run("push", tmp_path / "delta", repo, "--base-model", "alice/tiny-base@main", "--license", "mit")
    assert "note:" not in pushed.stderr
    folder = Path(snapshot_download(repo, cache_dir=tmp_path / "grep", endpoint=hub_env.url))
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert {"README.md", "delta_config.json", "delta.safetensors"} <= set(files)
    for name, data in files.items():
        for local in (str(base), str(tmp_path), "models/base"):
            assert local.encode() not in data, (name, local)
    card = ModelCard(files["README.md"].decode())
    card.validate()
    assert (card.data.base_model, card.data.base_model_relation, card.data.license) == (
        "alice/tiny-base",
        "adapter",
        "mit",
    )

    # again without --base-model and --license: the local base is dropped in one note, the license stays
    again = run("push", tmp_path / "delta", repo)
    notes = [line for line in again.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "is a local path: left out of the pushed files" in notes[0]
    card = ModelCard.load(repo)
    assert card.data.license == "mit" and "base_model" not in card.data.to_dict()
    assert str(base) not in card.content
