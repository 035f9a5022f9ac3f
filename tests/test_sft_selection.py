"""Reselection on hand-built gradients and values: schedule, drop, grow (RigL and SM3), slot state."""

import math

import pytest
import torch
from torch import nn

from training import SftAdamW, SftConfig, SftSelector, SftSM3, get_sft_model
from training.selection.schedule import Schedule
from training.selection.sm3 import grow_sm3


def one_layer(k: int = 12, algorithm: str = "rigl", **config):
    """A model with one 6x8 linear layer (48 weights) and k trainable slots."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6, bias=False))
    cfg = SftConfig(num_tunable_weights=k, selection_algorithm=algorithm, **config)
    model = get_sft_model(model, cfg)
    (layer,) = model.sft_layers.values()
    return model, layer


def test_schedule_windows_and_rates():
    s = Schedule(reselection_steps=10, accumulation_steps=3, total_steps=40, initial_rate=0.2)
    assert [t for t in range(1, 41) if s.is_reselection(t)] == [3, 13, 23, 33]
    assert [t for t in range(1, 41) if s.in_window(t)] == [1, 2, 3, 11, 12, 13, 21, 22, 23, 31, 32, 33]
    assert s.rate(3) == 1.0
    assert s.rate(13) == pytest.approx(0.2 * (1 - 13 / 40))
    cosine = Schedule(10, 3, 40, 0.2, "cosine")
    assert cosine.rate(23) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 23 / 40)))
    assert not Schedule(10, 3, 33, 0.2).is_reselection(33)  # none at or after T


def _rigl_window(model, layer, optimizer, selector, grads):
    """Feed one hand-built dense gradient per update step through the layer's observer."""
    for g in grads:
        assert layer.sft_observer is not None
        layer.sft_observer(g)
        optimizer.zero_grad()
        selector.step()


def test_first_rigl_reselection_replaces_the_random_set_with_the_top_accumulated_gradient():
    model, layer = one_layer(k=12, selection_accumulation_steps=2, reselection_steps=4)
    opt = SftAdamW([layer.sft_values], lr=0.1)
    selector = SftSelector(model, opt, total_update_steps=20)
    g1 = torch.randn(6, 8)
    g2 = torch.randn(6, 8)
    _rigl_window(model, layer, opt, selector, [g1, g2])
    total = (g1 + g2).view(-1)
    # Candidates are the top 2k |g| of the first observation; among them the top k |sum g| grow.
    candidates = torch.sort(g1.view(-1).abs(), descending=True, stable=True).indices[:24]
    expected = candidates[torch.sort(total[candidates].abs(), descending=True, stable=True).indices[:12]]
    assert sorted(layer.sft_indices.tolist()) == sorted(expected.tolist())
    assert layer.sft_observer is None  # window over: no dense gradient until the next one


