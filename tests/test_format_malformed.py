"""Format v1: every malformed folder, index, config, tensor and raw header raises DeltaFormatError naming it."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from format_helpers import (
    IDX,
    VAL,
    W,
    cfg_entry,
    config,
    edit_json,
    pd,
    problems_of,
    raw_file,
    small_delta,
    write_by_hand,
)
from safetensors.torch import save_file

from deltahub import DeltaFormatError, SparseDelta
from deltahub.format import load_delta, save_delta

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
    with pytest.raises(DeltaFormatError, match="total_size is 999 but the shards hold 14 bytes"):
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
        (
            lambda p: p[NAME].update(storage="csr"),
            "'storage' must be one of 'sparse', 'dense', 'gaps', 'bitmap'",
        ),
        (lambda p: p[NAME].update(storage="dense"), "storage is 'dense' so nnz must equal numel 12"),
        # The file's 2-byte bitmap of a 12-element parameter cannot describe 8 elements.
        (lambda p: p[NAME].update(shape=[2, 4]), "bitmap has 2 bytes; a parameter of 8 elements needs"),
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
# The tensors' checksums (header metadata "sha256")


def _edit_checksums(path: Path, change) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    change(header["__metadata__"])
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n :])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.update(sha256="{not json"), r"'sha256' must be a JSON object .* not valid JSON"),
        (
            lambda m: m.update(sha256='["00"]'),
            r"'sha256' must be a JSON object mapping each tensor to 64 hex",
        ),
        (
            lambda m: m.update(sha256=json.dumps(dict.fromkeys(json.loads(m["sha256"]), "ABC"))),
            r"'sha256' must be a JSON object mapping each tensor to 64 hex digits",
        ),
        (
            lambda m: m.update(sha256=json.dumps({**json.loads(m["sha256"]), "ghost.values": "0" * 64})),
            r"'sha256' does not match the tensors \(digests of absent tensors \['ghost.values'\]\)",
        ),
        (
            lambda m: m.update(sha256=json.dumps(dict(list(json.loads(m["sha256"]).items())[1:]))),
            r"'sha256' does not match the tensors \(none for \['",
        ),
    ],
)
def test_malformed_checksums_are_refused(single, change, match):
    _edit_checksums(single / "delta.safetensors", change)
    with pytest.raises(DeltaFormatError, match=match):
        load_delta(single)


def test_a_swapped_checksum_names_the_tensor(single):
    def swap(meta):
        digests = json.loads(meta["sha256"])
        a, b = list(digests)[:2]
        digests[a], digests[b] = digests[b], digests[a]
        meta["sha256"] = json.dumps(digests)

    _edit_checksums(single / "delta.safetensors", swap)
    with pytest.raises(DeltaFormatError, match=r"tensor '.+' does not match the SHA-256 its writer recorded"):
        load_delta(single)


def test_files_without_checksums_still_load(single, tmp_path):
    # Format 1.0 files and other writers' record none: nothing to verify, every other check as before.
    expected = load_delta(single)
    _edit_checksums(single / "delta.safetensors", lambda m: m.pop("sha256"))
    assert load_delta(single).equal(expected)
