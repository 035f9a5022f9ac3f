"""deltahub.convert_adapter: SFT-fork adapters, peft LoRA adapters and composable-sft diffs as deltas, each checked
against an independent reference of what the source tool itself does with its file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny import tiny_gpt2, tiny_llama, tokens
from transformers import AutoModelForCausalLM

import deltahub
from deltahub import (
    BaseMismatchError,
    ConversionError,
    UnconvertedAdapterError,
    convert_adapter,
    load_delta,
    save_delta,
)

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.0.mlp.up_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("convert") / "base"
    tiny_llama().save_pretrained(folder)
    return folder


def state_of(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


def assert_state_equal(model, expected: dict[str, torch.Tensor]) -> None:
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


# ---- the SFT fork --------------------------------------------------------------------------------------------


def fork_adapter(folder: Path, base: Path, *, fmt: str = "safetensors", index_dtype=torch.int32, extra=None):
    """An adapter as the fork's save_pretrained writes it: per module unsorted flat positions and values."""
    gen = torch.Generator().manual_seed(7)
    weights = state_of(base)
    state, truth = {}, {}
    for module in MODULES:
        numel = weights[f"{module}.weight"].numel()
        idx = torch.randperm(numel, generator=gen)[: numel // 10]  # slot order, not sorted (as after RigL)
        vals = torch.randn(idx.numel(), generator=gen) * 0.1
        state[f"base_model.model.{module}.sft_delta.indices"] = idx.to(index_dtype)
        state[f"base_model.model.{module}.sft_delta.values"] = vals
        truth[module] = (idx, vals)
    state.update(extra or {})
    folder.mkdir(parents=True)
    config = {
        "peft_type": "SFT",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "revision": None,
        "density": 0.1,
        "selection_algorithm": "sm3",
        "target_modules": ["q_proj", "up_proj", "down_proj"],
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        save_file(state, str(folder / "adapter_model.safetensors"))
    else:
        torch.save(state, folder / "adapter_model.bin")
    return truth


@pytest.mark.parametrize(("fmt", "index_dtype"), [("safetensors", torch.int32), ("bin", torch.int64)])
def test_sft_fork_adapter_round_trips_exactly(tmp_path, base, fmt, index_dtype):
    truth = fork_adapter(tmp_path / "adapter", base, fmt=fmt, index_dtype=index_dtype)
    # The fork's own merge: W.view(-1)[idx] += v, on the base weights.
    expected = state_of(base)
    for module, (idx, vals) in truth.items():
        expected[f"{module}.weight"].view(-1)[idx.long()] += vals

    delta = convert_adapter(tmp_path / "adapter")  # the base its adapter_config.json records
    assert delta.base_model == str(base) and delta.provenance["source_format"] == "sft-fork"
    assert set(delta) == {f"{m}.weight" for m in MODULES}
    model = deltahub.load_model(str(base), [delta])  # fingerprint-checked against the base
    assert_state_equal(model, expected)
    # saved and reloaded: the same bits
    assert load_delta(save_delta(delta, tmp_path / "delta")).equal(delta)


def test_sft_fork_repeated_positions_are_summed_like_its_forward(tmp_path, base):
    name = "model.layers.0.self_attn.q_proj"
    idx = torch.tensor([5, 3, 5, 9], dtype=torch.int32)
    vals = torch.tensor([0.25, -1.0, 0.5, 2.0])
    fork_adapter(tmp_path / "a", base, extra={f"base_model.model.{name}.sft_delta.indices": idx,
                                             f"base_model.model.{name}.sft_delta.values": vals})  # fmt: skip
    delta = convert_adapter(tmp_path / "a")
    p = delta[f"{name}.weight"]
    assert p.indices.tolist() == [3, 5, 9] and p.values.tolist() == [
        -1.0,
        0.75,
        2.0,
    ]  # the fork's scatter-sum
    assert delta.provenance["repeated_positions_summed"] == 1


def test_every_verb_names_deltahub_convert_for_a_fork_folder(tmp_path, base):
    fork_adapter(tmp_path / "adapter", base)
    folder = str(tmp_path / "adapter")
    expected = rf"adapter of the SFT fork of peft.*`deltahub convert {folder} --out adapter-delta`"
    with pytest.raises(UnconvertedAdapterError, match=expected):
        load_delta(folder)
    with pytest.raises(UnconvertedAdapterError, match="deltahub convert"):
        deltahub.load_model(str(base), [folder])
    with pytest.raises(UnconvertedAdapterError, match="deltahub convert"):
        deltahub.overlap_report([folder, folder])
    with pytest.raises(UnconvertedAdapterError, match="deltahub convert"):
        load_delta(tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(UnconvertedAdapterError, match="deltahub convert"):
        deltahub.push_delta(folder, "alice/never-sent")  # refused before any request


def test_replaced_modules_need_drop_head(tmp_path, base):
    extra = {"base_model.model.lm_head.weight": torch.zeros(64, 32)}  # modules_to_save: replaces, not adds
    fork_adapter(tmp_path / "a", base, extra=extra)
    with pytest.raises(
        ConversionError, match=r"replace base weights.*'base_model\.model\.lm_head\.weight'.*--drop-head"
    ):
        convert_adapter(tmp_path / "a")
    delta = convert_adapter(tmp_path / "a", drop_head=True)
    assert "lm_head.weight" not in delta and delta.provenance["dropped"] == [
        "base_model.model.lm_head.weight"
    ]


def test_wrong_base_is_refused(tmp_path, base):
    fork_adapter(tmp_path / "a", base)
    delta = convert_adapter(tmp_path / "a")
    other = tmp_path / "other"
    tiny_llama(seed=1).save_pretrained(other)
    with pytest.raises(BaseMismatchError, match="different base"):
        deltahub.load_model(str(other), [delta])
    gpt2 = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(gpt2)
    with pytest.raises(
        ConversionError, match=r"changes model\.layers\.\S+\.weight, which the base .*gpt2 does not have"
    ):
        convert_adapter(tmp_path / "a", base=str(gpt2))


class _Pwned:
    """A pickle payload: unpickling it would run os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickles_that_are_not_weights_only_are_refused_without_running(tmp_path, base):
    marker = tmp_path / "ran"
    fork_adapter(tmp_path / "a", base, fmt="bin")
    state = torch.load(tmp_path / "a" / "adapter_model.bin", weights_only=True)
    state["evil"] = _Pwned(marker)
    torch.save(state, tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(
        ConversionError, match=r"not a weights-only pickle \(it needs posix\.system, which is code"
    ):
        convert_adapter(tmp_path / "a")
    assert not marker.exists()
    (tmp_path / "c").mkdir()
    torch.save({"diffs": {}, "abs": {}, "x": _Pwned(marker)}, tmp_path / "c" / "pytorch_diff.bin")
    with pytest.raises(ConversionError, match="not a weights-only pickle"):
        convert_adapter(tmp_path / "c", base=str(base))
    assert not marker.exists()


# ---- peft LoRA -----------------------------------------------------------------------------------------------


def lora_adapter(folder: Path, base: Path, **config):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base)
    settings = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "init_lora_weights": False,
    }
    peft_model = get_peft_model(model, LoraConfig(**{**settings, **config}))
    peft_model.save_pretrained(folder)
    return peft_model


@pytest.mark.parametrize(
    "config", [{}, {"use_rslora": True, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 3}}]
)
def test_lora_at_full_density_gives_merge_and_unload_logits(tmp_path, base, config):
    peft_model = lora_adapter(tmp_path / "lora", base, **config)
    delta = convert_adapter(tmp_path / "lora", density=1.0, progress=False)
    assert delta.provenance["relative_error"] == 0.0 and delta.base_model == str(base)
    merged = peft_model.merge_and_unload().eval()
    composed = deltahub.load_model(str(base), [delta]).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(composed(x).logits, merged(x).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(composed(x).logits, AutoModelForCausalLM.from_pretrained(base)(x).logits)


def test_lora_on_gpt2_conv1d_is_transposed(tmp_path):
    base = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(base)
    peft_model = lora_adapter(tmp_path / "lora", base, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    delta = convert_adapter(tmp_path / "lora", density=1.0, progress=False)
    merged = peft_model.merge_and_unload().eval()
    composed = deltahub.load_model(str(base), [delta]).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(composed(x).logits, merged(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scope", ["parameter", "global"])
def test_lora_kept_to_a_budget_reports_the_error_dropped(tmp_path, base, scope):
    peft_model = lora_adapter(tmp_path / "lora", base)
    # The dense changes, from peft itself, for an independent error figure.
    dense = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            dense[name.removeprefix("base_model.model.") + ".weight"] = module.get_delta_weight(
                "default"
            ).detach()
    total = sum(d.numel() for d in dense.values())
    delta = convert_adapter(tmp_path / "lora", num=total // 10, scope=scope, progress=False)
    assert delta.nnz == total // 10 if scope == "global" else abs(delta.nnz - total // 10) <= len(dense)
    kept_sq = full_sq = 0.0
    for name, d in dense.items():
        p = delta[name]
        flat = d.reshape(-1)
        torch.testing.assert_close(p.values, flat[p.indices.long()], rtol=0, atol=1e-7)  # the exact entries
        if scope == "parameter":  # each weight keeps its own largest entries
            assert p.values.abs().min() >= flat.abs().sort(descending=True).values[p.nnz - 1] - 1e-7
        kept_sq += float(p.values.double().square().sum())
        full_sq += float(flat.double().square().sum())
    assert math.isclose(
        delta.provenance["relative_error"], math.sqrt((full_sq - kept_sq) / full_sq), rel_tol=1e-6
    )
    assert 0 < delta.provenance["relative_error"] < 1


def test_lora_variants_that_are_not_additive_are_refused(tmp_path, base):
    lora_adapter(tmp_path / "dora", base, use_dora=True)
    with pytest.raises(ConversionError, match="use_dora: DoRA rescales every column"):
        convert_adapter(tmp_path / "dora", density=1.0)
    lora_adapter(tmp_path / "ok", base)
    with pytest.raises(ValueError, match="give exactly one of density"):
        convert_adapter(tmp_path / "ok")
    with pytest.raises(UnconvertedAdapterError, match=r"a peft LoRA adapter.*deltahub convert"):
        load_delta(tmp_path / "ok")


# ---- composable-sft -----------------------------------------------------------------------------------------


def composable_diff(path: Path, base: Path, *, encoded: bool = True, head: bool = False):
    """A pytorch_diff.bin laid out as composable-sft saves it, and the reference of its ``apply``: each
    parameter += the dense form of its sparse difference."""
    gen = torch.Generator().manual_seed(3)
    weights = state_of(base)
    diffs, expected = {}, dict(weights)
    for name in [
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.norm.weight",
    ]:
        shape = weights[name].shape
        n = weights[name].numel() // 8
        flat = torch.randperm(weights[name].numel(), generator=gen)[:n]
        coords = torch.stack(torch.unravel_index(flat, shape))  # [ndim, n]
        sparse = torch.sparse_coo_tensor(coords, torch.randn(n, generator=gen) * 0.1, size=shape).coalesce()
        expected[name] = weights[name] + sparse.to_dense()
        if encoded:
            # Its encoder: a flat index with the FIRST dimension fastest, sorted, as steps; the first one a
            # numpy integer, as numpy's matmul leaves it.
            c = sparse.indices().numpy().astype(np.int64)
            multipliers = np.cumprod([1, *list(shape)[:-1]], dtype=np.int64)
            index = multipliers @ c
            order = np.argsort(index)
            index = index[order]
            steps = [index[0], *(index[1:] - index[:-1]).tolist()]
            diffs[name] = {
                "size": sparse.size(),
                "index_steps": steps,
                "values": sparse.values()[torch.from_numpy(order)],
            }
        else:
            diffs[name] = sparse
    heads = {"lm_head.weight": torch.zeros(64, 32)} if head else {}
    data = {"diffs": diffs, "abs": heads} if encoded else {"body": diffs, **({"head": heads} if head else {})}
    path.mkdir(parents=True)
    torch.save(data, path / "pytorch_diff.bin")
    return expected


@pytest.mark.parametrize("encoded", [True, False])
def test_composable_sft_diff_round_trips_exactly(tmp_path, base, encoded):
    expected = composable_diff(tmp_path / "sft", base, encoded=encoded)
    for source in (tmp_path / "sft", tmp_path / "sft" / "pytorch_diff.bin"):
        delta = convert_adapter(source, base=str(base))
        assert delta.provenance["source_format"] == "composable-sft"
        assert_state_equal(deltahub.load_model(str(base), [delta]), expected)
    with pytest.raises(
        UnconvertedAdapterError, match=r"a composable-sft diff \(pytorch_diff\.bin\).*deltahub convert"
    ):
        load_delta(tmp_path / "sft")
    with pytest.raises(ConversionError, match="does not record its base model; pass the base"):
        convert_adapter(tmp_path / "sft")


@pytest.mark.parametrize("encoded", [True, False])
def test_composable_sft_head_is_refused_unless_dropped(tmp_path, base, encoded):
    expected = composable_diff(tmp_path / "sft", base, encoded=encoded, head=True)
    part = "abs" if encoded else "head"
    with pytest.raises(ConversionError, match=rf"REPLACE the base's values \(its '{part}' part.*--drop-head"):
        convert_adapter(tmp_path / "sft", base=str(base))
    delta = convert_adapter(tmp_path / "sft", base=str(base), drop_head=True)
    assert delta.provenance["dropped"] == ["lm_head.weight"]
    assert_state_equal(deltahub.load_model(str(base), [delta]), expected)


def test_not_an_adapter(tmp_path, base):
    with pytest.raises(ConversionError, match="is not an adapter deltahub converts"):
        convert_adapter(base)
    with pytest.raises(FileNotFoundError, match="no adapter at"):
        convert_adapter(tmp_path / "nothing")