def test_later_reselection_drops_smallest_values_and_follows_the_rate():
    model, layer = one_layer(k=12, selection_accumulation_steps=1, reselection_steps=3)
    opt = SftAdamW([layer.sft_values], lr=0.1)
    selector = SftSelector(model, opt, total_update_steps=30)
    _rigl_window(model, layer, opt, selector, [torch.randn(6, 8)])  # first reselection at step 1
    for _ in range(2):  # steps 2, 3 outside the window
        opt.zero_grad()
        selector.step()
    with torch.no_grad():
        layer.sft_values.copy_(torch.arange(1, 13, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(6))
    before = dict(zip(layer.sft_indices.tolist(), layer.sft_values.tolist(), strict=True))
    # step 4 is the reselection's one-step window: observe a gradient that is huge on inactive positions only
    g = torch.zeros(6, 8)
    inactive = [p for p in range(48) if p not in before]
    g.view(-1)[torch.tensor(inactive)] = torch.arange(1, len(inactive) + 1, dtype=torch.float32)
    _rigl_window(model, layer, opt, selector, [g])
    n = math.floor(12 * 0.2 * (1 - 4 / 30))
    after = dict(zip(layer.sft_indices.tolist(), layer.sft_values.tolist(), strict=True))
    dropped = sorted(before, key=lambda p: abs(before[p]))[:n]
    grown = sorted(inactive, key=lambda p: -g.view(-1)[p])[:n]
    assert sorted(after) == sorted(set(before) - set(dropped) | set(grown))
    assert len(after) == 12 and len(set(layer.sft_indices.tolist())) == 12
    for p in grown:
        assert after[p] == 0.0  # new slots start at zero
    for p in set(before) - set(dropped):
        assert after[p] == before[p]  # kept slots keep their values


def test_moved_slots_get_seeded_adam_state_and_kept_slots_keep_theirs():
    model, layer = one_layer(k=12, selection_accumulation_steps=2, reselection_steps=4)
    opt = SftAdamW([layer.sft_values], lr=0.1, betas=(0.9, 0.99))
    selector = SftSelector(model, opt, total_update_steps=20)
    initial = layer.sft_indices.clone()
    g = torch.randn(6, 8)
    _rigl_window(model, layer, opt, selector, [g, g])
    state = opt.state[layer.sft_values]
    moved = ~torch.isin(layer.sft_indices, initial)
    assert moved.sum() >= 6
    # seeded from the window: bias-corrected moments equal the mean gradient and mean squared gradient
    mean = g.view(-1)[layer.sft_indices[moved]]
    assert torch.equal(state["age"][moved], torch.full((int(moved.sum()),), 2, dtype=torch.int32))
    torch.testing.assert_close(state["exp_avg"][moved] / (1 - 0.9**2), mean)
    torch.testing.assert_close(state["exp_avg_sq"][moved] / (1 - 0.99**2), mean * mean)


def test_a_regrown_position_keeps_its_slot_state():
    """At a rate-1 reselection every slot is dropped; positions grown again must keep the Adam state they had
    (by position, wherever their slot moved), not restart from the window's seed."""
    model, layer = one_layer(k=12, selection_accumulation_steps=2, reselection_steps=4)
    opt = SftAdamW([layer.sft_values], lr=0.1, betas=(0.9, 0.99))
    selector = SftSelector(model, opt, total_update_steps=20)
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(6, 8, generator=gen)
    for step in (1, 2):
        layer.sft_observer(g)
        layer.sft_values.grad = torch.randn(12, generator=gen)  # real optimizer steps: non-zero state
        opt.step()
        opt.zero_grad()
        if step == 2:
            state = opt.state[layer.sft_values]
            before = {
                pos: (int(state["age"][i]), float(state["exp_avg"][i]), float(state["exp_avg_sq"][i]))
                for i, pos in enumerate(layer.sft_indices.tolist())
            }
        selector.step()  # step 2 ends the window: the first reselection (rate 1)
    assert all(age == 2 and m != 0.0 and v > 0.0 for age, m, v in before.values())
    state = opt.state[layer.sft_values]
    after = {
        pos: (int(state["age"][i]), float(state["exp_avg"][i]), float(state["exp_avg_sq"][i]))
        for i, pos in enumerate(layer.sft_indices.tolist())
    }
    regrown = set(before) & set(after)
    assert regrown  # the gradient of the window regrows some of the stepped positions
    for pos in regrown:
        assert after[pos] == before[pos], pos


def test_sm3_grows_the_largest_row_times_column_score():
    model, layer = one_layer(k=12, algorithm="sm3", selection_accumulation_steps=1, reselection_steps=5)
    opt = SftSM3([layer.sft_values], model.active_deltas(), lr=0.1, momentum=0.5)
    selector = SftSelector(model, opt, total_update_steps=30)
    initial = layer.sft_indices.clone()
    layer.sft_values.grad = torch.randn(12)
    opt.step()
    row, col = (t.clone() for t in opt.accumulators(layer.sft_values))
    opt.zero_grad()
    selector.step()  # first reselection (rate 1): every slot moves to the top-12 of row x col
    scores = (row[:, None] * col[None, :]).view(-1)
    expected = torch.sort(scores, descending=True, stable=True).indices[:12]
    assert torch.equal(torch.sort(layer.sft_indices).values, torch.sort(expected).values)
    # moved slots start with no momentum; SM3's row/column accumulators stay (they are the score)
    state = opt.state[layer.sft_values]
    fresh = ~torch.isin(layer.sft_indices, initial)
    assert fresh.any() and torch.equal(state["momentum"][fresh], torch.zeros(int(fresh.sum())))
    assert torch.equal(state["row"], row)


def test_sm3_chunked_growth_matches_the_dense_outer_product():
    torch.manual_seed(3)
    row, col = torch.rand(300), torch.rand(50)
    kept = torch.randperm(15000)[:400]
    import training.selection.sm3 as sm3

    old = sm3.CHUNK_ELEMENTS
    sm3.CHUNK_ELEMENTS = 777  # many chunks, ragged
    try:
        mask = torch.zeros(15000, dtype=torch.bool)
        mask[kept] = True
        got = grow_sm3(row, col, mask, 120)
    finally:
        sm3.CHUNK_ELEMENTS = old
    dense = (row[:, None] * col[None, :]).view(-1)
    dense[kept] = -1
    expected = torch.topk(dense, 120).indices
    assert torch.equal(torch.sort(got).values, torch.sort(expected).values)


def test_sm3_selection_needs_the_sm3_optimizer():
    model, layer = one_layer(algorithm="sm3")
    with pytest.raises(ValueError, match="SftSM3"):
        SftSelector(model, SftAdamW([layer.sft_values]), total_update_steps=10)
    with pytest.raises(TypeError, match=r"unknown arguments \['betas'\]"):
        SftSM3([layer.sft_values], model.active_deltas(), betas=(0.9, 0.99))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["rigl", "sm3"])
def test_positions_stay_unique_and_on_budget_through_real_training(algorithm):
    from tiny import tiny_llama, tokens

    model = get_sft_model(
        tiny_llama(),
        SftConfig(
            density=0.03, selection_algorithm=algorithm, reselection_steps=3, selection_accumulation_steps=2
        ),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SftAdamW(params, lr=1e-2) if algorithm == "rigl" else SftSM3(params, model.active_deltas(), lr=0.05)
    selector = SftSelector(model, opt, total_update_steps=12)
    budget = {n: layer.sft_indices.numel() for n, layer in model.sft_layers.items()}
    initial = {n: set(layer.sft_indices.tolist()) for n, layer in model.sft_layers.items()}
    batch = tokens(4, 16)
    for step in range(1, 13):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
        selector.step()
        for name, layer in model.sft_layers.items():
            positions = layer.sft_indices.tolist()
            assert len(positions) == budget[name] == len(set(positions))
            # the weight holds base + values exactly at the active positions
            expected = (layer.sft_base.float() + layer.sft_values.detach().float()).to(layer.weight.dtype)
            layer.sft_sync()
            assert torch.equal(layer.weight.view(-1)[layer.sft_indices], expected)
        if step == 2:  # first reselection: the random initial set is replaced
            moved = sum(
                len(initial[n] - set(layer.sft_indices.tolist())) for n, layer in model.sft_layers.items()
            )
            assert moved > 0.5 * sum(budget.values())
