"""apply_deltas / revert / load_model on real tiny transformers models, against dense float32 references."""

import pytest
import torch
from tiny import random_delta, tiny_gpt2, tiny_llama, tokens

from deltahub import (
    BaseMismatchError,
    ParamDelta,
    RevertError,
    SparseDelta,
    apply_deltas,
    load_model,
    save_delta,
)
from deltahub.fingerprint import fingerprint_of

MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at the magnitude of ``x`` (floored at the smallest subnormal)."""
    _, exp = torch.frexp(x.float())
    tiny = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}[dtype]
    return torch.clamp(torch.ldexp(torch.ones_like(x.float()), exp - 1 - MANTISSA_BITS[dtype]), min=tiny)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v.view(-1).view(torch.uint8), snap[k].view(-1).view(torch.uint8)), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_matches_dense_reference_within_one_ulp(dtype):
    model = tiny_llama(dtype)
    base = snapshot(model)
    deltas = [random_delta(model, 0.1, seed=s) for s in range(3)]
    weights = [1.0, -0.5, 2.0]
    apply_deltas(model, deltas, weights=weights)
    after = model.state_dict()
    touched = set().union(*deltas)
    for name, w in base.items():
        if name not in touched:
            assert torch.equal(after[name].view(torch.uint8), w.view(torch.uint8)), name
            continue
        ref = w.float() + sum(
            wt * d.dense(name) if name in d else 0 for d, wt in zip(deltas, weights, strict=True)
        )
        ref = ref.to(dtype)
        err = (after[name].float() - ref.float()).abs()
        assert bool((err <= ulp(ref, dtype)).all()), f"{name}: max error {err.max()}"
        # positions no delta touched keep their exact bits, even inside touched tensors
        mask = torch.zeros(w.numel(), dtype=torch.bool)
        for d in deltas:
            if name in d:
                mask[d[name].indices.long()] = True
        untouched = ~mask.view(w.shape)
        assert torch.equal(after[name][untouched].view(torch.uint8), w[untouched].view(torch.uint8))


def test_apply_changes_logits_and_revert_restores_them_exactly():
    model = tiny_llama()
    x = tokens()
    with torch.no_grad():
        before = model(x).logits
        handle = apply_deltas(model, random_delta(model, 0.2, seed=1, scale=0.5))
        during = model(x).logits
        handle.revert()
        after = model(x).logits
    assert not torch.allclose(before, during)
    assert torch.equal(before, after)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weights_one_and_minus_one_give_back_the_base_bit_exactly(dtype):
    model = tiny_llama(dtype)
    base = snapshot(model)
    d = random_delta(model, 0.3, seed=4, scale=1.0)
    apply_deltas(model, [d, d], weights=[1.0, -1.0])
    assert_bit_identical(model, base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_revert_is_bit_exact_after_stacking_three_deltas(dtype):
    model = tiny_llama(dtype)
    base = snapshot(model)
    handles = [apply_deltas(model, random_delta(model, 0.2, seed=s, scale=0.3)) for s in range(3)]
    for h in reversed(handles):
        h.revert()
    assert_bit_identical(model, base)
    # one call with three deltas reverts the same way
    h = apply_deltas(model, [random_delta(model, 0.2, seed=s) for s in range(3)], weights=[0.3, 1.0, -2.0])
    h.revert()
    assert_bit_identical(model, base)


def test_reverting_out_of_order_is_refused_unless_forced():
    model = tiny_llama()
    base = snapshot(model)
    first = apply_deltas(model, random_delta(model, 0.5, seed=1))
    second = apply_deltas(model, random_delta(model, 0.5, seed=2))
    with pytest.raises(RevertError, match="revert deltas applied later first"):
        first.revert()
    second.revert()
    first.revert()
    assert_bit_identical(model, base)
    with pytest.raises(RevertError, match="already reverted"):
        first.revert()


def test_force_reverts_out_of_order_writing_back_the_saved_originals():
    model = tiny_llama()
    base = snapshot(model)
    d1 = random_delta(model, 0.5, seed=1)
    first = apply_deltas(model, d1)
    d2 = random_delta(model, 0.5, seed=2)  # made on the model as it now is
    second = apply_deltas(model, d2)
    both = snapshot(model)
    with pytest.raises(RevertError, match=r"revert deltas applied later first.*revert\(force=True\)"):
        first.revert()
    assert first.active  # refused: still active, nothing written
    assert_bit_identical(model, both)
    first.revert(force=True)
    assert not first.active
    state = model.state_dict()
    for name, p in d1.items():
        # the first delta's positions hold the base again; every other position keeps what the second wrote
        expected = both[name].clone().view(-1)
        expected[p.indices] = base[name].view(-1)[p.indices]
        assert torch.equal(state[name].view(-1), expected), name
    for name in set(d2) - set(d1):
        assert torch.equal(state[name], both[name]), name
    assert second.active


def test_non_contiguous_targets_match_a_dense_reference_and_revert_exactly():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 6, generator=gen).t()  # a transposed view: shape (6, 8), not contiguous
    other = torch.randn(4, 10, generator=gen)[:, ::2]  # a strided slice: shape (4, 5)
    assert not weight.is_contiguous() and not other.is_contiguous()
    target = {"w": weight, "o": other}
    before = {k: v.clone() for k, v in target.items()}
    delta = SparseDelta(
        {
            "w": ParamDelta(torch.tensor([0, 7, 9, 47]), torch.tensor([1.0, -2.0, 0.5, 3.0]), (6, 8), torch.float32),
            "o": ParamDelta(torch.tensor([1, 4, 19]), torch.tensor([0.25, -1.0, 2.0]), (4, 5), torch.float32),
        }
    )
    handle = apply_deltas(target, delta, force=True)
    for name, p in delta.items():
        reference = before[name].contiguous().view(-1).clone()  # flat row-major positions of the logical shape
        reference[p.indices] += p.values
        assert torch.equal(target[name].contiguous().view(-1), reference), name
    assert target["w"].data_ptr() == weight.data_ptr()  # changed in place, through the view
    handle.revert()
    for name in target:
        assert torch.equal(target[name], before[name])


def test_a_model_on_the_meta_device_is_refused_even_with_force():
    from transformers import LlamaForCausalLM

    real = tiny_llama()
    with torch.device("meta"):
        meta = LlamaForCausalLM(real.config)
    d = random_delta(real, 0.1)
    for force in (False, True):
        with pytest.raises(BaseMismatchError, match="is on the meta device; load the base weights before applying"):
            apply_deltas(meta, d, force=force)


def test_check_base_lists_ten_problems_and_counts_the_rest():
    model, other = tiny_llama(seed=0), tiny_llama(seed=1)
    d = random_delta(model, 0.1)
    assert len(d) > 10
    with pytest.raises(BaseMismatchError) as info:
        apply_deltas(other, d)
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"the deltas were made on a different base ({len(d)} parameters differ)")
    assert len(lines) == 1 + 10 + 1
    assert lines[-1] == f"  - ... and {len(d) - 10} more"
    assert len(info.value.problems) == 11


def test_context_manager_reverts_on_exit():
    model = tiny_llama()
    base = snapshot(model)
    with apply_deltas(model, random_delta(model)) as handle:
        assert handle.active and handle.nbytes > 0
    assert not handle.active
    assert_bit_identical(model, base)


def test_state_dict_target_and_tied_aliases_applied_once():
    model = tiny_gpt2()
    base = snapshot(model)
    names = ["transformer.wte.weight", "lm_head.weight"]
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    d = random_delta(model, 0.1, seed=3, names=["transformer.wte.weight"])
    # the same entries under both tied names: applied once, not twice
    both = SparseDelta(
        {n: d["transformer.wte.weight"] for n in names}, fingerprint=fingerprint_of(base, names)
    )
    handle = apply_deltas(model, both)
    expected = (base["transformer.wte.weight"].float() + d.dense("transformer.wte.weight")).float()
    assert torch.equal(model.transformer.wte.weight.detach(), expected)
    handle.revert()
    assert_bit_identical(model, base)
    # different entries for the two names of one tensor is an error
    other = random_delta(model, 0.1, seed=4, names=["transformer.wte.weight"])["transformer.wte.weight"]
    clash = SparseDelta({names[0]: d[names[0]], names[1]: other})
    with pytest.raises(BaseMismatchError, match="one tied tensor"):
        apply_deltas(model, clash)
    assert_bit_identical(model, base)
    # a plain state dict works too
    sd = {k: v.clone() for k, v in base.items()}
    apply_deltas(sd, d).revert()
    assert all(torch.equal(sd[k], base[k]) for k in base)


def test_wrong_base_refused_and_force_applies():
    model, other = tiny_llama(seed=0), tiny_llama(seed=1)
    d = random_delta(model, 0.1)
    snap = snapshot(other)
    with pytest.raises(BaseMismatchError, match=r"made on a different base.*force=True") as info:
        apply_deltas(other, d)
    assert "model.layers.0.self_attn.q_proj.weight" in str(info.value)
    assert_bit_identical(other, snap)  # nothing written before the refusal
    apply_deltas(other, d, force=True).revert()


def test_fingerprint_accepts_the_same_base_in_another_dtype():
    d = random_delta(tiny_llama(torch.float32), 0.1)
    apply_deltas(tiny_llama(torch.bfloat16), d)  # no error: same weights, rounded


def test_missing_and_misshapen_parameters_refused_even_with_force():
    model = tiny_llama()
    bad = SparseDelta(
        {
            "model.layers.9.mlp.up_proj.weight": ParamDelta(
                torch.tensor([0]), torch.tensor([1.0]), (64, 32), torch.float32
            )
        }
    )
    with pytest.raises(BaseMismatchError, match=r"1 parameters not in the base.*layers\.9"):
        apply_deltas(model, bad, force=True)
    bad = SparseDelta(
        {
            "model.layers.0.mlp.up_proj.weight": ParamDelta(
                torch.tensor([0]), torch.tensor([1.0]), (32, 64), torch.float32
            )
        }
    )
    with pytest.raises(
        BaseMismatchError, match=r"up_proj.weight has shape \[64, 32\] in the base, \[32, 64\]"
    ):
        apply_deltas(model, bad, force=True)


def test_weights_must_pair_with_deltas():
    model = tiny_llama()
    with pytest.raises(ValueError, match="got 2 weights for 1 deltas"):
        apply_deltas(model, [random_delta(model)], weights=[1.0, 2.0])


def test_load_model_applies_saved_deltas_at_load_time(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    d1, d2 = random_delta(model, 0.1, seed=1, scale=0.3), random_delta(model, 0.1, seed=2, scale=0.3)
    save_delta(d1, tmp_path / "d1")
    loaded = load_model(str(tmp_path / "base"), [tmp_path / "d1", d2], weights=[1.0, -0.5])
    apply_deltas(model, [d1, d2], weights=[1.0, -0.5])
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    loaded.applied_deltas.revert()
    assert load_model(str(tmp_path / "base")).applied_deltas is None
