"""The SparseDelta type: construction checks, arithmetic against dense references, metadata rules."""

import pytest
import torch

from deltahub import BaseMismatchError, ParamDelta, SparseDelta
from deltahub.fingerprint import sample_positions, samples_match


def pd(idx, vals, shape=(2, 5), dtype=torch.float32):
    return ParamDelta(torch.tensor(idx), torch.tensor(vals, dtype=torch.float32), shape, dtype)


def test_dense_view_places_values_row_major():
    d = pd([0, 6, 9], [1.0, -2.0, 3.0])
    expected = torch.zeros(2, 5)
    expected[0, 0], expected[1, 1], expected[1, 4] = 1.0, -2.0, 3.0
    assert torch.equal(d.dense(), expected)
    assert d.nnz == 3 and d.numel == 10 and d.density == pytest.approx(0.3)


def test_indices_narrowed_to_int32():
    d = ParamDelta(torch.tensor([1, 2], dtype=torch.int64), torch.tensor([1.0, 2.0]), (4,), torch.float32)
    assert d.indices.dtype == torch.int32


@pytest.mark.parametrize(
    ("idx", "vals", "match"),
    [
        ([3, 1], [1.0, 2.0], "strictly increasing"),
        ([1, 1], [1.0, 2.0], "strictly increasing"),
        ([0, 10], [1.0, 2.0], r"must lie in \[0, 10\)"),
        ([-1, 2], [1.0, 2.0], r"must lie in \[0, 10\)"),
        ([0, 1], [1.0, float("nan")], "NaN or infinite"),
        ([0, 1], [float("inf"), 1.0], "NaN or infinite"),
        ([0, 1, 2], [1.0, 2.0], "3 indices but 2 values"),
    ],
)
def test_invalid_param_delta_rejected(idx, vals, match):
    with pytest.raises(ValueError, match=match):
        pd(idx, vals)


def test_bad_dtypes_rejected():
    with pytest.raises(ValueError, match="indices dtype must be int32 or int64"):
        ParamDelta(torch.tensor([0.0]), torch.tensor([1.0]), (2,), torch.float32)
    with pytest.raises(ValueError, match="values dtype must be one of"):
        ParamDelta(torch.tensor([0]), torch.tensor([1.0], dtype=torch.float64), (2,), torch.float32)
    with pytest.raises(ValueError, match="1-D"):
        ParamDelta(torch.tensor([[0]]), torch.tensor([[1.0]]), (2,), torch.float32)


def test_arithmetic_matches_dense_reference():
    a = SparseDelta({"w": pd([0, 3, 7], [1.0, 2.0, -1.5]), "v": pd([1], [4.0], shape=(3,))})
    b = SparseDelta({"w": pd([3, 4], [0.5, 0.25])})
    total = 2 * a - b
    assert list(total) == ["w", "v"]
    assert torch.equal(total.dense("w"), 2 * a.dense("w") - b.dense("w"))
    assert torch.equal(total.dense("v"), 2 * a.dense("v"))
    # union of positions, overlapping ones summed once
    assert total["w"].indices.tolist() == [0, 3, 4, 7]
    assert torch.equal((-a).dense("w"), -a.dense("w"))


def test_self_difference_is_explicit_zeros():
    a = SparseDelta({"w": pd([0, 3], [1.0, 2.0])})
    diff = a - a
    assert diff["w"].indices.tolist() == [0, 3]
    assert torch.equal(diff["w"].values, torch.zeros(2))


def test_mapping_protocol_and_totals():
    a = SparseDelta({"w": pd([0, 3], [1.0, 2.0]), "v": pd([1], [4.0], shape=(3,))})
    assert len(a) == 2 and "w" in a and list(a.keys()) == ["w", "v"]
    assert a.nnz == 3 and a.numel == 13
    assert a.values_dtype == torch.float32
    assert a.to(torch.bfloat16).values_dtype == torch.bfloat16
    assert "nnz=3" in repr(a)


def test_adding_deltas_of_different_bases_refused():
    # The names differ but the fingerprints agree: one base, so they add (the name kept is the Hub id).
    a = SparseDelta({"w": pd([0], [1.0])}, base_model="./models/base", fingerprint={"w": (0.5012,) * 8})
    b = SparseDelta(
        {"w": pd([0], [1.0])}, base_model="org/b", base_revision="abc", fingerprint={"w": (0.5012,) * 8}
    )
    total = a + b
    assert (total.base_model, total.base_revision) == ("org/b", "abc") and total["w"].values.tolist() == [2.0]
    # The same checkpoint loaded in bf16 agrees within one bf16 rounding; other values do not.
    bf16 = SparseDelta({"w": pd([1], [1.0], dtype=torch.bfloat16)}, fingerprint={"w": (0.5,) * 8})
    assert (a + bf16).nnz == 2
    c = b.replace(fingerprint={"w": (0.5012,) * 7 + (0.25,)})
    with pytest.raises(BaseMismatchError, match=r"w: delta 1 was made on base values"):
        a + c
    c = SparseDelta({"w": pd([0], [1.0], shape=(5, 2))})
    with pytest.raises(BaseMismatchError, match=r"w: delta 1 has shape \[5, 2\]"):
        a + c


def test_fingerprint_positions_deterministic_and_name_dependent():
    assert sample_positions("a.weight", 1000) == sample_positions("a.weight", 1000)
    assert sample_positions("a.weight", 1000) != sample_positions("b.weight", 1000)
    assert all(0 <= p < 7 for p in sample_positions("x", 7))


def test_fingerprint_tolerates_dtype_change_but_not_other_values():
    base = torch.randn(1000)
    as_bf16 = base.to(torch.bfloat16)
    pos = torch.tensor(sample_positions("w", 1000))
    rec = tuple(base[pos].tolist())
    live_bf16 = tuple(as_bf16[pos].float().tolist())
    assert samples_match(rec, rec, torch.float32, torch.float32)
    assert samples_match(rec, live_bf16, torch.float32, torch.bfloat16)
    other = tuple((base[pos] * 1.01).tolist())
    assert not samples_match(rec, other, torch.float32, torch.float32)
    assert not samples_match(rec, other, torch.float32, torch.bfloat16)
    # same dtype means exact: a one-ulp change is a different base
    nudged = tuple(torch.nextafter(base[pos], torch.tensor(10.0)).tolist())
    assert not samples_match(rec, nudged, torch.float32, torch.float32)
