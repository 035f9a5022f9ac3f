"""Strangers' deltas at the reader's boundary, case by case: integers beyond every range, many dimensions, sizes
claimed beyond the file, files that are not regular files, and lenient reads that are now refused. Each is one
DeltaFormatError naming the file and key (the sandboxed fuzz families in test_format_fuzz_hostile.py cover the
same ground at random, with memory and time caps)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from format_helpers import edit_json, problems_of, raw_file, small_delta
from safetensors.torch import save_file

from deltahub import DeltaFormatError, ParamDelta, SparseDelta
from deltahub.format import load_delta, save_delta
from deltahub.format.untrusted import MAX_RANK, as_float, preview, regular_file, shape_problem

CONFIG, INDEX = "delta_config.json", "delta.safetensors.index.json"
NAME = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture
def single(tmp_path) -> Path:
    return save_delta(small_delta(), tmp_path / "d")


@pytest.fixture
def sharded(tmp_path) -> Path:
    delta = SparseDelta(
        {
            "a": ParamDelta(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]), (4,), torch.float32),
            "b": ParamDelta(torch.tensor([3]), torch.tensor([1.0]), (4,), torch.float32),
        }
    )
    return save_delta(delta, tmp_path / "d", max_shard_size=1)


# ---- the helpers ----------------------------------------------------------------------------------------------


def test_preview_never_converts_a_huge_int_and_stays_short():
    assert preview(10**5000) == "<16610-bit integer>"
    assert preview([1, 10**400, "x"]) == "[1, <1329-bit integer>, 'x']"
    assert len(preview(list(range(10**6)))) == 80
    assert preview({"a": [None, True, 1.5]}) == "{'a': [None, True, 1.5]}"


def test_shape_problem_checks_rank_before_any_product():
    assert shape_problem([3, 4]) is None and shape_problem([]) is None and shape_problem([0, 2**62]) is None
    start = time.perf_counter()
    assert "has 400000 dimensions; at most 8" in shape_problem([10] * 400_000)
    assert time.perf_counter() - start < 0.5  # one comparison, not a 400,000-digit product
    assert "more than 2^63 - 1 elements" in shape_problem([2**32, 2**32])
    assert "more than 2^63 - 1 elements" in shape_problem([10**3000, 0])  # no tensor has such a dimension
    assert "non-negative integers" in shape_problem([1.0, 2])
    assert "non-negative integers" in shape_problem([True])
    assert shape_problem([1] * MAX_RANK) is None


def test_as_float():
    assert as_float(3) == 3.0 and as_float(0.5) == 0.5
    assert as_float(10**400) is None and as_float(True) is None and as_float("1") is None


# ---- 1. integers beyond every range -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, match",
    [
        (
            lambda c: c.update(density=10**400),
            r"'density' must be a number in \[0, 1\], got <1329-bit integer>",
        ),
        (lambda c: c.update(density=2.5), r"'density' must be a number in \[0, 1\], got 2\.5"),
        (
            lambda c: c.update(nnz=10**4000),
            r"total nnz is <13288-bit integer> but the parameters add up to 6",
        ),
        (
            lambda c: c.update(format_version="9" * 5000 + ".0"),
            r"'format_version' must be a string 'MAJOR\.MINOR' like '1\.0'; got '9999",
        ),
        (
            lambda c: c["parameters"][NAME].update(base_samples=[10**400] * 8),
            rf"parameter '{NAME}': base_samples entry <1329-bit integer> is not a number",
        ),
        (
            lambda c: c["parameters"][NAME].update(shape=[10**3000] * 2),
            rf"parameter '{NAME}': 'shape' \[<9966-bit integer>, <9966-bit integer>\] has more than 2\^63 - 1",
        ),
        (
            lambda c: c["parameters"][NAME].update(nnz=10**400),
            rf"parameter '{NAME}': nnz <1329-bit integer> exceeds the 12 elements",
        ),
    ],
)
def test_huge_integers_in_the_config(single, change, match):
    edit_json(single / CONFIG, change)
    with pytest.raises(DeltaFormatError, match=match) as info:
        load_delta(single)
    assert all(p.startswith(CONFIG) for p in info.value.problems)


def test_huge_integers_in_a_header(tmp_path):
    cfg = {"format": "deltahub.sparse_delta", "format_version": "1.0", "parameters": {}}
    header = {
        "__metadata__": {"delta_config": json.dumps(cfg)},
        "w.dense": {"dtype": "F32", "shape": [10**4000, 10**4000], "data_offsets": [0, 16]},
        "v.dense": {"dtype": "F32", "shape": [4], "data_offsets": [10**4000, 10**4000 + 16]},
    }
    raw_file(tmp_path / "x.safetensors", header, b"\0" * 16)
    problems = problems_of(tmp_path / "x.safetensors")
    assert problems[0].startswith("x.safetensors: tensor 'w.dense': shape [<13288-bit integer>, <13288-bit")
    assert problems[1].startswith(
        "x.safetensors: tensor 'v.dense': data_offsets end at byte <13288-bit integer> but the data region"
    )


def test_more_digits_than_json_reads_is_a_json_problem(single):
    text = (single / CONFIG).read_text().replace('"nnz": 6', '"nnz": ' + "9" * 4301)
    (single / CONFIG).write_text(text)
    with pytest.raises(DeltaFormatError, match=r"delta_config.json: not valid JSON \(Exceeds the limit"):
        load_delta(single)


# ---- 2 and 4. sizes beyond the file; many dimensions --------------------------------------------------------------


def test_a_dense_claim_beyond_the_file_is_refused_before_allocating(tmp_path):
    """2**30 declared elements over a file of 64 values: refused at once (it took 8.6 s and 4.3 GB)."""
    folder = tmp_path / "d"
    folder.mkdir()
    save_file({"w.dense": torch.zeros(64)}, str(folder / "delta.safetensors"))
    cfg = {
        "format": "deltahub.sparse_delta",
        "format_version": "1.0",
        "parameters": {"w": {"shape": [2**31], "dtype": "float32", "nnz": 2**31, "storage": "dense"}},
    }
    (folder / CONFIG).write_text(json.dumps(cfg))
    start = time.perf_counter()
    assert problems_of(folder) == [
        "'w' (in delta.safetensors): dense tensor has shape [64] but the parameter's declared shape is [2147483648]"
    ]
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("where", ["config", "header"])
def test_many_dimensions_are_refused_at_once(tmp_path, where):
    shape = [2] * 400_000  # an 8 MB header, under the 100 MB limit: past 120 s before
    cfg = {
        "format": "deltahub.sparse_delta",
        "format_version": "1.0",
        "parameters": {
            "w": {
                "shape": shape if where == "config" else [4],
                "dtype": "float32",
                "nnz": 4,
                "storage": "dense",
            }
        },
    }
    header = {
        "__metadata__": {"delta_config": json.dumps(cfg)},
        "w.dense": {"dtype": "F32", "shape": shape if where == "header" else [4], "data_offsets": [0, 16]},
    }
    raw_file(tmp_path / "x.safetensors", header, b"\0" * 16)
    start = time.perf_counter()
    problems = problems_of(tmp_path / "x.safetensors")
    assert time.perf_counter() - start < 1.0
    assert len(problems) == 1 and "has 400000 dimensions; at most 8 are allowed here" in problems[0]
    assert problems[0].startswith("x.safetensors")


# ---- 3. files that are not regular files --------------------------------------------------------------------------


def _replace(path: Path, make) -> None:
    path.unlink()
    make(path)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.symlink_to("/dev/zero"), "is a link to a file outside the delta folder"),
        (os.mkfifo, "is a FIFO, not a regular file"),
        (lambda p: p.mkdir(), "is a folder, not a regular file"),
        (lambda p: p.symlink_to(p.parent / "nothing"), "is a link to nothing"),
        (lambda p: p.symlink_to(p), "cannot be resolved"),
    ],
)
@pytest.mark.parametrize("target", [INDEX, CONFIG, "delta-00001-of-00002.safetensors"])
def test_non_regular_files_in_a_folder(sharded, target, make, message):
    _replace(sharded / target, make)
    start = time.perf_counter()
    problems = problems_of(sharded)
    assert time.perf_counter() - start < 1.0
    assert problems == [problems[0]] and problems[0].startswith(f"{target}: {message}")


def test_a_device_inside_the_folder_is_not_read(tmp_path, sharded):
    """A link inside the folder to a link out of it: resolved fully, then refused as outside."""
    (sharded / "zero").symlink_to("/dev/zero")
    _replace(sharded / INDEX, lambda p: p.symlink_to("zero"))
    assert "is a link to a file outside the delta folder" in problems_of(sharded)[0]


def test_a_link_out_of_the_folder_reveals_nothing(sharded, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"\x01\x02\x03\x04\x05\x06\x07\x08the secret")
    shard = sharded / "delta-00001-of-00002.safetensors"
    _replace(shard, lambda p: p.symlink_to(secret))
    with pytest.raises(DeltaFormatError) as info:
        load_delta(sharded)
    assert str(int.from_bytes(b"\x01\x02\x03\x04\x05\x06\x07\x08", "little")) not in str(info.value)
    assert "outside the delta folder" in str(info.value)


def test_links_inside_the_folder_and_the_hf_cache_layout_load(sharded, tmp_path):
    """Links that stay inside are fine, and so is the HF cache's snapshots/<commit>/file -> ../../blobs/<etag>."""
    expected = load_delta(sharded)
    repo = tmp_path / "models--org--delta"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(sharded.iterdir())):
        blob = repo / "blobs" / f"etag{i}"
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    loaded = load_delta(snapshot)
    assert list(loaded) == list(expected)
    inside = tmp_path / "inside"
    inside.mkdir()
    for file in sharded.iterdir():
        (inside / f"real-{file.name}").write_bytes(file.read_bytes())
        (inside / file.name).symlink_to(f"real-{file.name}")
    assert list(load_delta(inside)) == list(expected)


