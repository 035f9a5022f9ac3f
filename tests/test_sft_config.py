"""SftConfig validation and budget rules: every bad value names itself and its allowed range."""

import pytest
import torch
from tiny import tiny_gpt2, tiny_llama

from training import SftConfig, SftConfigError, SftStateError, get_sft_model
from training.model import budget, find_targets, random_positions


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "give exactly one of density"),
        ({"density": 0.1, "num_tunable_weights": 10}, "give exactly one of density"),
        ({"density": 0.0}, r"density must be a number in \(0, 1\]; got 0.0"),
        ({"density": 1.5}, r"density must be a number in \(0, 1\]; got 1.5"),
        ({"density": float("nan")}, "density must be a number"),
        ({"num_tunable_weights": 0}, "num_tunable_weights must be a positive integer; got 0"),
        ({"num_tunable_weights": 2.5}, "num_tunable_weights must be a positive integer; got 2.5"),
        (
            {"density": 0.1, "selection_algorithm": "lottery"},
            "selection_algorithm must be one of rigl, sm3; got 'lottery'",
        ),
        ({"density": 0.1, "reselection_steps": 0}, "reselection_steps must be an integer >= 1; got 0"),
        (
            {"density": 0.1, "selection_accumulation_steps": 30},
            r"selection_accumulation_steps must be an integer in \[1, reselection_steps=20\]; got 30",
        ),
        (
            {"density": 0.1, "initial_reselection_rate": 0},
            r"initial_reselection_rate must be a number in \(0, 1\]; got 0",
        ),
        (
            {"density": 0.1, "reselection_rate_policy": "step"},
            "reselection_rate_policy must be one of linear, cosine; got 'step'",
        ),
        ({"density": 0.1, "target_modules": []}, "target_modules must be a non-empty list"),
        (
            {"density": 0.1, "values_dtype": "int8"},
            "values_dtype must be one of float32, bfloat16, float16; got 'int8'",
        ),
        ({"density": 0.1, "seed": "x"}, "seed must be an integer; got 'x'"),
    ],
)
def test_bad_config_values_are_named(kwargs, match):
    with pytest.raises(SftConfigError, match=match):
        SftConfig(**kwargs)


def test_several_problems_reported_at_once_and_config_round_trips():
    with pytest.raises(SftConfigError, match=r"density must be.*reselection_steps must be"):
        SftConfig(density=2.0, reselection_steps=-1)
    cfg = SftConfig(density=0.1, target_modules=["q_proj", "v_proj"], values_dtype="bf16")
    assert cfg.values_dtype == torch.bfloat16 and cfg.target_modules == ("q_proj", "v_proj")
    assert SftConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SftConfigError, match=r"unknown SftConfig fields \['densty'\]"):
        SftConfig.from_dict({"densty": 0.1})


def test_default_targets_are_the_decoder_linears_not_the_head():
    llama = find_targets(tiny_llama(), None)
    assert len(llama) == 14 and "lm_head" not in llama
    gpt2 = find_targets(tiny_gpt2(), None)  # Conv1D layers, tied head excluded
    assert set(n.rsplit(".", 1)[-1] for n in gpt2) == {"c_attn", "c_proj", "c_fc"}


def test_targets_by_suffix_and_regex_and_a_clear_error_when_nothing_matches():
    model = tiny_llama()
    assert set(find_targets(model, ("q_proj", "v_proj"))) == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    }
    assert set(find_targets(model, r".*layers\.1\.mlp\..*")) == {
        f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")
    }
    with pytest.raises(
        SftConfigError,
        match=r"matches no linear layer.*down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
    ):
        find_targets(model, ("query",))


def test_budget_split_in_proportion_to_size():
    model = tiny_llama()
    targets = find_targets(model, None)
    total = sum(p.numel() for p in model.parameters())
    ks = budget(model, targets, SftConfig(density=0.02))
    n = int(0.02 * total)
    target_total = sum(m.weight.numel() for m in targets.values())
    assert ks == {name: n * m.weight.numel() // target_total for name, m in targets.items()}
    with pytest.raises(SftConfigError, match=r"exceeds the .* weights of the targeted modules"):
        budget(model, targets, SftConfig(num_tunable_weights=10**9))


def test_random_positions_are_unique_seeded_and_uniform_enough():
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    a, b = random_positions(10**7, 1000, gen()), random_positions(10**7, 1000, gen())
    assert torch.equal(a, b) and a.unique().numel() == 1000 and int(a.max()) < 10**7
    small = random_positions(40, 30, gen())
    assert sorted(small.tolist()) == sorted(set(small.tolist())) and len(small) == 30
    counts = torch.bincount(
        torch.cat([random_positions(100, 10, torch.Generator().manual_seed(s)) for s in range(500)]),
        minlength=100,
    )
    assert counts.min() > 20 and counts.max() < 90  # every position is chosen about 50 times


def test_preparing_twice_is_refused():
    model = get_sft_model(tiny_llama(), SftConfig(density=0.01))
    with pytest.raises(SftStateError, match="already prepared"):
        get_sft_model(model, SftConfig(density=0.01))
