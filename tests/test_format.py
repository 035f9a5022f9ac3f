"""The on-disk format v1 (docs/format.md): round trips, hand-written files, and every way a file can be wrong."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import random_delta, tiny_llama

from deltahub import DeltaFormatError, ParamDelta, SparseDelta
from deltahub.card import model_card
from deltahub.errors import DeltaExistsError
from deltahub.format import load_delta, parse_size, save_delta

# ---------------------------------------------------------------------------------------------------------
# Helpers


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so -0.0 != 0.0 and every payload bit counts."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_same(a: SparseDelta, b: SparseDelta) -> None:
    assert list(a) == list(b)
    for name in a:
        pa, pb = a[name], b[name]
        assert (pa.shape, pa.dtype, pa.values.dtype) == (pb.shape, pb.dtype, pb.values.dtype), name
        assert pa.indices.dtype == pb.indices.dtype, name
        assert torch.equal(pa.indices, pb.indices), name
        assert torch.equal(bits(pa.values), bits(pb.values)), name
    assert (a.base_model, a.base_revision, a.provenance) == (b.base_model, b.base_revision, b.provenance)
    assert a.fingerprint.keys() == b.fingerprint.keys()
    for name, samples in a.fingerprint.items():
        assert [repr(x) for x in samples] == [repr(x) for x in b.fingerprint[name]]


def pd(idx, vals, shape, dtype=torch.float32, values_dtype=torch.float32) -> ParamDelta:
    return ParamDelta(torch.tensor(idx), torch.tensor(vals, dtype=values_dtype), shape, dtype)


def small_delta(values_dtype=torch.float32) -> SparseDelta:
    tricky = [-0.0, 1e-30, -3.5, 65504.0 if values_dtype == torch.float16 else 1e30, 2.0**-14]
    return SparseDelta(
        {
            "model.layers.0.mlp.down_proj.weight": pd(
                [0, 3, 7, 8, 11], tricky, (3, 4), torch.bfloat16, values_dtype
            ),
            "model.norm.weight": pd([1], [0.25], (4,), torch.float32, values_dtype),
        },
        base_model="tiny/base",
        base_revision="abc123",
        fingerprint={
            "model.norm.weight": (1.0, -2.5, float("nan"), float("inf"), float("-inf"), 0.0, 3.0, 4.0)
        },
        provenance={"algorithm": "rigl", "steps": 10, "hyper": {"density": 0.01}},
    )


def cfg_entry(shape, nnz, dtype="float32", storage="sparse", **extra):
    return {"shape": list(shape), "dtype": dtype, "nnz": nnz, "storage": storage, **extra}


def config(params: dict, **extra) -> dict:
    return {
        "format": "deltahub.sparse_delta",
        "format_version": "1.0",
        "base_model": "tiny/base",
        "base_revision": None,
        "parameters": params,
        "fingerprint": None,
        "provenance": {},
        **extra,
    }


def write_by_hand(folder: Path, tensors: dict, cfg: dict, *, header_config: bool = True) -> Path:
    """A delta made with nothing but safetensors and json, as docs/format.md describes."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.clone() for k, v in tensors.items()}  # safetensors refuses tensors sharing memory
    meta = {"format": cfg["format"], "format_version": cfg["format_version"]}
    if header_config:
        meta["delta_config"] = json.dumps(cfg)
    save_file(tensors, str(folder / "delta.safetensors"), metadata=meta)
    (folder / "delta_config.json").write_text(json.dumps(cfg))
    return folder