def test_a_lone_path_may_link_anywhere_but_must_be_a_regular_file(single, tmp_path):
    link = tmp_path / "elsewhere.safetensors"
    link.symlink_to(single / "delta.safetensors")
    assert list(load_delta(link)) == list(load_delta(single))
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    assert problems_of(fifo) == [
        "fifo.safetensors: is a FIFO, not a regular file; a delta's files are plain files"
    ]
    zero = tmp_path / "zero.safetensors"
    zero.symlink_to("/dev/zero")
    assert problems_of(zero)[0].startswith("zero.safetensors: is a device, not a regular file")


def test_regular_file_refuses_an_escape_through_a_linked_folder(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "f").write_text("x")
    (folder / "sub").symlink_to(tmp_path / "outside")
    path, problem = regular_file(folder / "sub" / "f", "sub/f", folder)
    assert path is None and "outside the delta folder" in problem


# ---- 8. lenient reads, now refused ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, match",
    [
        (
            lambda c: c.update(fingerprint={"method": "samples-v1", "samples_per_parameter": 0}),
            r"'fingerprint' method 'samples-v1' has samples_per_parameter 8, got 0",
        ),
        (
            lambda c: c.update(fingerprint={"method": "samples-v1", "samples_per_parameter": -3}),
            r"has samples_per_parameter 8, got -3",
        ),
        (
            lambda c: c.update(values_dtype=None),
            r"'values_dtype' is null but the delta has 2 parameters; set it to their values' dtype",
        ),
        (
            lambda c: c.update(deltahub_version=[1, 2]),
            r"'deltahub_version' must be a string like '0\.1\.0' \(or null\), got \[1, 2\]",
        ),
        (lambda c: c.update(deltahub_version=7), r"'deltahub_version' must be a string"),
    ],
)
def test_lenient_reads_are_refused(single, change, match):
    edit_json(single / CONFIG, change)
    with pytest.raises(DeltaFormatError, match=match):
        load_delta(single)


def test_what_stays_accepted(single):
    """A missing deltahub_version and a null one are fine (informational); an unknown fingerprint method only
    warns (a later minor version may add one)."""
    edit_json(single / CONFIG, lambda c: c.pop("deltahub_version"))
    load_delta(single)
    edit_json(single / CONFIG, lambda c: c.update(deltahub_version=None))
    load_delta(single)
    edit_json(
        single / CONFIG, lambda c: c.update(fingerprint={"method": "digest-v9", "samples_per_parameter": 0})
    )
    with pytest.warns(UserWarning, match="unknown fingerprint method 'digest-v9'"):
        assert load_delta(single).fingerprint == {}
    empty = save_delta(SparseDelta({}), single.parent / "empty")
    edit_json(empty / CONFIG, lambda c: c.update(values_dtype=None))
    assert len(load_delta(empty)) == 0
