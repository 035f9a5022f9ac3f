"""Combination methods: hand-computed cases for every built-in, the registry's checks and combine's contract."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch
from torch.testing import assert_close

from deltahub import methods
from deltahub.delta import ParamDelta, SparseDelta, add_deltas
from deltahub.errors import BaseMismatchError, MethodOptionError, UnknownMethodError
from deltahub.methods import (
    MethodOption,
    MethodSpec,
    available_methods,
    combine,
    get_method,
    register_method,
    resolve_options,
)
from deltahub.methods.dare import keep_mask
from deltahub.sparse_ops import top_fraction


def _p(indices, values, shape=(2, 5), dtype=torch.float32) -> ParamDelta:
    return ParamDelta(torch.tensor(indices), torch.tensor(values, dtype=dtype), shape, torch.float32)


def _delta(base_model: str | None = "tiny", **params: ParamDelta) -> SparseDelta:
    return SparseDelta(params, base_model=base_model, provenance={"algorithm": "hand"})


# Three deltas on one 10-element parameter ``w`` (shape 2x5). Positions 0, 2, 4 and 8 are touched by two or
# more deltas, with mixed signs; 3, 6 and 9 by one.
A = _delta(w=_p([0, 2, 4, 6], [1.0, -2.0, 3.0, 0.5]))
B = _delta(w=_p([2, 3, 4, 8], [4.0, 1.0, -1.0, -2.0]))
C = _delta(w=_p([0, 4, 8, 9], [-3.0, 2.0, -0.5, 1.0]))
WEIGHTS = [1.0, 0.5, -1.0]
# Weighted inputs v_i = w_i * D_i, per position (used by every expected value below):
#   0: A 1,  C 3          2: A -2, B 2          3: B 0.5
#   4: A 3,  B -0.5, C -2 6: A 0.5              8: B -1, C 0.5      9: C -1


def _check(result: SparseDelta, name: str, indices: list[int], values: list[float]) -> None:
    p = result[name]
    assert p.values.dtype == torch.float32
    assert torch.equal(p.indices.to(torch.int64), torch.tensor(indices, dtype=torch.int64))
    assert_close(p.values, torch.tensor(values, dtype=torch.float32), rtol=0, atol=0)


@pytest.fixture
def scratch_registry(monkeypatch):
    """Lets a test register methods without leaking them into other tests."""
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))


# ---- sum ----------------------------------------------------------------------------------------------------


def test_sum_hand_case_keeps_cancelled_zero():
    result = combine([A, B, C], weights=WEIGHTS, method="sum")
    # Position 2 cancels (-2 + 2) and stays, as in add_deltas.
    _check(result, "w", [0, 2, 3, 4, 6, 8, 9], [4.0, 0.0, 0.5, 0.5, 0.5, -0.5, -1.0])


def test_sum_matches_add_deltas_bit_for_bit():
    assert combine([A, B, C], weights=WEIGHTS).equal(add_deltas([A, B, C], WEIGHTS))


def test_default_weights_are_one():
    _check(combine([A, B]), "w", [0, 2, 3, 4, 6, 8], [1.0, 2.0, 1.0, 2.0, 0.5, -2.0])


def test_single_delta_fast_path_returns_values_unchanged_as_float32():
    d = _delta(w=_p([1, 3, 7], [0.5, 0.0, -1.25], dtype=torch.bfloat16))
    result = combine([d])
    assert torch.equal(result["w"].indices, d["w"].indices)
    assert torch.equal(result["w"].values, d["w"].values.to(torch.float32))  # the stored zero stays
    assert result["w"].shape == (2, 5) and result["w"].dtype == torch.float32


def test_negation_is_weight_minus_one():
    _check(combine([A], weights=[-1.0]), "w", [0, 2, 4, 6], [-1.0, 2.0, -3.0, -0.5])


# ---- magnitude ----------------------------------------------------------------------------------------------


def test_magnitude_hand_case():
    # density 0.5 of 4 entries keeps 2 per delta: A {2: -2, 4: 3}, B {2: 4, 8: -2}, C {0: -3, 4: 2}.
    # Weighted: 0: 3;  2: -2 + 2 = 0 (dropped);  4: 3 - 2 = 1;  8: -1.
    result = combine([A, B, C], weights=WEIGHTS, method="magnitude", method_options={"density": 0.5})
    _check(result, "w", [0, 4, 8], [3.0, 1.0, -1.0])


def test_magnitude_ties_in_magnitude_keep_lower_positions():
    d = _delta(w=_p([0, 1, 2, 3, 5], [1.0, -2.0, 2.0, -1.0, -2.0]))
    # ceil(0.4 * 5) = 2 of the three |2|s at positions 1, 2, 5: the lower two.
    _check(combine([d], method="magnitude", method_options={"density": 0.4}), "w", [1, 2], [-2.0, 2.0])
    # ceil(0.5 * 5) = 3: all three |2|s, none of the |1|s.
    _check(
        combine([d], method="magnitude", method_options={"density": 0.5}), "w", [1, 2, 5], [-2.0, 2.0, -2.0]
    )
    # Any non-zero density keeps at least one entry.
    _check(combine([d], method="magnitude", method_options={"density": 1e-9}), "w", [1], [-2.0])


def test_magnitude_trims_each_delta_relative_to_its_own_entries():
    small = _delta(w=_p([9], [0.25]))  # its one entry survives any density, though tiny next to A's
    result = combine([A, small], method="magnitude", method_options={"density": 0.25})
    _check(result, "w", [4, 9], [3.0, 0.25])


def test_magnitude_density_one_is_sum_without_zeros():
    result = combine([A, B, C], weights=WEIGHTS, method="magnitude", method_options={"density": 1.0})
    _check(result, "w", [0, 3, 4, 6, 8, 9], [4.0, 0.5, 0.5, 0.5, -0.5, -1.0])


def test_top_fraction_ceil_is_exact_for_decimal_fractions():
    # 0.07 * 100 == 7.000000000000001 in binary floating point; the intended count is 7.
    idx, vals = torch.arange(100), torch.arange(100, dtype=torch.float32)
    assert top_fraction(idx, vals, 0.07)[0].tolist() == list(range(93, 100))


# ---- ties ---------------------------------------------------------------------------------------------------


def test_ties_hand_case_without_trimming():
    # Totals: 0: 4 (+), 2: 0 (no sign: dropped), 3: 0.5, 4: 0.5 (+), 6: 0.5, 8: -0.5 (-), 9: -1.
    # Disjoint means: 0: (1 + 3) / 2 = 2;  4: only A's 3 agrees;  8: only B's -1 agrees.
    result = combine([A, B, C], weights=WEIGHTS, method="ties", method_options={"density": 1.0})
    _check(result, "w", [0, 3, 4, 6, 8, 9], [2.0, 0.5, 3.0, 0.5, -1.0, -1.0])


def test_ties_weights_vote_before_the_election():
    # Same deltas, all weights 1: now C's -3 outweighs A's 1 at position 0, and 2 elects B's +4.
    #   0: 1 - 3 = -2 -> -3;  2: -2 + 4 -> 4;  4: 3 - 1 + 2 -> (3 + 2) / 2;  8: -2 - 0.5 -> (-2 - 0.5) / 2
    result = combine([A, B, C], weights=[1.0, 1.0, 1.0], method="ties", method_options={"density": 1.0})
    _check(result, "w", [0, 2, 3, 4, 6, 8, 9], [-3.0, 4.0, 1.0, 2.5, 0.5, -1.25, 1.0])


def test_ties_hand_case_with_trimming():
    # Trimmed as in magnitude: A {2: -2, 4: 3}, B*0.5 {2: 2, 8: -1}, C*-1 {0: 3, 4: -2}.
    # 0: 3;  2: -2 + 2 = 0, dropped;  4: total 1 (+), only 3 agrees;  8: -1.
    result = combine([A, B, C], weights=WEIGHTS, method="ties", method_options={"density": 0.5})
    _check(result, "w", [0, 4, 8], [3.0, 3.0, -1.0])


def test_ties_elects_by_total_mass_not_by_count():
    big = _delta(w=_p([0], [5.0]))
    small = _delta(w=_p([0], [-1.0]))
    # Two votes for minus, but the mass 5 - 1 - 1 = 3 is positive: the lone positive value wins.
    _check(combine([big, small, small], method="ties", method_options={"density": 1.0}), "w", [0], [5.0])


def test_ties_zero_total_position_is_dropped():
    d = _delta(w=_p([3, 4], [1.5, 2.0]))
    _check(combine([d, d], weights=[1.0, -1.0], method="ties", method_options={"density": 1.0}), "w", [], [])


# ---- dare ---------------------------------------------------------------------------------------------------


def _reference_mask(seed: int, position: int, name: str, nnz: int, density: float) -> torch.Tensor:
    """The documented recipe, written out independently: changing it changes every published DARE merge."""
    key = f"deltahub.dare\x00{seed}\x00{position}\x00{name}\x00{nnz}".encode()
    g = torch.Generator().manual_seed(
        int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)
    )
    return torch.rand(nnz, generator=g, dtype=torch.float64) < density


def test_dare_density_one_is_sum_without_zeros():
    result = combine([A, B, C], weights=WEIGHTS, method="dare", method_options={"density": 1.0, "seed": 3})
    _check(result, "w", [0, 3, 4, 6, 8, 9], [4.0, 0.5, 0.5, 0.5, -0.5, -1.0])


def test_dare_keeps_the_documented_mask_and_rescales():
    a_kept = _reference_mask(7, 0, "w", 4, 0.5)
    c_kept = _reference_mask(7, 1, "w", 4, 0.5)
    assert torch.equal(keep_mask(seed=7, position=0, name="w", nnz=4, density=0.5), a_kept)
    # Expected by hand from the masks: kept entries doubled (1 / 0.5), C negated by its weight.
    expected = torch.zeros(10)
    a_idx, a_val = torch.tensor([0, 2, 4, 6]), torch.tensor([1.0, -2.0, 3.0, 0.5])
    c_idx, c_val = torch.tensor([0, 4, 8, 9]), torch.tensor([-3.0, 2.0, -0.5, 1.0])
    expected.index_add_(0, a_idx[a_kept], 2 * a_val[a_kept])
    expected.index_add_(0, c_idx[c_kept], -2 * c_val[c_kept])
    result = combine([A, C], weights=[1.0, -1.0], method="dare", method_options={"density": 0.5, "seed": 7})
    assert_close(result.dense("w").view(-1), expected, rtol=0, atol=0)
    assert set(result["w"].indices.tolist()) == set(torch.nonzero(expected).view(-1).tolist())


def test_dare_is_deterministic_and_seed_dependent():
    big = _delta(w=_p(list(range(0, 2000, 2)), [float(i % 7 + 1) for i in range(1000)], shape=(2000,)))
    other = _delta(w=_p(list(range(1, 2000, 3)), [-float(i % 5 + 1) for i in range(667)], shape=(2000,)))
    first = combine(
        [big, other], weights=[1.0, 0.5], method="dare", method_options={"density": 0.3, "seed": 11}
    )
    again = combine(
        [big, other], weights=[1.0, 0.5], method="dare", method_options={"density": 0.3, "seed": 11}
    )
    assert first.equal(again)
    assert not first.equal(
        combine([big, other], weights=[1.0, 0.5], method="dare", method_options={"density": 0.3, "seed": 12})
    )
    # The same delta at two list positions gets two independent masks (identical masks would cancel to nothing).
    twice = combine(
        [big, big], weights=[1.0, -1.0], method="dare", method_options={"density": 0.5, "seed": 11}
    )
    assert twice.nnz > 0


def test_dare_mask_depends_on_parameter_name():
    assert not torch.equal(
        keep_mask(seed=0, position=0, name="a", nnz=500, density=0.5),
        keep_mask(seed=0, position=0, name="b", nnz=500, density=0.5),
    )


def test_dare_keep_rate_and_expectation():
    n = 20000
    mask = keep_mask(seed=0, position=0, name="w", nnz=n, density=0.3)
    assert abs(mask.double().mean().item() - 0.3) < 0.02
    # Rescaling makes DARE unbiased: the mean over seeds approaches the plain weighted sum.
    mean = torch.zeros(10)
    seeds = 400
    for seed in range(seeds):
        mean += (
            combine([A, B], weights=[1.0, 0.5], method="dare", method_options={"density": 0.5, "seed": seed})
            .dense("w")
            .view(-1)
        )
    target = combine([A, B], weights=[1.0, 0.5]).dense("w").view(-1)
    # At density 0.5 each weighted input v is kept (as 2v) or dropped with equal odds: standard deviation |v|
    # per seed, so |v| / sqrt(400) for the mean; per position, 5 sigma of the inputs that land there.
    a, b = A.dense("w").view(-1), 0.5 * B.dense("w").view(-1)
    sigma = (a**2 + b**2).sqrt() / seeds**0.5
    assert (mean / seeds - target).abs().le(5 * sigma).all(), (mean / seeds, target)
    # that tolerance is tight enough to tell a DARE without the 1/density rescale (mean = target / 2) apart
    assert ((target / 2 - target).abs() > 5 * sigma).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dare_mask_is_device_independent():
    cpu = combine([A, B, C], weights=WEIGHTS, method="dare", method_options={"density": 0.5, "seed": 5})
    gpu_deltas = [
        d.replace(
            params={n: ParamDelta(p.indices.cuda(), p.values.cuda(), p.shape, p.dtype) for n, p in d.items()}
        )
        for d in (A, B, C)
    ]
    gpu = combine(gpu_deltas, weights=WEIGHTS, method="dare", method_options={"density": 0.5, "seed": 5})
    assert torch.equal(gpu["w"].indices.cpu(), cpu["w"].indices)
    assert torch.equal(gpu["w"].values.cpu(), cpu["w"].values)


# ---- combine's contract -------------------------------------------------------------------------------------

ALL_METHODS = [
    ("sum", {}),
    ("magnitude", {"density": 0.4}),
    ("ties", {"density": 0.6}),
    ("dare", {"density": 0.5}),
]


def _multi_param_deltas() -> list[SparseDelta]:
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(3):
        params = {}
        for name, shape in [("x.weight", (8, 16)), ("y.bias", (16,)), (f"only{k}", (4, 4))][k % 2 :]:
            numel = shape[0] * (shape[1] if len(shape) > 1 else 1)
            idx = torch.randperm(numel, generator=g)[: numel // 3].sort().values
            params[name] = ParamDelta(idx, torch.randn(idx.numel(), generator=g), shape, torch.float32)
        out.append(_delta(**params))
    return out


@pytest.mark.parametrize(("method", "options"), ALL_METHODS)
def test_results_are_float32_subsets_of_the_union_in_first_seen_order(method, options):
    deltas = _multi_param_deltas()
    result = combine(deltas, weights=[0.5, -1.0, 2.0], method=method, method_options=options)
    seen: list[str] = []
    for d in deltas:
        seen += [n for n in d if n not in seen]
    assert list(result) == seen
    for name, p in result.items():
        touched = set().union(*(set(d[name].indices.tolist()) for d in deltas if name in d))
        assert set(p.indices.tolist()) <= touched
        assert p.values.dtype == torch.float32 and p.shape == next(d[name].shape for d in deltas if name in d)
    assert result.base_model == "tiny"


@pytest.mark.parametrize(("method", "options"), ALL_METHODS)
def test_never_densifies(method, options):
    # 2**62 elements: a dense copy would need 16 EiB, more than any address space, so any O(numel) step fails
    # at once (even where the OS overcommits memory).
    shape = (2**31, 2**31)
    a = _delta(
        w=ParamDelta(
            torch.tensor([5, 2**61, 2**62 - 1]), torch.tensor([1.0, -2.0, 3.0]), shape, torch.float32
        )
    )
    b = _delta(w=ParamDelta(torch.tensor([5, 2**61 + 1]), torch.tensor([1.0, 4.0]), shape, torch.float32))
    result = combine([a, b], weights=[1.0, 1.0], method=method, method_options=options)
    assert set(result["w"].indices.tolist()) <= {5, 2**61, 2**61 + 1, 2**62 - 1}
    assert result["w"].indices.dtype == torch.int64


def test_provenance_records_method_resolved_options_and_inputs():
    result = combine([A, B], weights=[1.0, -0.5], method="dare", method_options={"density": 0.25})
    assert result.provenance == {
        "operation": "combine",
        "method": "dare",
        "options": {"density": 0.25, "seed": 0},
        "inputs": [
            {"weight": 1.0, "provenance": {"algorithm": "hand"}},
            {"weight": -0.5, "provenance": {"algorithm": "hand"}},
        ],
    }


def test_integer_options_are_coerced():
    assert resolve_options("ties", {"density": 1}) == {"density": 1.0}
    assert isinstance(resolve_options("ties", {"density": 1})["density"], float)
    # Any integer seed works, however large, and gives a reproducible result.
    big = combine([A, B], method="dare", method_options={"seed": 10**40})
    assert big.equal(combine([A, B], method="dare", method_options={"seed": 10**40}))


def test_base_identity_is_content_not_the_recorded_name():
    on = {"w": (1.0, 2.0)}
    same = [
        A.replace(base_model="./models/base", fingerprint=on),
        B.replace(base_model="alice/base", fingerprint=on),
    ]
    assert combine(same, method="ties").base_model == "alice/base"  # the Hub id is the name kept
    other = B.replace(fingerprint={"w": (1.0, 2.5)})
    with pytest.raises(
        BaseMismatchError, match=r"different base weights \(1 parameters differ\).*force=True"
    ) as err:
        combine([same[0], other], method="ties")
    assert "w: delta 1 was made on base values [1.0, 2.5]..., delta 0 on [1.0, 2.0]..." in str(err.value)
    assert combine([same[0], other], method="ties", force=True).nnz > 0


def test_float32_overflow_is_reported_not_stored():
    with pytest.raises(
        ValueError, match=r"combination method 'sum' gave an invalid result for w: .*infinite"
    ):
        combine([A, B], weights=[1e38, 1e38])


# ---- validation and the registry ----------------------------------------------------------------------------


def test_available_methods():
    assert available_methods() == ["dare", "magnitude", "sum", "ties"]
    assert get_method("ties").options["density"].default == 0.5
    assert get_method("dare").defaults == {"density": 0.5, "seed": 0}


def test_unknown_method_lists_valid_names():
    message = "unknown combination method 'tie'; valid methods: dare, magnitude, sum, ties"
    with pytest.raises(UnknownMethodError, match=re.escape(message)):
        combine([A], method="tie")
    with pytest.raises(ValueError, match=re.escape(message)):  # also a ValueError
        get_method("tie")


def test_unknown_option_names_it_and_lists_valid_ones():
    with pytest.raises(
        MethodOptionError, match=re.escape("method 'ties' has no option 'densty'; valid options: density")
    ):
        combine([A, B], method="ties", method_options={"densty": 0.3})
    with pytest.raises(MethodOptionError, match=re.escape("valid options: density, seed")):
        combine([A, B], method="dare", method_options={"density": 0.3, "sed": 1})
    with pytest.raises(
        MethodOptionError, match=re.escape("combination method 'sum' takes no options; got 'density'")
    ):
        combine([A, B], method_options={"density": 0.3})


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), "0.5", True, None])
def test_out_of_range_density(bad):
    message = f"option 'density' of combination method 'magnitude' must be a number in (0, 1]; got {bad!r}"
    with pytest.raises(MethodOptionError, match=re.escape(message)):
        combine([A, B], method="magnitude", method_options={"density": bad})


def test_seed_must_be_an_integer():
    with pytest.raises(
        MethodOptionError,
        match=re.escape("option 'seed' of combination method 'dare' must be an integer; got 1.5"),
    ):
        combine([A, B], method="dare", method_options={"seed": 1.5})


def test_all_option_problems_reported_at_once():
    with pytest.raises(MethodOptionError) as info:
        combine([A, B], method="dare", method_options={"density": 2.0, "seed": "x", "sed": 1})
    text = str(info.value)
    assert "'sed'" in text and "got 2.0" in text and "got 'x'" in text


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0], "got 1 weights for 2 deltas; give one weight per delta"),
        ([1.0, float("nan")], "weight 1 must be a finite number; got nan"),
        ([float("-inf"), 1.0], "weight 0 must be a finite number; got -inf"),
        (["1", 1.0], "weight 0 must be a finite number; got '1'"),
    ],
)
def test_bad_weights(weights, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        combine([A, B], weights=weights, method="ties")


def test_no_deltas_and_wrong_types():
    with pytest.raises(ValueError, match="need at least one delta"):
        combine([])
    assert combine(A).equal(combine([A]))  # one delta needs no list
    with pytest.raises(TypeError, match=r"items 1 \(dict\) are not"):
        combine([A, {}])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="deltas must be a delta"):
        combine({"w": A})  # type: ignore[arg-type]


def test_validation_happens_before_any_work(scratch_registry):
    calls = []

    def spy(entries, weights, *, name, numel):
        calls.append(name)
        return entries[0]

    register_method(MethodSpec("spy", spy, {}, "records calls"))
    with pytest.raises(ValueError, match="give one weight per delta"):
        combine([A, B], weights=[1.0], method="spy")
    assert calls == []


def test_duplicate_registration_is_rejected(scratch_registry):
    with pytest.raises(ValueError, match=re.escape("combination method 'sum' is already registered")):
        register_method(MethodSpec("sum", lambda entries, weights, **_: entries[0], {}, "another sum"))


@pytest.mark.parametrize("name", ["Sum", "my-merge", "1st", "", "class", "a b", "_private"])
def test_malformed_names_are_rejected(scratch_registry, name):
    with pytest.raises(ValueError, match="name must be a lowercase identifier"):
        register_method(MethodSpec(name, lambda entries, weights, **_: entries[0], {}, "bad"))


def test_malformed_specs_are_rejected():
    with pytest.raises(ValueError, match=r"option name 'weights' is reserved"):
        MethodSpec("ok", lambda *a, **k: None, {"weights": MethodOption(1.0, "clash")}, "x")
    with pytest.raises(ValueError, match="function must be callable"):
        MethodSpec("ok", None, {}, "x")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=re.escape("MethodOption default 2.0 is invalid: it must be a number in [0, 1]")
    ):
        MethodOption(2.0, "x", low=0.0, high=1.0)
    with pytest.raises(TypeError, match="expects a MethodSpec"):
        register_method("sum")  # type: ignore[arg-type]


def test_registered_method_is_used_by_combine(scratch_registry):
    def largest(entries, weights, *, name, numel, scale):
        """Per position, the weighted value of largest magnitude, times ``scale``."""
        from deltahub.sparse_ops import union

        positions, slots = union([i for i, _ in entries])
        best = torch.zeros(positions.numel())
        for (_, v), slot, w in zip(entries, slots, weights, strict=True):
            v = v.float() * w
            best[slot] = torch.where(v.abs() > best[slot].abs(), v, best[slot])
        return positions, best * scale

    register_method(
        MethodSpec("largest", largest, {"scale": MethodOption(1.0, "multiplier", low=0.0)}, "max |v|")
    )
    assert "largest" in available_methods()
    result = combine([A, B, C], weights=WEIGHTS, method="largest", method_options={"scale": 2.0})
    _check(result, "w", [0, 2, 3, 4, 6, 8, 9], [6.0, -4.0, 1.0, 6.0, 1.0, -2.0, -2.0])
    with pytest.raises(MethodOptionError, match=re.escape("must be a number >= 0; got -1")):
        combine([A], method="largest", method_options={"scale": -1})


def test_registered_specs_are_immutable():
    spec = get_method("ties")
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.options["seed"] = MethodOption(0, "x", kind=int)  # type: ignore[index]
