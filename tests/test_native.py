"""The native fused sum (deltahub/native.py, csrc/sparse_sum.c) gives torch's bits, edge cases included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import random_delta, tiny_gpt2, tiny_llama, tokens
from transformers import AutoModelForCausalLM

from deltahub import apply_deltas, load_model, native, save_delta
from deltahub.apply import _BITS, _checksum, add_in_place, add_sum
from deltahub.checkpoint import StoredTensor
from deltahub.delta import ParamDelta
from deltahub.sparse_ops import weighted_sum

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the native sum is not built")

TENSOR_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
VALUE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def reference(base: torch.Tensor, parts, shortcut: bool) -> torch.Tensor:
    """What combine(method="sum") then add_in_place give, with torch only."""
    out = base.clone()
    if shortcut:
        change = parts[0][0].with_values_dtype(torch.float32)
    else:
        idx, vals = weighted_sum([(p.indices, p.values) for p, _ in parts], [w for _, w in parts])
        change = ParamDelta._trusted(idx, vals, parts[0][0].shape, parts[0][0].dtype)
    add_in_place(out, change, revertible=False)
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.element_size()])


SPECIAL = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0, -65520.0, 2.0**-24, 2.0**-25, 1e-45]


@settings(max_examples=60, deadline=None, database=None)
@given(
    st.sampled_from(TENSOR_DTYPES),
    st.lists(
        st.tuples(st.sampled_from(VALUE_DTYPES), st.sampled_from([1.0, -1.0, 0.5, 2.0, -0.3, 1e-3, 7.0])),
        min_size=1,
        max_size=5,
    ),
    st.integers(0, 2**31 - 1),
    st.booleans(),
)
def test_the_kernel_gives_torch_bits(tensor_dtype, lists, seed, dense_overlap):
    gen = torch.Generator().manual_seed(seed)
    numel = 3000
    base = (torch.randn(numel, generator=gen) * 10.0 ** torch.randint(-7, 4, (numel,), generator=gen)).to(
        tensor_dtype
    )
    base[: len(SPECIAL)] = torch.tensor(SPECIAL).to(tensor_dtype)
    parts = []
    for values_dtype, weight in lists:
        k = int(numel * (0.5 if dense_overlap else 0.05))
        idx = torch.randperm(numel, generator=gen)[:k].sort().values
        vals = torch.randn(k, generator=gen) * 10.0 ** torch.randint(-9, 3, (k,), generator=gen)
        vals[:4] = torch.tensor([-0.0, 0.0, 1e-40, -3e-39])
        parts.append((ParamDelta(idx, vals.to(values_dtype), (numel,), tensor_dtype), weight))
    shortcut = len(parts) == 1 and parts[0][1] == 1.0
    want = reference(base, parts, shortcut)
    got = base.clone()
    saved = add_sum(got, parts, shortcut=shortcut)
    assert torch.equal(bits(got), bits(want))
    # The originals are the base's elements at each delta's own positions; the checksum is torch's.
    for (_, original), (p, _) in zip(saved.pairs, parts, strict=True):
        assert torch.equal(bits(original), bits(base[p.indices.long()]))
    expected = sum(int(_checksum(got[p.indices.long()], p.indices)) for p, _ in parts)
    assert saved.checksum == (expected + 2**63) % 2**64 - 2**63


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_to_half_types_matches_torch_on_every_edge(dtype):
    """Every float32 exponent with mantissas at and around the rounding ties, plus random bit patterns: the
    kernel's round-to-nearest-even (subnormals, overflow to infinity, NaN payloads) is torch's."""
    mantissas = [0, 1, 0x7FFF, 0x8000, 0x8001, 0x18000, 0xFFF, 0x1000, 0x1001, 0x3000, 0x7FFFFF, 0x400000]
    patterns = [(s << 31) | (e << 23) | m for s in (0, 1) for e in range(256) for m in mantissas]
    patterns += np.random.default_rng(0).integers(0, 2**32, 200_000, dtype=np.uint64).tolist()
    values = torch.from_numpy(np.array(patterns, dtype=np.uint32).view(np.float32).copy())
    finite = values[torch.isfinite(values)]  # a delta's values are finite; the base may be anything
    for base_values, delta_values in ((torch.zeros_like(finite), finite), (values, torch.zeros_like(values))):
        base = base_values.to(dtype)
        p = ParamDelta._trusted(torch.arange(base.numel()), delta_values, (base.numel(),), dtype)
        want = reference(base, [(p, 1.0)], shortcut=True)
        got = base.clone()
        add_sum(got, [(p, 1.0)], shortcut=True, revertible=False)
        assert torch.equal(bits(got), bits(want))
    # And straight from float32 to the half type: a zero base plus the value is the value (+0.0 + -0.0 is +0.0).
    zero = torch.zeros(finite.numel(), dtype=dtype)
    p = ParamDelta._trusted(torch.arange(zero.numel()), finite, (zero.numel(),), dtype)
    add_sum(zero, [(p, 1.0)], shortcut=True, revertible=False)
    assert torch.equal(bits(zero), bits((finite + 0.0).to(dtype)))


def test_int64_positions_of_a_parameter_past_2_31():
    # The kernel reads int64 positions; a small tensor stands in (positions checked against its size).
    t = torch.zeros(10, dtype=torch.bfloat16)
    p = ParamDelta._trusted(torch.tensor([1, 9], dtype=torch.int64), torch.tensor([1.0, 2.0]), (10,), t.dtype)
    add_sum(t, [(p, 1.0), (p, 0.5)], shortcut=False)
    assert t.tolist() == [0, 1.5, 0, 0, 0, 0, 0, 0, 0, 3.0]
    bad = ParamDelta._trusted(torch.tensor([1, 10]), torch.ones(2), (10,), t.dtype)
    with pytest.raises(ValueError, match=r"positions \[1, 10\] outside elements \[0, 10\) of the tensor"):
        add_sum(t, [(bad, 1.0)], shortcut=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_deltas_is_the_same_with_and_without_the_kernel(monkeypatch, dtype):
    models, handles = [], []
    for use_native in (True, False):
        if not use_native:
            monkeypatch.setattr(native, "library", lambda: None)
        model = tiny_llama(dtype)
        deltas = [
            random_delta(model, 0.3, seed=s, scale=0.2, values_dtype=v) for s, v in enumerate(VALUE_DTYPES)
        ]
        handles.append(apply_deltas(model, deltas, weights=[1.0, -0.5, 2.0]))
        models.append(model)
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True):
        assert torch.equal(bits(a), bits(b)), name
    assert torch.equal(
        handles[0].combined["lm_head.weight"].values, handles[1].combined["lm_head.weight"].values
    )
    before = {k: v.clone() for k, v in tiny_llama(dtype).state_dict().items()}
    for model, handle in zip(models, handles, strict=True):
        handle.revert()
        for name, v in model.state_dict().items():
            assert torch.equal(bits(v), bits(before[name])), name


def test_a_single_unweighted_delta_keeps_negative_zero(monkeypatch):
    # combine's shortcut adds a lone delta of weight 1 as it is: -0.0 + -0.0 stays -0.0 (with "0 +" first it
    # would be +0.0). Both paths keep that, on GPT-2 (tied embedding) as on any model.
    model = tiny_gpt2()
    d = random_delta(model, 0.2, names=["transformer.wte.weight", "transformer.h.0.mlp.c_fc.weight"])
    zeros = ParamDelta(torch.tensor([0, 5]), torch.tensor([-0.0, -0.0]), (32, 128), torch.float32)
    d = d.replace(params={**d, "transformer.h.1.mlp.c_fc.weight": zeros})
    results = []
    for use_native in (True, False):
        if not use_native:
            monkeypatch.setattr(native, "library", lambda: None)
        target = tiny_gpt2()
        target.transformer.h[1].mlp.c_fc.weight.data.view(-1)[:6] = -0.0
        apply_deltas(target, d)
        results.append(target)
    for (name, a), b in zip(results[0].state_dict().items(), results[1].state_dict().values(), strict=True):
        assert torch.equal(bits(a), bits(b)), name
    assert torch.signbit(results[0].transformer.h[1].mlp.c_fc.weight.view(-1)[0])


def test_load_model_reads_touched_weights_from_the_file_and_matches_apply(tmp_path, monkeypatch):
    reads = []
    real_read = StoredTensor.read
    monkeypatch.setattr(StoredTensor, "read", lambda self: reads.append(self) or real_read(self))
    model = tiny_llama(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    deltas = [random_delta(model, 0.1, seed=s, scale=0.3, values_dtype=torch.bfloat16) for s in range(3)]
    for i, d in enumerate(deltas):
        save_delta(d, tmp_path / f"d{i}")
    loaded = load_model(str(tmp_path / "base"), [tmp_path / f"d{i}" for i in range(3)], dtype=torch.bfloat16)
    # The reference: a plain load (same buffers: from_pretrained keeps the rotary table in float32) plus apply.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    apply_deltas(model, deltas)
    for (name, a), b in zip(loaded.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(bits(a), bits(b)), name
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert len(reads) == len(set().union(*deltas))  # every touched tensor read from the file, none cloned
    reads.clear()
    # A dtype from_pretrained converts to: the touched tensors are no longer the file's bytes, and are copied.
    as_f32 = load_model(str(tmp_path / "base"), [tmp_path / "d0"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    apply_deltas(ref, [deltas[0]])
    for (name, a), b in zip(as_f32.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(bits(a), bits(b)), name
    assert reads == []


def test_an_overflowing_sum_or_a_failing_method_changes_nothing():
    model = tiny_llama(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deltas = [random_delta(model, 0.2, seed=s) for s in range(2)]
    with pytest.raises(ValueError, match="overflows float32"):
        apply_deltas(model, deltas, weights=[1.0, 3e39])  # 3e39 is infinite in float32
    for name, v in model.state_dict().items():
        assert torch.equal(bits(v), bits(before[name])), name
    # A method that fails on the third parameter: the two already changed are restored.
    from deltahub.methods import _REGISTRY, MethodSpec, register_method

    seen = []

    def flaky(entries, weights, *, name, numel):
        seen.append(name)
        if len(seen) == 3:
            raise RuntimeError("flaky")
        return weighted_sum(entries, weights)

    register_method(MethodSpec("flaky_test", flaky))
    try:
        with pytest.raises(RuntimeError, match="flaky"):
            apply_deltas(model, deltas, method="flaky_test")
    finally:
        del _REGISTRY["flaky_test"]
    for name, v in model.state_dict().items():
        assert torch.equal(bits(v), bits(before[name])), name
