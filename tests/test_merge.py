"""The streaming deployment merge (deltahub.merge) on tiny real models saved with save_pretrained."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from tiny import random_delta, tiny_gpt2, tiny_llama, tokens
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import deltahub
from deltahub import (
    BaseMismatchError,
    DeltaExistsError,
    DeltaFormatError,
    OutOfSpaceError,
    ParamDelta,
    SparseDelta,
    merge,
    save_delta,
)
from deltahub.fingerprint import fingerprint_of
from deltahub.merging.config import MergeConfig

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def save_tokenizer(folder: Path) -> None:
    """A real fast tokenizer built offline (WordLevel over 64 words) with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(63)} | {"[UNK]": 63}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def make_base(
    root: Path, dtype: torch.dtype = torch.bfloat16, shard: str = "20KB", gpt2: bool = False, seed: int = 0
):
    """A tiny model saved in shards with a tokenizer; returns (folder, model)."""
    model = tiny_gpt2(dtype, seed) if gpt2 else tiny_llama(dtype, seed)
    folder = root / ("gpt2" if gpt2 else "base" if seed == 0 else f"base-{seed}")
    model.save_pretrained(folder, max_shard_size=shard)
    save_tokenizer(folder)
    return folder, model


def make_deltas(root: Path, model, seeds=(1, 2), density: float = 0.1) -> list[Path]:
    paths = []
    for seed in seeds:
        path = root / f"delta-{seed}"
        save_delta(random_delta(model, density, seed=seed, scale=0.05), path)
        paths.append(path)
    return paths


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    out = {}
    for file in files:
        with safe_open(str(folder / file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture
def setup(tmp_path):
    base, model = make_base(tmp_path)
    return tmp_path, base, model, make_deltas(tmp_path, model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merged_tensors_equal_a_float32_reference_rounded_once_and_untouched_are_byte_identical(
    tmp_path, dtype
):
    base, model = make_base(tmp_path, dtype)
    paths = make_deltas(tmp_path, model)
    weights = [1.0, -0.7]
    result = merge(base, paths, weights=weights, out=tmp_path / "out", max_shard_size="20KB", progress=False)
    before, after = tensors_of(base), tensors_of(result.out)
    assert set(before) == set(after)
    deltas = [deltahub.load_delta(p) for p in paths]
    touched = set().union(*deltas)
    for name, w in before.items():
        if name not in touched:
            assert raw(after[name]) == raw(w), name
            continue
        acc = torch.zeros(w.shape, dtype=torch.float32)
        magnitude = w.float().abs()  # the largest operand at each position, for the float32 error bound below
        for d, wt in zip(deltas, weights, strict=True):
            if name in d:
                acc.add_(d.dense(name), alpha=wt)
                magnitude = torch.maximum(magnitude, (wt * d.dense(name)).abs())
        reference = (w.float() + acc).to(dtype)  # float32 sum, one rounding
        if dtype != torch.float32:
            assert raw(after[name]) == raw(reference), name
        else:
            # A float32 base has no coarser dtype to round into: the combined value and the sum are each rounded
            # in float32 (and index_add may fuse the multiply-add), so allow two ulps of the largest operand.
            _, exp = torch.frexp(torch.maximum(magnitude, acc.abs()))
            ulp = torch.ldexp(torch.ones_like(reference), exp - 24)
            assert bool(((after[name] - reference).abs() <= 2 * ulp).all()), name
        assert not torch.equal(after[name], w)
    assert result.nnz and set(result.nnz) == touched


@pytest.mark.parametrize(
    ("method", "options", "dtype"),
    [
        ("sum", {}, None),
        ("ties", {"density": 0.5}, None),
        ("dare", {"density": 0.6, "seed": 3}, None),
        ("magnitude", {"density": 0.3}, "float32"),
        ("sum", {}, "float16"),
    ],
)
def test_output_loads_with_plain_transformers_and_matches_load_model(setup, method, options, dtype):
    root, base, _, paths = setup
    weights = [1.0, -0.5]
    out = merge(
        base, paths, weights=weights, method=method, method_options=options, dtype=dtype, out=root / "out",
        progress=False,
    ).out  # fmt: skip
    torch_dtype = {None: torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch_dtype
    composed = deltahub.load_model(
        base, paths, weights=weights, method=method, method_options=options, dtype=torch_dtype
    )
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
    x = tokens()
    with torch.no_grad():
        got, want, base_logits = merged(x).logits, composed(x).logits, plain(x).logits
    assert torch.equal(got, want)
    assert not torch.equal(got, base_logits)
    for name, t in composed.state_dict().items():
        assert torch.equal(merged.state_dict()[name], t), name


def test_tied_weights_alias_is_changed_once_and_matches_load_model(tmp_path):
    base, model = make_base(tmp_path, torch.float32, shard="5GB", gpt2=True)
    # GPT-2 stores only transformer.wte.weight; a delta made on the live model may name the tied lm_head.weight
    state = {"lm_head.weight": model.lm_head.weight.detach()}
    idx = torch.arange(0, state["lm_head.weight"].numel(), 7)
    p = ParamDelta(idx, torch.randn(idx.numel()) * 0.1, tuple(model.lm_head.weight.shape), torch.float32)
    path = tmp_path / "tied-delta"
    save_delta(SparseDelta({"lm_head.weight": p}, fingerprint=fingerprint_of(state)), path)
    out = merge(base, [path], out=tmp_path / "out", progress=False).out
    merged = AutoModelForCausalLM.from_pretrained(out)
    composed = deltahub.load_model(base, [path])
    x = tokens()
    with torch.no_grad():
        assert torch.equal(merged(x).logits, composed(x).logits)
    assert "lm_head.weight" not in tensors_of(out)


def test_sharding_and_index_at_a_small_max_shard_size(setup):
    root, base, _, paths = setup
    out = merge(base, paths, out=root / "out", max_shard_size="30KB", progress=False).out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 1
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    total = 0
    for file in files:
        with safe_open(str(out / file), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            names = list(f.keys())
            size = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in names)
        assert {k for k, v in index["weight_map"].items() if v == file} == set(names)
        assert size <= 30_000 or len(names) == 1
        total += size
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(tensors_of(base))
    single = merge(base, paths, out=root / "single", max_shard_size="5GB", progress=False).out
    assert sorted(p.name for p in single.glob("*.safetensors")) == ["model.safetensors"]
    assert not (single / "model.safetensors.index.json").exists()


def test_config_generation_config_tokenizer_and_chat_template_are_copied(setup):
    root, base, _, paths = setup
    out = merge(base, paths, out=root / "out", progress=False).out
    base_files, out_files = file_hashes(base), file_hashes(out)
    for name, digest in base_files.items():
        if not name.endswith(".safetensors") and name != "model.safetensors.index.json":
            assert out_files[name] == digest, name
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ):
        assert name in out_files, name
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("w1 w2 w3")["input_ids"] == [1, 2, 3]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<user>hi"
    # a dtype change is recorded in the config
    cast = merge(base, paths, out=root / "cast", dtype="float32", progress=False).out
    assert json.loads((cast / "config.json").read_text())["dtype"] == "float32"


def test_model_card_lists_the_base_and_every_delta_with_weight_and_method(setup):
    root, base, _, paths = setup
    out = merge(
        base, paths, weights=[0.5, -1.0], method="ties", method_options={"density": 0.4}, out=root / "out",
        progress=False,
    ).out  # fmt: skip
    card = (out / "README.md").read_text()
    data = ModelCard(card).data
    assert data.library_name == "transformers" and data.base_model_relation == "merge"
    # a local base is never the card's base_model (invalid on the Hub): the id the deltas record, verified
    assert data.base_model == ["tiny"] and str(base) not in data.to_yaml()
    for path, weight in zip(paths, ["0.5", "-1"], strict=True):
        assert f"| `{path}` | - | {weight} |" in card
    assert "Method: `ties` (options: density=0.4)" in card
    # the card quotes the merge.yaml the folder carries, and that file reads back to the merge's own config
    written = (out / "merge.yaml").read_text()
    assert f"```yaml\n{written}```" in card
    assert "method: ties" in written and "  density: 0.4" in written
    config = MergeConfig.from_yaml(out / "merge.yaml")
    assert config.method == "ties" and dict(config.options) == {"density": 0.4}
    assert [(d.path, d.weight) for d in config.deltas] == [(str(paths[0]), 0.5), (str(paths[1]), -1.0)]


def test_dry_run_writes_nothing_and_reports_the_plan(setup):
    root, base, _, paths = setup
    before = sorted(p.name for p in root.iterdir())
    result = merge(base, paths, out=root / "out", dry_run=True, max_shard_size="30KB", progress=False)
    assert result.out is None and result.dry_run
    assert sorted(p.name for p in root.iterdir()) == before
    plan = result.plan
    assert plan.overlap is not None and plan.overlap.num_deltas == 2
    assert {t.name for t in plan.touched} == set().union(*[deltahub.load_delta(p) for p in paths])
    text = str(plan)
    assert f"touched tensors: {len(plan.touched)} of 21" in text and "sign conflicts" in text
    assert f"in {len(plan.shards)} file(s)" in text
    assert plan.total_size == sum(t.numel() * t.element_size() for t in tensors_of(base).values())


def test_bad_inputs_fail_before_anything_is_written(setup):
    root, base, model, paths = setup
    bad = root / "bad-delta"  # a corrupt delta
    save_delta(random_delta(model, 0.1, seed=9), bad)
    (bad / "delta.safetensors").write_bytes(b"\x00" * 16)
    other, _ = make_base(root, seed=5)  # the wrong base: same names and shapes, other values
    stray = root / "stray"  # a delta for tensors the base does not have
    p = ParamDelta(torch.tensor([0, 3]), torch.tensor([1.0, 2.0]), (4, 4), torch.bfloat16)
    save_delta(SparseDelta({"model.layers.9.mlp.extra.weight": p}), stray)
    (root / "taken").mkdir()  # an existing, non-empty --out
    (root / "taken" / "keep.txt").write_text("mine")
    before = sorted(p.name for p in root.iterdir())
    base_hashes = file_hashes(base)

    with pytest.raises(DeltaFormatError, match="invalid deltahub delta"):
        merge(base, [paths[0], bad], out=root / "out", progress=False)
    with pytest.raises(BaseMismatchError, match="made on a different base"):
        merge(other, paths, out=root / "out", progress=False)
    with pytest.raises(BaseMismatchError, match=r"1 parameters not in the base, e\.g\. \['model\.layers\.9"):
        merge(base, [stray], out=root / "out", progress=False)
    with pytest.raises(DeltaExistsError, match="already exists and is not empty; pass overwrite=True"):
        merge(base, paths, out=root / "taken", progress=False)
    with pytest.raises(ValueError, match="is \\(or contains\\) the base model folder"):
        merge(base, paths, out=base, overwrite=True, progress=False)
    assert sorted(p.name for p in root.iterdir()) == before
    assert [p.name for p in (root / "taken").iterdir()] == ["keep.txt"]
    assert file_hashes(base) == base_hashes


def test_wrong_base_with_force_merges_anyway(setup):
    root, _, _, paths = setup
    other, _ = make_base(root, seed=5)
    with pytest.raises(BaseMismatchError):
        merge(other, paths, out=root / "out", progress=False)
    assert merge(other, paths, out=root / "out", force=True, progress=False).out.is_dir()


def test_overwrite_replaces_an_existing_output(setup):
    root, base, _, paths = setup
    out = merge(base, paths[:1], out=root / "out", progress=False).out
    first = file_hashes(out)
    merge(base, paths, out=out, overwrite=True, progress=False)
    assert file_hashes(out) != first
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []


def test_a_failure_mid_way_removes_the_temporary_folder(setup, monkeypatch):
    # The torch path (the fast one has its own test in test_fast_merge.py).
    root, base, _, paths = setup
    calls = []

    def failing(t, p, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(t, p, **kwargs)

    import deltahub.apply as a
    import deltahub.merging.fast as fast

    real = a.add_in_place
    monkeypatch.setattr(a, "add_in_place", failing)
    monkeypatch.setattr(fast, "eligible", lambda *args: False)
    before = file_hashes(base)
    with pytest.raises(RuntimeError, match="boom"):
        merge(base, paths, out=root / "out", progress=False)
    assert not (root / "out").exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []
    assert file_hashes(base) == before


def test_disk_full_is_a_clear_error_and_leaves_nothing(setup, monkeypatch):
    root, base, _, paths = setup
    import deltahub.merging.write as w

    real = w._write_all
    written = []

    def full(fd, data):
        written.append(len(data))
        if len(written) > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(w, "_write_all", full)
    monkeypatch.setattr(w._Copier, "__init__", lambda self: setattr(self, "kernel", False))
    with pytest.raises(
        OutOfSpaceError, match=r"not enough disk space for the merged model in .*: free some space"
    ):
        merge(base, paths, out=root / "out", progress=False)
    assert not (root / "out").exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []
    # and when the planned size does not fit, before writing anything
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    with pytest.raises(OutOfSpaceError, match=r"\(.* needed, 10 B free\)"):
        merge(base, paths, out=root / "out", progress=False)


@pytest.mark.slow
def test_a_stale_temporary_folder_of_a_dead_merge_is_removed(setup):
    root, base, _, paths = setup
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = root / f".out.merge-{dead.pid}-abcd1234"
    stale.mkdir()
    (stale / ".deltahub-merge-in-progress").write_text(
        json.dumps({"pid": dead.pid, "host": os.uname().nodename})
    )
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    alive = root / f".out.merge-{os.getpid()}-abcd1234"
    alive.mkdir()
    (alive / ".deltahub-merge-in-progress").write_text(
        json.dumps({"pid": os.getpid(), "host": os.uname().nodename})
    )
    merge(base, paths, out=root / "out", progress=False)
    assert not stale.exists()
    assert alive.exists()  # a merge still running (here: this process) is left alone


_KILL_SCRIPT = """
import sys, time
import deltahub.merging as m
import deltahub.merging.write as w
real = w._write_all
def slow(fd, data):
    real(fd, data)
    time.sleep(0.05)  # slow enough for the parent to see a shard and kill us mid-way
w._write_all = slow
m.merge(sys.argv[1], sys.argv[2:], out=sys.argv[1] + "-merged", max_shard_size="20KB", progress=False)
"""


@pytest.mark.slow
def test_a_merge_killed_mid_way_leaves_nothing_finished_and_the_base_untouched(setup):
    root, base, _, paths = setup
    before = file_hashes(base)
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(base), *map(str, paths)])
    deadline = time.monotonic() + 30
    tmp = None
    while time.monotonic() < deadline and proc.poll() is None:
        tmps = [p for p in root.iterdir() if p.name.startswith(".base-merged.merge-")]
        if tmps and any(tmps[0].glob("model-*.safetensors")):
            tmp = tmps[0]
            break
        time.sleep(0.01)
    assert tmp is not None, "the merge never wrote a shard"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "base-merged").exists()
    assert tmp.exists()  # hidden, and marked as in progress: nothing that looks finished
    assert (tmp / ".deltahub-merge-in-progress").exists() and not (tmp / "README.md").exists()
    assert file_hashes(base) == before
    # the next merge into the same place cleans it up
    merge(base, paths, out=root / "base-merged", max_shard_size="20KB", progress=False)
    assert not tmp.exists()
    assert (root / "base-merged" / "README.md").exists()


def test_a_hub_base_with_revision(hub_env, setup):
    root, base, _, paths = setup
    repo = hub_env.new_repo_id("tiny-base")
    hub_env.api.create_repo(repo)
    commit = hub_env.api.upload_folder(repo_id=repo, folder_path=str(base)).oid
    result = merge(f"{repo}@main", paths, out=root / "out", progress=False)
    local = merge(base, paths, out=root / "local", progress=False)
    assert tensors_of(result.out).keys() == tensors_of(local.out).keys()
    for name, t in tensors_of(local.out).items():
        assert raw(tensors_of(result.out)[name]) == raw(t)
    card = (result.out / "README.md").read_text()
    data = ModelCard(card).data
    assert data.base_model == [repo] and data.base_model_relation == "merge" and commit in card
    with pytest.raises(
        deltahub.errors.HubRevisionNotFoundError, match=r"cannot download the model .*@no-such-branch"
    ):
        merge(f"{repo}@no-such-branch", paths, out=root / "x", progress=False)
