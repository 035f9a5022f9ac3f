"""Checkpoint and as_tensor_source on folders written by transformers' save_pretrained."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny import tiny_gpt2, tiny_llama
from transformers import GPT2LMHeadModel

from deltahub.checkpoint import Checkpoint, StateDictSource, as_tensor_source
from deltahub.errors import CheckpointError, DeltahubError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(llama module, single-file folder, sharded folder, gpt2 module, gpt2 folder)."""
    root = tmp_path_factory.mktemp("ckpt")
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    llama.save_pretrained(root / "llama")
    llama.save_pretrained(root / "llama-sharded", max_shard_size="20KB")
    gpt2.save_pretrained(root / "gpt2")
    return llama, root / "llama", root / "llama-sharded", gpt2, root / "gpt2"


@pytest.mark.parametrize("which", ["single", "sharded"])
def test_checkpoint_reads_every_tensor_lazily_and_exactly(saved, which):
    llama, single, sharded, *_ = saved
    folder = single if which == "single" else sharded
    sd = llama.state_dict()
    with Checkpoint(folder) as ckpt:
        assert set(ckpt.keys()) == set(sd) and len(ckpt) == len(sd)
        assert "model.norm.weight" in ckpt and "nope" not in ckpt
        for name, tensor in sd.items():
            assert ckpt.shape(name) == tuple(tensor.shape)
            assert ckpt.dtype(name) == tensor.dtype
            assert torch.equal(ckpt.get(name), tensor)
            assert torch.equal(ckpt[name], tensor)
        assert ckpt.get("nope") is None  # Mapping semantics
        with pytest.raises(KeyError):
            ckpt["nope"]
        grouped = [n for names in ckpt.files.values() for n in names]
        assert sorted(grouped) == sorted(sd) and len(grouped) == len(set(grouped))
        if which == "single":
            assert list(ckpt.files) == ["model.safetensors"]
        else:
            index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
            assert len(ckpt.files) > 1 and list(ckpt.files) == sorted(set(index.values()))
            assert all(index[n] == file for file, names in ckpt.files.items() for n in names)
        assert ckpt.config["model_type"] == "llama"
        assert ckpt.model_id == str(folder)
    # closing releases the maps; a later read reopens
    assert torch.equal(ckpt.get("model.norm.weight"), sd["model.norm.weight"])
    ckpt.close()


def test_checkpoint_opens_a_single_file_or_an_index(saved):
    llama, single, sharded, *_ = saved
    for path in (single / "model.safetensors", sharded / "model.safetensors.index.json"):
        ckpt = Checkpoint(path)
        assert set(ckpt) == set(llama.state_dict())
        assert ckpt.config["model_type"] == "llama"


def test_bfloat16_dtype_comes_from_the_header(tmp_path):
    tiny_llama(torch.bfloat16).save_pretrained(tmp_path)
    ckpt = Checkpoint(tmp_path)
    assert {ckpt.dtype(n) for n in ckpt} == {torch.bfloat16}


def test_a_folder_without_weights_says_what_it_expected(tmp_path):
    with pytest.raises(CheckpointError, match=r"has no model weights: expected model\.safetensors"):
        Checkpoint(tmp_path)


def test_pickle_checkpoints_are_refused_with_the_conversion(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError) as info:
        Checkpoint(tmp_path)
    msg = str(info.value)
    assert "only pickle files ['pytorch_model.bin']" in msg
    assert "save_pretrained(dir, safe_serialization=True)" in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, DeltahubError)
    with pytest.raises(CheckpointError, match="is a pickle checkpoint"):
        Checkpoint(tmp_path / "pytorch_model.bin")


def test_other_safetensors_names_are_suggested(saved, tmp_path):
    shutil.copy(saved[1] / "model.safetensors", tmp_path / "consolidated.safetensors")
    with pytest.raises(CheckpointError, match=r"holds \['consolidated\.safetensors'\]: pass the file itself"):
        Checkpoint(tmp_path)
    assert len(Checkpoint(tmp_path / "consolidated.safetensors")) == len(saved[0].state_dict())


def test_a_missing_path_is_file_not_found_with_a_hub_hint():
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at 'org/model'; .*snapshot_download"):
        Checkpoint("org/model")


def test_missing_shards_are_all_named(saved, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(saved[2], folder)
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[0].unlink()
    shards[-1].unlink()
    with pytest.raises(
        CheckpointError, match=r"incomplete: its index names 2 shard\(s\) that are not in"
    ) as info:
        Checkpoint(folder)
    assert shards[0].name in str(info.value) and shards[-1].name in str(info.value)


def test_an_index_that_disagrees_with_its_shards_is_refused(saved, tmp_path):
    folder = tmp_path / "bad-index"
    shutil.copytree(saved[2], folder)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"does not match its index:\n  - model-.* lacks 1 tensor.*ghost"
    ):
        Checkpoint(folder)
    index_path.write_text(json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside its folder"):
        Checkpoint(folder)
    index_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot parse the index"):
        Checkpoint(folder)


def test_a_corrupt_file_is_a_checkpoint_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(CheckpointError, match=r"cannot read .* as safetensors"):
        Checkpoint(tmp_path)


def test_as_tensor_source_collapses_tied_aliases_like_save_pretrained(saved):
    *_, gpt2, folder = saved
    module_src = as_tensor_source(gpt2)
    assert "lm_head.weight" in gpt2.state_dict() and "lm_head.weight" not in module_src
    ckpt = as_tensor_source(folder)
    assert isinstance(ckpt, Checkpoint)
    assert sorted(module_src.keys()) == sorted(ckpt.keys())
    for name in module_src.keys():  # noqa: SIM118  (the interface promises keys())
        assert module_src.shape(name) == ckpt.shape(name) and module_src.dtype(name) == ckpt.dtype(name)
        assert torch.equal(module_src.get(name), ckpt.get(name))
    assert list(as_tensor_source(gpt2.state_dict()).keys()) == list(module_src.keys())


def test_as_tensor_source_model_ids(saved):
    llama, single, *_ = saved
    assert as_tensor_source(llama).model_id is None  # built from a config: no name
    assert as_tensor_source(single).model_id == str(single)
    assert as_tensor_source(GPT2LMHeadModel.from_pretrained(saved[4])).model_id == str(saved[4])
    assert as_tensor_source({"w": torch.zeros(2)}).model_id is None
    ckpt = Checkpoint(single)
    assert as_tensor_source(ckpt) is ckpt
    src = StateDictSource({"w": torch.zeros(2)}, model_id="me/model")
    assert as_tensor_source(src) is src and src.model_id == "me/model"
    with pytest.raises(TypeError, match=r"expected an nn\.Module, a state dict"):
        as_tensor_source(42)


def test_state_dict_source_keeps_distinct_views_and_empty_tensors():
    fused = torch.arange(6.0)
    sd = {"q": fused[:3], "k": fused[3:], "e1": torch.empty(0), "e2": torch.empty(0), "alias": fused[:3]}
    assert list(StateDictSource(sd).keys()) == ["q", "k", "e1", "e2"]
