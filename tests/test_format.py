"""The on-disk format v1 (docs/format.md): round trips, hand-written files, and every way a file can be wrong."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from format_helpers import (
    IDX,
    VAL,
    W,
    assert_same,
    cfg_entry,
    config,
    leftovers,
    pd,
    small_delta,
    write_by_hand,
)
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import random_delta, tiny_llama

from deltahub import DeltaFormatError, ParamDelta, SparseDelta
from deltahub.card import model_card
from deltahub.errors import DeltaExistsError
from deltahub.format import load_delta, parse_size, save_delta

# ---------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("values_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(tmp_path, values_dtype):
    delta = small_delta(values_dtype)
    out = save_delta(delta, tmp_path / "d")
    assert out == tmp_path / "d"
    assert sorted(os.listdir(out)) == ["README.md", "delta.safetensors", "delta_config.json"]
    loaded = load_delta(out)
    assert_same(loaded, delta)
    assert loaded.origin == {"path": str(out)}
    assert leftovers(tmp_path) == []


def test_round_trip_of_a_real_model_delta(tmp_path):
    model = tiny_llama(torch.bfloat16)
    delta = random_delta(model, density=0.1, values_dtype=torch.bfloat16)
    loaded = load_delta(save_delta(delta, tmp_path / "d"))
    assert_same(loaded, delta)
    assert loaded.equal(delta)


def test_config_contents(tmp_path):
    import deltahub

    delta = small_delta(torch.bfloat16)
    cfg = json.loads((save_delta(delta, tmp_path / "d") / "delta_config.json").read_text())
    assert cfg == {
        "format": "deltahub.sparse_delta",
        "format_version": "1.0",
        "deltahub_version": deltahub.__version__,
        "base_model": "tiny/base",
        "base_revision": "abc123",
        "values_dtype": "bfloat16",
        "nnz": 6,
        "numel": 16,
        "density": 6 / 16,
        "parameters": {
            "model.layers.0.mlp.down_proj.weight": cfg_entry((3, 4), 5, "bfloat16"),
            "model.norm.weight": cfg_entry(
                (4,), 1, base_samples=[1.0, -2.5, "nan", "inf", "-inf", 0.0, 3.0, 4.0]
            ),
        },
        "fingerprint": {"method": "samples-v1", "samples_per_parameter": 8},
        "provenance": {"algorithm": "rigl", "steps": 10, "hyper": {"density": 0.01}},
    }


def test_mixed_values_dtypes_and_tensor_dtypes_in_file(tmp_path):
    delta = SparseDelta(
        {"a": pd([0, 2], [1.0, 2.0], (3,)), "b": pd([1], [3.0], (2,), values_dtype=torch.float16)}
    )
    out = save_delta(delta, tmp_path / "d")
    assert json.loads((out / "delta_config.json").read_text())["values_dtype"] == "mixed"
    with safe_open(str(out / "delta.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["a.indices", "a.values", "b.indices", "b.values"]
        assert f.get_tensor("a.indices").dtype == torch.int32
        assert f.get_tensor("b.values").dtype == torch.float16
    assert_same(load_delta(out), delta)


def test_huge_parameter_gets_int64_indices(tmp_path):
    # 2**32 elements, two of them touched: int64 is required, yet nothing of size numel is allocated.
    delta = SparseDelta({"big": pd([0, 2**32 - 1], [1.0, -1.0], (65536, 65536))})
    out = save_delta(delta, tmp_path / "d")
    with safe_open(str(out / "delta.safetensors"), "pt") as f:
        assert f.get_tensor("big.indices").dtype == torch.int64
    loaded = load_delta(out)
    assert loaded["big"].indices.tolist() == [0, 2**32 - 1]
    assert_same(loaded, delta)


def test_reader_accepts_int64_indices_for_small_parameters(tmp_path):
    folder = write_by_hand(
        tmp_path / "d", {"w.indices": IDX.to(torch.int64), "w.values": VAL}, config({W: cfg_entry((2, 4), 3)})
    )
    loaded = load_delta(folder)
    assert loaded[W].indices.dtype == torch.int32  # narrowed to what the in-memory type uses
    assert loaded[W].indices.tolist() == [1, 4, 6]
    assert torch.equal(loaded[W].values, VAL)


def test_empty_delta_round_trips(tmp_path):
    delta = SparseDelta({}, base_model="tiny/base")
    loaded = load_delta(save_delta(delta, tmp_path / "d"))
    assert len(loaded) == 0 and loaded.base_model == "tiny/base"


def test_parameter_with_no_entries_round_trips(tmp_path):
    delta = SparseDelta(
        {"w": ParamDelta(torch.zeros(0, dtype=torch.int32), torch.zeros(0), (2, 3), torch.float32)}
    )
    assert_same(load_delta(save_delta(delta, tmp_path / "d")), delta)


# ---------------------------------------------------------------------------------------------------------
# Dense storage


def test_fully_touched_parameter_is_stored_densely(tmp_path):
    values = torch.arange(6, dtype=torch.float32) - 2.5
    delta = SparseDelta(
        {
            "full": ParamDelta(torch.arange(6), values.to(torch.bfloat16), (2, 3), torch.float32),
            "scalar": ParamDelta(torch.tensor([0]), torch.tensor([7.0]), (), torch.float32),
            "sparse": pd([1], [1.0], (2, 3)),
        }
    )
    out = save_delta(delta, tmp_path / "d")
    with safe_open(str(out / "delta.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["full.dense", "scalar.dense", "sparse.indices", "sparse.values"]
        assert f.get_tensor("full.dense").shape == (2, 3)
        assert torch.equal(f.get_tensor("full.dense"), values.to(torch.bfloat16).view(2, 3))
        assert f.get_tensor("scalar.dense").shape == ()
    params = json.loads((out / "delta_config.json").read_text())["parameters"]
    assert params["full"]["storage"] == "dense" and params["sparse"]["storage"] == "sparse"
    loaded = load_delta(out)
    assert loaded["full"].indices.tolist() == list(range(6))
    assert_same(loaded, delta)


# ---------------------------------------------------------------------------------------------------------
# Sharding


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (1234, 1234),
        ("500MB", 500 * 10**6),
        ("5GB", 5 * 10**9),
        ("2GiB", 2 * 2**30),
        ("100KiB", 100 * 1024),
        ("64kb", 64_000),
        ("1.5GB", 1_500_000_000),
        ("7", 7),
    ],
)
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5 parsecs", "GB", "", 0, -1, "0MB", True, 1.5, None])
def test_parse_size_rejects(size):
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(size)


def test_sharded_round_trip_and_index(tmp_path):
    delta = SparseDelta(
        {
            "a": pd([0, 1, 2], [1.0, 2.0, 3.0], (10,)),  # 24 bytes
            "b": pd([5], [1.0], (10,), values_dtype=torch.float16),  # 6 bytes
            "c": ParamDelta(torch.arange(4), torch.ones(4), (4,), torch.float32),  # dense, 16 bytes
            "d": pd(list(range(8)), [0.5] * 8, (10,)),  # 64 bytes: larger than a shard on its own
        },
        base_model="tiny/base",
        fingerprint={"b": tuple(float(i) for i in range(8))},
    )
    out = save_delta(delta, tmp_path / "d", max_shard_size=30)
    shards = [f"delta-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(os.listdir(out)) == sorted(
        ["README.md", "delta_config.json", "delta.safetensors.index.json", *shards]
    )
    index = json.loads((out / "delta.safetensors.index.json").read_text())
    assert index == {
        "metadata": {"total_size": 24 + 6 + 16 + 64},
        "weight_map": {
            "a.indices": shards[0],
            "a.values": shards[0],
            "b.indices": shards[0],
            "b.values": shards[0],
            "c.dense": shards[1],
            "d.indices": shards[2],
            "d.values": shards[2],
        },
    }
    # Each shard describes itself: its own parameters and totals.
    with safe_open(str(out / shards[0]), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "deltahub.sparse_delta" and meta["format_version"] == "1.0"
    shard_cfg = json.loads(meta["delta_config"])
    assert list(shard_cfg["parameters"]) == ["a", "b"]
    assert (shard_cfg["nnz"], shard_cfg["numel"]) == (4, 20)
    assert shard_cfg["parameters"]["b"]["base_samples"] == [float(i) for i in range(8)]
    assert_same(load_delta(out), delta)
    # A lone shard loads as the part of the delta it holds.
    part = load_delta(out / shards[0])
    assert list(part) == ["a", "b"] and part.fingerprint == {"b": delta.fingerprint["b"]}


def test_below_max_shard_size_writes_one_file(tmp_path):
    out = save_delta(small_delta(), tmp_path / "d", max_shard_size="1KB")
    assert (out / "delta.safetensors").is_file() and not (out / "delta.safetensors.index.json").exists()


# ---------------------------------------------------------------------------------------------------------
# Hand-written deltas, lone files, the card


@pytest.mark.parametrize("header_config", [True, False])
def test_hand_written_delta_loads(tmp_path, header_config):
    cfg = config(
        {
            W: cfg_entry((2, 4), 3, "bfloat16", base_samples=[0.0] * 8),
            "b": cfg_entry((3,), 3, storage="dense"),
        },
        fingerprint={"method": "samples-v1", "samples_per_parameter": 8},
        provenance={"by": "hand"},
    )
    tensors = {"w.indices": IDX, "w.values": VAL.to(torch.float16), "b.dense": torch.tensor([1.0, 0.0, -1.0])}
    loaded = load_delta(write_by_hand(tmp_path / "d", tensors, cfg, header_config=header_config))
    assert list(loaded) == [W, "b"]
    assert loaded[W].dtype == torch.bfloat16 and loaded[W].values.dtype == torch.float16
    assert torch.equal(loaded[W].dense(), torch.tensor([[0, 0.5, 0, 0], [-1, 0, 2, 0]]))
    assert loaded["b"].indices.tolist() == [0, 1, 2]
    assert loaded.fingerprint == {W: (0.0,) * 8}
    assert loaded.provenance == {"by": "hand"} and loaded.base_model == "tiny/base"


def test_worked_example_in_the_spec_runs(tmp_path, monkeypatch, capsys):
    spec = (Path(__file__).parent.parent / "docs" / "format.md").read_text()
    code = re.search(r"## 9\. Worked example.*?```python\n(.*?)```", spec, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/format.md", "exec"), {})
    assert capsys.readouterr().out.splitlines() == [
        "tensor([[ 0.0000,  0.5000,  0.0000,  0.0000],",
        "        [-1.0000,  0.0000,  2.0000,  0.0000]])",
    ]
    loaded = load_delta(tmp_path / "my-delta")
    assert loaded["linear.bias"].indices.tolist() == [0, 1, 2] and loaded.provenance == {"made_by": "hand"}


def test_minor_version_and_unknown_keys_are_accepted(tmp_path):
    cfg = config({W: cfg_entry((2, 4), 3, future_field=1)}, format_version="1.7", future={"x": 1})
    loaded = load_delta(write_by_hand(tmp_path / "d", {"w.indices": IDX, "w.values": VAL}, cfg))
    assert loaded[W].indices.tolist() == [1, 4, 6]


def test_lone_file_loads_from_its_header(tmp_path):
    delta = small_delta()
    file = save_delta(delta, tmp_path / "d") / "delta.safetensors"
    loaded = load_delta(file)
    assert_same(loaded, delta)
    assert loaded.origin == {"path": str(file)}


def test_lone_file_without_config_in_header_is_refused(tmp_path):
    save_file({"w.indices": IDX, "w.values": VAL}, str(tmp_path / "x.safetensors"))
    with pytest.raises(
        DeltaFormatError, match=re.escape("x.safetensors: header metadata has no 'delta_config'")
    ):
        load_delta(tmp_path / "x.safetensors")


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no delta at"):
        load_delta(tmp_path / "nope")


def test_model_card(tmp_path):
    delta = small_delta()
    card = (save_delta(delta, tmp_path / "d") / "README.md").read_text()
    assert card == model_card(delta)
    data = ModelCard(card).data  # built with huggingface_hub's ModelCardData
    # the training algorithm from the provenance is a tag too; a Hub base is linked as the delta's base
    assert data.to_dict() == {
        "library_name": "deltahub",
        "base_model": "tiny/base",
        "base_model_relation": "adapter",
        "tags": ["deltahub", "sparse-delta", "rigl"],
    }
    assert "deltahub.load_model(deltas=['path/to/this-delta'])" in card  # the base it records, by id
    assert "deltahub.load_model('tiny/base', deltas=['path/to/this-delta']" in card
    assert "- nnz: 6 of 16 elements" in card and "- density: 0.375" in card
    anonymous = model_card(SparseDelta({W: pd([1], [1.0], (4,))}), location="me/my-delta")
    assert "base_model" not in anonymous and "deltas=['me/my-delta']" in anonymous
    local = model_card(small_delta().replace(base_model="/models/base"), location="me/my-delta")
    assert "base_model" not in ModelCard(local).data.to_dict()  # a path is not a Hub id


# ---------------------------------------------------------------------------------------------------------
# Saving: refusal, overwrite, atomicity


def test_existing_non_empty_target_is_refused(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(DeltaExistsError, match="pass overwrite=True") as info:
        save_delta(small_delta(), target)
    assert isinstance(info.value, FileExistsError)
    assert os.listdir(target) == ["keep.txt"] and leftovers(tmp_path) == []


def test_existing_file_target_is_refused(tmp_path):
    (tmp_path / "d").write_text("x")
    with pytest.raises(FileExistsError):
        save_delta(small_delta(), tmp_path / "d")


def test_empty_existing_folder_is_used(tmp_path):
    (tmp_path / "d").mkdir()
    assert_same(load_delta(save_delta(small_delta(), tmp_path / "d")), small_delta())


def test_overwrite_replaces_the_whole_folder(tmp_path):
    target = save_delta(small_delta(), tmp_path / "d", max_shard_size=1)  # sharded
    (target / "stale.txt").write_text("old")
    new = SparseDelta({W: pd([2], [9.0], (4,))})
    save_delta(new, target, overwrite=True)
    assert sorted(os.listdir(target)) == ["README.md", "delta.safetensors", "delta_config.json"]
    assert_same(load_delta(target), new)
    assert leftovers(tmp_path) == []


def test_failed_save_leaves_nothing_and_keeps_the_old_delta(tmp_path):
    old = save_delta(small_delta(), tmp_path / "d")
    # Meta tensors cannot be copied to the CPU, so writing fails after the temporary folder exists.
    broken = SparseDelta(
        {
            "ok": pd([0], [1.0], (2,)),
            "bad": ParamDelta._trusted(
                torch.tensor([0], dtype=torch.int32), torch.empty(1, device="meta"), (2,), torch.float32
            ),
        }
    )
    with pytest.raises(NotImplementedError):
        save_delta(broken, old, overwrite=True)
    assert leftovers(tmp_path) == []
    assert_same(load_delta(old), small_delta())
    with pytest.raises(NotImplementedError):
        save_delta(broken, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists() and leftovers(tmp_path) == []


def test_provenance_must_be_json(tmp_path):
    delta = small_delta().replace(provenance={"lr": float("nan")})
    with pytest.raises(ValueError, match="provenance must hold only JSON values"):
        save_delta(delta, tmp_path / "d")
    assert os.listdir(tmp_path) == []


def test_saving_values_that_share_memory(tmp_path):
    buffer = torch.tensor([1.0, 2.0, 3.0, 4.0])
    delta = SparseDelta(
        {
            "a": ParamDelta(torch.tensor([0, 1]), buffer[:2], (4,), torch.float32),
            "b": ParamDelta(torch.tensor([2, 3]), buffer[2:], (4,), torch.float32),
        }
    )
    assert_same(load_delta(save_delta(delta, tmp_path / "d")), delta)


def test_creates_parent_folders_and_accepts_strings(tmp_path):
    out = save_delta(small_delta(), str(tmp_path / "a" / "b" / "d"))
    assert isinstance(out, Path) and (out / "delta_config.json").is_file()
    assert_same(load_delta(str(out)), small_delta())