def raw_file(path: Path, header: bytes | dict, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file with an arbitrary (possibly lying) header."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(head) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + head + data)
    return path


def edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def problems_of(path) -> list[str]:
    with pytest.raises(DeltaFormatError) as info:
        load_delta(path)
    return info.value.problems


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


W = "w"
IDX = torch.tensor([1, 4, 6], dtype=torch.int32)
VAL = torch.tensor([0.5, -1.0, 2.0])


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
    front = card.split("---\n")[1]
    # the training algorithm from the provenance is a tag too
    assert front == 'library_name: deltahub\nbase_model: "tiny/base"\ntags:\n- deltahub\n- sparse-delta\n- "rigl"\n'
    assert "deltahub.load_model('tiny/base', deltas=['path/to/this-delta'])" in card
    assert "- nnz: 6 of 16 elements" in card and "- density: 0.375" in card
    anonymous = model_card(SparseDelta({W: pd([1], [1.0], (4,))}), location="me/my-delta")
    assert "base_model" not in anonymous and "deltas=['me/my-delta']" in anonymous


# ---------------------------------------------------------------------------------------------------------
# Malformed folders, index and config


@pytest.fixture
def sharded(tmp_path) -> Path:
    delta = SparseDelta({"a": pd([0, 1], [1.0, 2.0], (4,)), "b": pd([3], [1.0], (4,))})
    return save_delta(delta, tmp_path / "d", max_shard_size=1)


@pytest.fixture
def single(tmp_path) -> Path:
    return save_delta(small_delta(), tmp_path / "d")


INDEX = "delta.safetensors.index.json"
SHARD1, SHARD2 = "delta-00001-of-00002.safetensors", "delta-00002-of-00002.safetensors"


@pytest.mark.parametrize(
    "bad_name",
    ["../evil.safetensors", "/etc/evil.safetensors", "sub/x.safetensors", "x.bin", "..\\x.safetensors"],
)
def test_index_file_names_must_be_plain(sharded, bad_name):
    edit_json(sharded / INDEX, lambda ix: ix["weight_map"].update({"a.values": bad_name}))
    problems = problems_of(sharded)
    assert f"tensor 'a.values' maps to {bad_name!r}; shard files must be plain" in problems[0]


def test_index_not_json(sharded):
    (sharded / INDEX).write_text("{not json")
    with pytest.raises(DeltaFormatError, match=f"{INDEX}: not valid JSON"):
        load_delta(sharded)


@pytest.mark.parametrize("index", [[], {"weight_map": []}, {"metadata": {}}])
def test_index_without_weight_map(sharded, index):
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(DeltaFormatError, match="must be an object with a 'weight_map'"):
        load_delta(sharded)


def test_index_total_size_must_match(sharded):
    edit_json(sharded / INDEX, lambda ix: ix["metadata"].update({"total_size": 999}))
    with pytest.raises(DeltaFormatError, match="total_size is 999 but the shards hold 24 bytes"):
        load_delta(sharded)


def test_missing_shard(sharded):
    (sharded / SHARD2).unlink()
    assert problems_of(sharded) == [
        f"{SHARD2}: listed in {INDEX} but missing from the folder; re-download the delta"
    ]


def test_weight_map_disagrees_with_shards(sharded):
    def move(ix):
        ix["weight_map"]["b.values"] = SHARD1
        ix["weight_map"]["ghost.values"] = SHARD1

    edit_json(sharded / INDEX, move)
    problems = problems_of(sharded)
    assert any(
        "tensor 'b.values' is in delta-00002-of-00002.safetensors but the weight_map says" in p
        for p in problems
    )
    assert any(f"lists tensor 'ghost.values' in {SHARD1}, which does not contain it" in p for p in problems)


def test_parameter_straddling_shards(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    save_file({"w.indices": IDX}, str(folder / SHARD1))
    save_file({"w.values": VAL}, str(folder / SHARD2))
    index = {"metadata": {"total_size": 24}, "weight_map": {"w.indices": SHARD1, "w.values": SHARD2}}
    (folder / INDEX).write_text(json.dumps(index))
    (folder / "delta_config.json").write_text(json.dumps(config({W: cfg_entry((2, 4), 3)})))
    with pytest.raises(DeltaFormatError, match=r"'w': its tensors are split over"):
        load_delta(folder)


def test_missing_config(single):
    (single / "delta_config.json").unlink()
    with pytest.raises(DeltaFormatError, match=re.escape("delta_config.json is missing")):
        load_delta(single)


def test_both_single_file_and_index(single):
    (single / INDEX).write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(
        DeltaFormatError, match=re.escape("both delta.safetensors and delta.safetensors.index.json exist")
    ):
        load_delta(single)


def test_no_tensor_files(single):
    (single / "delta.safetensors").unlink()
    with pytest.raises(
        DeltaFormatError, match=re.escape("no delta.safetensors and no delta.safetensors.index.json")
    ):
        load_delta(single)


def test_newer_major_version_is_refused_with_upgrade_hint(single):
    edit_json(single / "delta_config.json", lambda c: c.update({"format_version": "2.0", "parameters": 5}))
    # Alone: under a newer major every other check would be noise.
    assert problems_of(single) == [
        "delta_config.json: format_version 2.0 is newer than this deltahub reads (major 1); "
        "upgrade deltahub: pip install -U deltahub"
    ]


def test_newer_major_in_lone_file_is_refused(tmp_path):
    cfg = config({W: cfg_entry((2, 4), 3)}, format_version="3.1")
    folder = write_by_hand(tmp_path / "d", {"w.indices": IDX, "w.values": VAL}, cfg)
    with pytest.raises(DeltaFormatError, match=r"format_version 3\.1 is newer .* pip install -U deltahub"):
        load_delta(folder / "delta.safetensors")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"format": "peft.lora"}, "'format' is 'peft.lora', not 'deltahub.sparse_delta'"),
        ({"format_version": 1}, "'format_version' must be a string 'MAJOR.MINOR'"),
        ({"format_version": "one"}, "'format_version' must be a string 'MAJOR.MINOR'"),
    ],
)
def test_wrong_format_or_version_string(single, change, match):
    edit_json(single / "delta_config.json", lambda c: c.update(change))
    with pytest.raises(DeltaFormatError, match=match):
        load_delta(single)


