"""The overlap report: hand-counted overlaps and sign conflicts, the table and the JSON form."""

from __future__ import annotations

import json
import re

import pytest
import torch

from deltahub.delta import ParamDelta, SparseDelta
from deltahub.errors import BaseMismatchError
from deltahub.overlap import OverlapReport, ParamOverlap, overlap_report


def _p(indices, values, shape) -> ParamDelta:
    return ParamDelta(torch.tensor(indices), torch.tensor(values), shape, torch.float32)


# ``w`` (10 elements): positions 0, 2, 4, 8 are touched by two or more deltas; 3, 6, 9 by one.
# ``b`` (4 elements): position 1 touched by A and B, but B's value there is 0 (no sign, so no conflict).
# ``c``: only C touches it.
A = SparseDelta({"w": _p([0, 2, 4, 6], [1.0, -2.0, 3.0, 0.5], (2, 5)), "b": _p([1], [1.0], (4,))})
B = SparseDelta({"w": _p([2, 3, 4, 8], [4.0, 1.0, -1.0, -2.0], (2, 5)), "b": _p([1, 2], [0.0, 1.0], (4,))})
C = SparseDelta(
    {"w": _p([0, 4, 8, 9], [-3.0, 2.0, -0.5, 1.0], (2, 5)), "c": _p([0, 1, 2], [1.0, 2.0, 3.0], (3,))}
)


def test_hand_counts_with_unit_weights():
    report = overlap_report([A, B, C])
    # Signs per overlapping position of w: 0: + -;  2: - +;  4: + - +;  8: - -  -> conflicts at 0, 2, 4.
    assert report["w"] == ParamOverlap("w", 10, (4, 4, 4), overlap=4, sign_conflicts=3)
    assert report["b"] == ParamOverlap("b", 4, (1, 2, 0), overlap=1, sign_conflicts=0)
    assert report["c"] == ParamOverlap("c", 3, (0, 0, 3), overlap=0, sign_conflicts=0)
    assert [p.name for p in report.params] == ["w", "b", "c"]  # first-seen order
    assert (report.overlap, report.sign_conflicts, report.nnz) == (5, 3, (5, 6, 7))


def test_weights_sign_the_values():
    # C negated: 0: + +;  2: - +;  4: + - -;  8: - +  -> conflicts at 2, 4, 8.
    report = overlap_report([A, B, C], weights=[1.0, 0.5, -1.0])
    assert (report["w"].overlap, report["w"].sign_conflicts) == (4, 3)
    # Subtracting a delta from itself conflicts everywhere; a zero weight touches but has no sign.
    assert overlap_report([A, A], weights=[1.0, -1.0])["w"].sign_conflicts == 4
    zero = overlap_report([A, A], weights=[1.0, 0.0])
    assert (zero["w"].overlap, zero["w"].sign_conflicts) == (4, 0)


def test_to_dict_is_json_serialisable():
    d = json.loads(json.dumps(overlap_report([A, B, C], weights=[1, 0.5, -1]).to_dict()))
    assert d["num_deltas"] == 3 and d["weights"] == [1.0, 0.5, -1.0]
    assert d["params"]["w"] == {"numel": 10, "nnz": [4, 4, 4], "overlap": 4, "sign_conflicts": 3}
    assert d["totals"] == {
        "params": 3,
        "params_with_overlap": 2,
        "nnz": [5, 6, 7],
        "overlap": 5,
        "sign_conflicts": 3,
    }


def test_table_lists_only_overlapping_parameters_and_totals():
    text = str(overlap_report([A, B, C]))
    lines = text.splitlines()
    assert lines[0] == "overlap of 3 deltas (weights 1, 1, 1) over 3 parameters"
    assert re.match(
        r"parameter\s+nnz\[0\]\s+nnz\[1\]\s+nnz\[2\]\s+overlap\s+sign conflicts\s+conflict %$", lines[1]
    )
    rows = {line.split()[0]: line.split()[1:] for line in lines if line and line[0] in "wbct"}
    assert rows["w"] == ["4", "4", "4", "4", "3", "75.0"]
    assert rows["b"] == ["1", "2", "0", "1", "0", "0.0"]
    assert "c" not in rows
    assert lines[-1].startswith("total (2 of 3 parameters overlap)") and lines[-1].split()[-5:] == [
        "6",
        "7",
        "5",
        "3",
        "60.0",
    ]
    # Columns line up: every row has the same width up to its last cell.
    widths = {len(line) for line in lines[1:] if not line.startswith("-")}
    assert len(widths) == 1


def test_no_overlap_message():
    text = str(overlap_report([SparseDelta({"w": A["w"]}), SparseDelta({"b": A["b"]})]))
    assert text == "overlap of 2 deltas (weights 1, 1) over 2 parameters: no overlapping positions"


def test_huge_parameter_is_not_densified():
    shape = (2**31, 2**31)  # 2**62 elements: any dense tensor fails to allocate
    a = SparseDelta(
        {"w": ParamDelta(torch.tensor([3, 2**62 - 1]), torch.tensor([1.0, 2.0]), shape, torch.float32)}
    )
    b = SparseDelta(
        {"w": ParamDelta(torch.tensor([3, 2**61]), torch.tensor([-1.0, 2.0]), shape, torch.float32)}
    )
    report = overlap_report([a, b])
    assert (report["w"].overlap, report["w"].sign_conflicts) == (1, 1)


def test_validation():
    with pytest.raises(ValueError, match="got 1 weights for 2 deltas"):
        overlap_report([A, B], weights=[1.0])
    assert (
        overlap_report([A.replace(base_model="x"), B.replace(base_model="y")]).overlap == 3
    )  # names: info only
    x, y = A.replace(fingerprint={"b": (1.0,)}), B.replace(fingerprint={"b": (2.0,)})
    with pytest.raises(BaseMismatchError, match="different base weights"):
        overlap_report([x, y])
    assert overlap_report([x, y], force=True).overlap == 3
    with pytest.raises(TypeError, match=r"force must be True or False; got 3\.0"):
        overlap_report([x, y], force=3.0)
    with pytest.raises(KeyError, match="no parameter 'zzz'"):
        overlap_report([A])["zzz"]
    assert isinstance(overlap_report([A]), OverlapReport)
