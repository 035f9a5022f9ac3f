"""Format 1.1's position storages (deltahub/format/encoding.py): sizes, choice, exact round trips, checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from format_helpers import assert_same, edit_json, problems_of, rehash
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from deltahub import DeltaFormatError, ParamDelta, SparseDelta
from deltahub.format import encoding, load_delta, save_delta
from deltahub.format.reader import read_delta

QUICK = settings(max_examples=150, deadline=None, database=None)


@st.composite
def position_sets(draw):
    """Sorted unique positions in [0, numel), clustered or spread, with gaps around the 255/65535 limits."""
    numel = draw(st.sampled_from([1, 7, 8, 9, 255, 256, 257, 4096, 65535, 65536, 65537, 300_000]))
    steps = draw(
        st.lists(
            st.sampled_from([1, 2, 254, 255, 256, 257, 65534, 65535, 65536, 65537]) | st.integers(1, 2000),
            max_size=40,
        )
    )
    positions, at = [], draw(st.integers(0, min(numel - 1, 70_000)))
    for step in [0, *steps]:
        at += step
        if at >= numel:
            break
        positions.append(at)
    return np.array(positions, dtype=np.int32), numel


@QUICK
@given(position_sets())
def test_every_storage_round_trips_and_the_choice_is_the_smallest(case):
    positions, numel = case
    gaps8, esc8 = encoding.encode_gaps(positions, numel, "U8")
    gaps16, esc16 = encoding.encode_gaps(positions, numel, "U16")
    bitmap = encoding.encode_bitmap(positions, numel)
    for gaps, escapes, code in ((gaps8, esc8, "U8"), (gaps16, esc16, "U16")):
        assert encoding.gaps_problems(gaps, code, escapes, numel) == []
        assert np.array_equal(encoding.decode_gaps(gaps, escapes, numel), positions)
    assert encoding.bitmap_problems(bitmap, numel, positions.size) == []
    assert np.array_equal(encoding.decode_bitmap(bitmap, numel, positions.size), positions)
    assert encoding.sparse_problems(positions, (numel,)) == []
    # The sizes the writer compares are the arrays' real byte counts.
    sizes = encoding.storage_sizes(positions, numel)
    assert sizes == {
        ("sparse", "I32"): positions.nbytes,
        ("gaps", "U8"): gaps8.nbytes + esc8.nbytes,
        ("gaps", "U16"): gaps16.nbytes + esc16.nbytes,
        ("bitmap", "U8"): bitmap.nbytes,
    }
    storage = encoding.choose_storage(positions, numel)
    if positions.size == numel:
        assert storage == ("dense", "")
    else:
        assert sizes[storage] == min(sizes.values())


def test_escapes_start_exactly_above_the_gap_type():
    positions = np.array([254, 509, 765, 765 + 65535, 765 + 65535 + 65536], dtype=np.int32)
    gaps, escapes = encoding.encode_gaps(positions, 200_000, "U8")
    assert gaps.tolist() == [255, 255, 0, 0, 0] and escapes.tolist() == [256, 65535, 65536]
    gaps, escapes = encoding.encode_gaps(positions, 200_000, "U16")
    assert gaps.tolist() == [255, 255, 256, 65535, 0] and escapes.tolist() == [65536]


def test_bitmap_bits_are_least_significant_first():
    bitmap = encoding.encode_bitmap(np.array([0, 3, 8, 10], dtype=np.int32), 11)
    assert bitmap.tolist() == [0b0000_1001, 0b0000_0101]


@pytest.mark.parametrize("numel", [2**31 - 1, 2**31, 2**31 + 5, 3 * 2**33])
def test_parameters_of_2_31_elements_and_more(numel):
    # No array of size numel is ever made: only the few positions (gaps decode at O(nnz)).
    positions = np.array([0, 1, 2**20, numel // 2, numel - 1], dtype=np.int64)
    gaps, escapes = encoding.encode_gaps(positions, numel, "U8")
    assert escapes.dtype == (np.int32 if numel < 2**31 else np.int64)
    assert encoding.gaps_problems(gaps, "U8", escapes, numel) == []
    decoded = encoding.decode_gaps(gaps, escapes, numel)
    assert decoded.dtype == encoding.index_dtype(numel) and decoded.tolist() == positions.tolist()
    # One past the end is caught from the sum alone, before any decoding.
    late = escapes.copy()
    late[-1] += 1
    assert "outside the parameter's" in encoding.gaps_problems(gaps, "U8", late, numel)[0]
    # A bitmap of the wrong length is refused before anything of size numel is allocated.
    assert "needs ceil(" in encoding.bitmap_problems(np.zeros(3, dtype=np.uint8), numel, 0)[0]
    assert encoding.choose_storage(positions, numel) == ("gaps", "U8")


def test_save_and_load_a_parameter_of_2_33_elements(tmp_path):
    numel_shape = (2**17, 2**16)  # 2**33 elements, stored in a few bytes
    idx = torch.tensor([5, 2**31 - 1, 2**31, 2**32 + 7, 2**33 - 1])
    delta = SparseDelta({"w": ParamDelta(idx, torch.arange(5.0), numel_shape, torch.bfloat16)})
    out = save_delta(delta, tmp_path / "d")
    assert (out / "delta.safetensors").stat().st_size < 4096
    loaded = load_delta(out)
    assert loaded["w"].indices.dtype == torch.int64
    assert_same(loaded, delta)


@pytest.mark.parametrize("values_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.0005, 0.01, 0.2, 0.6, 1.0])
def test_round_trip_at_every_density_and_values_dtype(tmp_path, values_dtype, density):
    gen = torch.Generator().manual_seed(1)
    shape = (300, 500)
    k = int(math.prod(shape) * density)
    idx = torch.randperm(math.prod(shape), generator=gen)[:k].sort().values
    values = (torch.randn(k, generator=gen) * 1e-3).to(values_dtype)
    values[: min(k, 3)] = torch.tensor([-0.0, 0.0, 65504.0][: min(k, 3)], dtype=values_dtype)
    delta = SparseDelta({"w": ParamDelta(idx, values, shape, torch.float32)})
    out = save_delta(delta, tmp_path / "d")
    assert_same(load_delta(out), delta)
    storage = json.loads((out / "delta_config.json").read_text())["parameters"]["w"]["storage"]
    assert storage == {0.0005: "gaps", 0.01: "gaps", 0.2: "bitmap", 0.6: "bitmap", 1.0: "dense"}[density]


def test_files_are_standard_safetensors(tmp_path):
    delta = SparseDelta(
        {
            "g": ParamDelta(torch.tensor([3, 4, 5, 700, 701]), torch.arange(5.0), (1000,), torch.float32),
            "b": ParamDelta(
                torch.tensor([0, 2, 5]), torch.ones(3, dtype=torch.bfloat16), (6,), torch.float32
            ),
        }
    )
    out = save_delta(delta, tmp_path / "d")
    with safe_open(str(out / "delta.safetensors"), "pt") as f:  # the reference reader opens every tensor
        assert f.get_tensor("g.gaps").tolist() == [4, 1, 1, 0, 1] and f.get_tensor("g.escapes").tolist() == [
            695
        ]
        assert f.get_tensor("b.bitmap").tolist() == [0b10_0101]
        assert torch.equal(f.get_tensor("b.values"), torch.ones(3, dtype=torch.bfloat16))


def test_saved_files_honour_the_umask(tmp_path):
    out = save_delta(
        SparseDelta({"w": ParamDelta(torch.tensor([1]), torch.ones(1), (4,), torch.float32)}), tmp_path / "d"
    )
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # the tensors as readable as the config and card


# ---------------------------------------------------------------------------------------------------------
# values_dtype


def test_values_dtype_stores_rounded_values_and_says_so(tmp_path):
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(1000, generator=gen) * 1e-3
    delta = SparseDelta({"w": ParamDelta(torch.arange(0, 3000, 3), values, (3000,), torch.bfloat16)})
    exact = load_delta(save_delta(delta, tmp_path / "exact"))
    assert torch.equal(exact["w"].values, values)
    out = save_delta(delta, tmp_path / "bf16", values_dtype="bfloat16")
    cfg = json.loads((out / "delta_config.json").read_text())
    assert cfg["values_dtype"] == "bfloat16"
    stored = load_delta(out)["w"].values
    assert stored.dtype == torch.bfloat16 and torch.equal(stored, values.to(torch.bfloat16))
    relative = ((stored.float() - values).abs() / values.abs()).max()
    assert 0 < relative <= 2**-8  # one round-to-nearest to an 8-bit significand
    assert (out / "delta.safetensors").stat().st_size < 0.65 * (
        tmp_path / "exact" / "delta.safetensors"
    ).stat().st_size


def test_values_dtype_that_overflows_or_is_unknown_is_refused(tmp_path):
    delta = SparseDelta({"w": ParamDelta(torch.tensor([0]), torch.tensor([1e6]), (2,), torch.float32)})
    with pytest.raises(ValueError, match=r"values of w do not fit float16 \(largest magnitude 1e\+06\)"):
        save_delta(delta, tmp_path / "d", values_dtype=torch.float16)
    with pytest.raises(
        ValueError, match="values_dtype must be one of float32, bfloat16, float16; got 'int8'"
    ):
        save_delta(delta, tmp_path / "d", values_dtype="int8")
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------------------------------------
# Checks of the new storages in files


def _gaps_delta(tmp_path):
    delta = SparseDelta(
        {"w": ParamDelta(torch.tensor([2, 3, 600, 601]), torch.arange(4.0), (1000,), torch.float32)}
    )
    return save_delta(delta, tmp_path / "d")


def _rewrite(folder, change) -> None:
    """Rewrite one tensor of delta.safetensors in place (same size), keeping the header but for the checksums,
    recorded anew (see ``rehash``): these tests are about the checks a crafted file meets."""
    path = folder / "delta.safetensors"
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    change(data, header, 8 + n)
    path.write_bytes(bytes(data))
    rehash(path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda d, h, s: d.__setitem__(s + h["w.gaps"]["data_offsets"][0], 0),
            "2 gaps are 0 .* but there are 1 escapes",
        ),
        (
            lambda d, h, s: d.__setitem__(s + h["w.gaps"]["data_offsets"][0] + 2, 9),
            "0 gaps are 0 .* but there are 1 escapes",
        ),
        (
            lambda d, h, s: d.__setitem__(
                slice(s + h["w.escapes"]["data_offsets"][0], s + h["w.escapes"]["data_offsets"][1]),
                (200).to_bytes(4, "little"),
            ),
            "escape 200 fits the U8 gaps",
        ),
        (
            lambda d, h, s: d.__setitem__(
                slice(s + h["w.escapes"]["data_offsets"][0], s + h["w.escapes"]["data_offsets"][1]),
                (5000).to_bytes(4, "little"),
            ),
            "escape 5000 exceeds the parameter's 1000 elements",
        ),
        (
            lambda d, h, s: d.__setitem__(
                slice(s + h["w.escapes"]["data_offsets"][0], s + h["w.escapes"]["data_offsets"][1]),
                (999).to_bytes(4, "little"),
            ),
            "the gaps add up to position 1003, outside the parameter's 1000 elements",
        ),
    ],
)
def test_corrupt_gaps_are_refused(tmp_path, edit, match):
    folder = _gaps_delta(tmp_path)
    _rewrite(folder, edit)
    with pytest.raises(DeltaFormatError, match=match):
        load_delta(folder)


def test_corrupt_bitmaps_are_refused(tmp_path):
    delta = SparseDelta({"w": ParamDelta(torch.tensor([0, 2, 4, 9]), torch.ones(4), (10,), torch.float32)})
    folder = save_delta(delta, tmp_path / "d")

    def set_byte(index, value):
        _rewrite(folder, lambda d, h, s: d.__setitem__(s + h["w.bitmap"]["data_offsets"][0] + index, value))

    set_byte(1, 0b0000_0110)  # position 9 moved to 10: past the end
    with pytest.raises(DeltaFormatError, match="bitmap sets bits past the parameter's 10 elements"):
        load_delta(folder)
    set_byte(1, 0b0000_0011)  # one position too many
    with pytest.raises(DeltaFormatError, match="bitmap marks 5 positions but there are 4 values"):
        load_delta(folder)


def test_new_storages_need_a_1_1_config(tmp_path):
    folder = _gaps_delta(tmp_path)
    edit_json(folder / "delta_config.json", lambda c: c.update(format_version="1.0"))
    problems = problems_of(folder)
    assert any("storage 'gaps' is format 1.1 but the config says format_version 1.0" in p for p in problems)


def test_a_storage_of_a_later_minor_version_asks_for_an_upgrade(tmp_path):
    folder = _gaps_delta(tmp_path)

    def later(cfg):
        cfg.update(format_version="1.4")
        cfg["parameters"]["w"]["storage"] = "rice"

    edit_json(folder / "delta_config.json", later)
    (folder / "delta.safetensors").write_bytes(
        (folder / "delta.safetensors")
        .read_bytes()
        .replace(b'"format_version":"1.1"', b'"format_version":"1.4"')
    )
    with pytest.raises(
        DeltaFormatError,
        match=r"storage 'rice' is not one this deltahub reads .* format 1\.4, newer than this deltahub's 1\.1; "
        r"upgrade deltahub: pip install -U deltahub",
    ):
        load_delta(folder)


def test_read_delta_needs_no_torch_tensors(tmp_path):
    raw = read_delta(_gaps_delta(tmp_path))
    p = raw["w"]
    assert isinstance(p.positions, np.ndarray) and p.positions.tolist() == [2, 3, 600, 601]
    assert (p.storage, p.values_dtype, p.dtype, p.shape) == ("gaps", "float32", "float32", (1000,))