def test_header_and_folder_config_must_agree_on_version(tmp_path):
    folder = write_by_hand(
        tmp_path / "d", {"w.indices": IDX, "w.values": VAL}, config({W: cfg_entry((2, 4), 3)})
    )
    edit_json(folder / "delta_config.json", lambda c: c.update({"format_version": "1.1"}))
    with pytest.raises(
        DeltaFormatError,
        match=re.escape(
            "delta.safetensors: header metadata says format_version '1.0' but the config says '1.1'"
        ),
    ):
        load_delta(folder)


NAME = "model.layers.0.mlp.down_proj.weight"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda p: p[NAME].update(dtype="int8"), "'dtype' \\(the base parameter's dtype\\) must be one of"),
        (
            lambda p: p[NAME].update(dtype=["float32"]),
            "'dtype' \\(the base parameter's dtype\\) must be one of",
        ),
        (lambda p: p[NAME].update(shape=[3, -4]), "'shape' must be a list of non-negative integers"),
        (lambda p: p[NAME].update(shape="3x4"), "'shape' must be a list of non-negative integers"),
        (lambda p: p[NAME].update(nnz=4), "says nnz 4 but the file holds 5 entries"),
        (lambda p: p[NAME].update(nnz=13), "nnz 13 exceeds the 12 elements"),
        (lambda p: p[NAME].update(nnz=True), "'nnz' must be a non-negative integer"),
        (lambda p: p[NAME].update(storage="csr"), "'storage' must be 'sparse' or 'dense'"),
        (lambda p: p[NAME].update(storage="dense"), "storage is 'dense' so nnz must equal numel 12"),
        (
            lambda p: p[NAME].update(shape=[2, 4]),
            "indices must lie in \\[0, 8\\) for shape \\[2, 8\\]|indices must lie",
        ),
        (lambda p: p[NAME].update(base_samples=[1.0]), "base_samples must be a list of 8 numbers"),
        (lambda p: p[NAME].update(base_samples=["x"] * 8), "base_samples entry 'x' is not a number"),
        (lambda p: p.pop(NAME), f"'{NAME}': has tensors in the files but no entry in delta_config.json"),
        (lambda p: p.update(ghost=cfg_entry((2,), 1)), "'ghost': listed in delta_config.json but no tensors"),
        (lambda p: p.update(ghost=7), "parameter 'ghost': entry must be an object"),
    ],
)
def test_bad_parameter_entries(single, change, match):
    edit_json(single / "delta_config.json", lambda c: change(c["parameters"]))
    problems = problems_of(single)
    assert len(problems) == 1, problems
    assert any(name in problems[0] for name in (NAME, "ghost")), problems
    with pytest.raises(DeltaFormatError, match=match):
        load_delta(single)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"nnz": 7}, "delta_config.json: total nnz is 7 but the parameters add up to 6"),
        ({"numel": 1}, "delta_config.json: total numel is 1 but the parameters add up to 16"),
        ({"density": 0.5}, "density is 0.5 but nnz/numel is 0.375"),
        ({"values_dtype": "float16"}, "values_dtype is 'float16' but"),
        ({"values_dtype": "int8"}, "'values_dtype' must be one of"),
        ({"base_model": 5}, "'base_model' must be a string or null"),
        ({"provenance": [1]}, "'provenance' must be an object or null"),
        ({"fingerprint": {"method": 1}}, "'fingerprint' must be null or"),
        ({"fingerprint": None}, "has base_samples but the config's 'fingerprint' is null"),
        ({"parameters": []}, "'parameters' must be an object"),
    ],
)
def test_bad_config_fields(single, change, match):
    edit_json(single / "delta_config.json", lambda c: c.update(change))
    with pytest.raises(DeltaFormatError, match=match):
        load_delta(single)


def test_unknown_fingerprint_method_warns_and_drops_fingerprint(single):
    edit_json(single / "delta_config.json", lambda c: c["fingerprint"].update(method="hash-v9"))
    with pytest.warns(UserWarning, match="unknown fingerprint method 'hash-v9'"):
        loaded = load_delta(single)
    assert loaded.fingerprint == {} and loaded.nnz == 6


@pytest.mark.parametrize("text", ["[1, 2]", '{"format": NaN}', '{"a": 1, "a": 2}', "\xff\xfe", "{" * 100_000])
def test_config_not_a_json_object(single, text):
    (single / "delta_config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(DeltaFormatError, match=r"delta_config\.json"):
        load_delta(single)


# ---------------------------------------------------------------------------------------------------------
# Malformed tensors (files written by hand)


def good_cfg(shape=(2, 4), nnz=3, **kw):
    return config({W: cfg_entry(shape, nnz, **kw)})


@pytest.mark.parametrize(
    ("tensors", "cfg", "match"),
    [
        ({"w.indices": IDX, "w.values": VAL, "extra": VAL}, good_cfg(), "unexpected tensor 'extra'"),
        ({"w.indices": IDX, "w.values": VAL, "w.scale": VAL}, good_cfg(), "unexpected tensor 'w.scale'"),
        ({"w.indices": IDX}, good_cfg(), r"'w': has tensors \['w.indices'\], missing \['w.values'\]"),
        ({"w.values": VAL}, good_cfg(), r"missing \['w.indices'\]"),
        ({"w.indices": IDX, "w.values": VAL, "w.dense": VAL}, good_cfg(), "'.dense' excludes the others"),
        (
            {"w.indices": IDX.float(), "w.values": VAL},
            good_cfg(),
            "'w' .*indices dtype must be int32 or int64",
        ),
        ({"w.indices": IDX, "w.values": IDX}, good_cfg(), "'w' .*values dtype must be one of"),
        ({"w.indices": IDX.view(3, 1), "w.values": VAL}, good_cfg(), "'w' .*must be 1-D"),
        ({"w.indices": IDX, "w.values": VAL[:2]}, good_cfg(), "'w' .*3 indices but 2 values"),
        ({"w.indices": IDX.flip(0), "w.values": VAL}, good_cfg(), "'w' .*strictly increasing"),
        ({"w.indices": torch.tensor([1, 1, 6], dtype=torch.int32), "w.values": VAL}, good_cfg(), "strictly"),
        (
            {"w.indices": torch.tensor([-1, 4, 6], dtype=torch.int32), "w.values": VAL},
            good_cfg(),
            r"\[0, 8\)",
        ),
        ({"w.indices": torch.tensor([1, 4, 8], dtype=torch.int32), "w.values": VAL}, good_cfg(), r"found 8"),
        (
            {"w.indices": IDX, "w.values": torch.tensor([0.5, float("nan"), float("inf")])},
            good_cfg(),
            "'w' .*2 values are NaN or infinite",
        ),
        ({"w.indices": IDX, "w.values": VAL}, good_cfg(shape=(65536, 65536)), "int32 indices cannot address"),
        ({"w.dense": torch.ones(4, 2)}, good_cfg(nnz=8, storage="dense"), r"dense tensor has shape \[4, 2\]"),
        ({"w.dense": torch.ones(2, 4).int()}, good_cfg(nnz=8, storage="dense"), "dense values dtype must be"),
        (
            {"w.dense": torch.full((2, 4), float("nan"))},
            good_cfg(nnz=8, storage="dense"),
            "'w' .*8 values are NaN or infinite",
        ),
        ({"w.dense": torch.ones(2, 4)}, good_cfg(), "says storage 'sparse' but the files store it dense"),
        ({"w.indices": IDX, "w.values": VAL}, good_cfg(nnz=8, storage="dense"), "says storage 'dense'"),
    ],
)
def test_bad_tensors(tmp_path, tensors, cfg, match):
    folder = write_by_hand(tmp_path / "d", tensors, cfg)
    with pytest.raises(DeltaFormatError, match=match) as info:
        load_delta(folder)
    assert any("'w" in p or "'extra'" in p for p in info.value.problems)
    # The same file alone fails the same way (its header carries the config).
    with pytest.raises(DeltaFormatError, match=match):
        load_delta(folder / "delta.safetensors")


def test_many_problems_are_reported_together(tmp_path):
    cfg = config(
        {
            "a": cfg_entry((2, 4), 3),
            "b": cfg_entry((2, 4), 3),
            "c": cfg_entry((2, 4), 3, dtype="int4"),
            "gone": cfg_entry((2,), 1),
        }
    )
    tensors = {
        "a.indices": IDX.flip(0),
        "a.values": VAL,
        "b.indices": IDX,
        "b.values": torch.tensor([1.0, float("nan"), 0.0]),
        "c.indices": IDX,
        "c.values": VAL,
        "junk": VAL,
    }
    problems = problems_of(write_by_hand(tmp_path / "d", tensors, cfg))
    assert len(problems) == 5, problems
    text = "\n".join(problems)
    for expected in (
        "'a' (in delta.safetensors): indices must be strictly",
        "'b' (in delta.safetensors): 1 values",
        "parameter 'c': 'dtype'",
        "'gone': listed",
        "unexpected tensor 'junk'",
    ):
        assert expected in text


def test_problem_list_is_capped(tmp_path):
    tensors = {f"junk{i}": VAL for i in range(80)}
    problems = problems_of(write_by_hand(tmp_path / "d", tensors, config({})))
    assert len(problems) == 51 and problems[-1] == "... and 30 more problems"


def test_error_is_a_value_error(single):
    (single / "delta_config.json").write_text("[]")
    with pytest.raises(ValueError, match="invalid deltahub delta at"):
        load_delta(single)


# ---------------------------------------------------------------------------------------------------------
# Malformed safetensors headers (raw bytes)


def entry(dtype="F32", shape=(3,), offsets=(0, 12)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    ("header", "data", "length", "match"),
    [
        (b"{}", b"", 0, "header length field says 0 bytes"),
        (b"{}", b"", 10**12, "header length field says 1000000000000 bytes but the file has 2 bytes"),
        (b"\xff\xfe{}", b"", None, "header is not valid UTF-8 JSON"),
        (b"{not json}", b"", None, "header is not valid UTF-8 JSON"),
        (b' {"a": 1}', b"", None, "does not start with"),
        (b"[1, 2]", b"", None, "does not start with"),
        (b'{"x": 1, "x": 2}', b"", None, "duplicate key 'x'"),
        (b'{"x": NaN}', b"", None, "NaN is not valid JSON"),
        (b"{" * 50_000, b"", None, "header is not valid UTF-8 JSON"),
        ({"__metadata__": {"a": 1}}, b"", None, "'__metadata__' must map strings to strings"),
        ({"w.values": [1]}, b"", None, "tensor 'w.values': header entry must have exactly the keys"),
        ({"w.values": {**entry(), "extra": 1}}, b"\0" * 12, None, "must have exactly the keys"),
        ({"w.values": entry(dtype="F64", offsets=(0, 24))}, b"\0" * 24, None, "dtype 'F64' is not allowed"),
        ({"w.values": entry(dtype=["F32"])}, b"\0" * 12, None, "is not allowed in a delta"),
        ({"w.values": entry(shape=(-3,))}, b"\0" * 12, None, "shape must be a list of non-negative integers"),
        (
            {"w.values": entry(shape=(True,))},
            b"\0" * 12,
            None,
            "shape must be a list of non-negative integers",
        ),
        ({"w.values": entry(offsets=(12, 0))}, b"\0" * 12, None, "data_offsets must be \\[begin, end\\]"),
        ({"w.values": entry(offsets=(0, 8))}, b"\0" * 12, None, "needs 12 bytes but data_offsets span 8"),
        (
            {"w.values": entry(shape=(10**9,), offsets=(0, 4 * 10**9))},
            b"\0" * 12,
            None,
            "data_offsets end at byte 4000000000 but the data region has only 12 bytes",
        ),
        (
            {"w.values": entry(), "w.indices": entry("I32", offsets=(8, 20))},
            b"\0" * 20,
            None,
            "overlaps the previous tensor",
        ),
        (
            {"w.values": entry(), "w.indices": entry("I32", offsets=(16, 28))},
            b"\0" * 28,
            None,
            "leaves a gap at byte 12",
        ),
        ({"w.values": entry()}, b"\0" * 20, None, "tensors cover 12 bytes but the data region has 20"),
    ],
)
def test_bad_headers(tmp_path, header, data, length, match):
    file = raw_file(tmp_path / "x.safetensors", header, data, length)
    with pytest.raises(DeltaFormatError, match=match) as info:
        load_delta(file)
    assert all(p.startswith("x.safetensors: ") for p in info.value.problems)
    # And inside a folder, the shard is named the same way.
    folder = write_by_hand(tmp_path / "d", {"w.indices": IDX, "w.values": VAL}, good_cfg())
    os.replace(file, folder / "delta.safetensors")
    with pytest.raises(DeltaFormatError, match=match):
        load_delta(folder)


def test_file_shorter_than_the_length_field(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(
        DeltaFormatError, match=re.escape("x.safetensors: 2 bytes is too short for a safetensors file")
    ):
        load_delta(tmp_path / "x.safetensors")


def test_header_larger_than_limit_is_refused_before_reading(tmp_path):
    file = tmp_path / "big.safetensors"
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", 100_000_001))
        f.truncate(8 + 100_000_001)  # sparse on disk: no real 100 MB written
    with pytest.raises(DeltaFormatError, match="header of 100000001 bytes exceeds the 100000000-byte limit"):
        load_delta(file)


def test_truncated_file(single):
    file = single / "delta.safetensors"
    file.write_bytes(file.read_bytes()[:-3])
    with pytest.raises(DeltaFormatError, match="but the data region has only"):
        load_delta(single)


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
