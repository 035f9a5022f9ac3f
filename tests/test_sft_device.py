"""Training stays on the model's device: a step on a ``meta``-device model (tensors without data) fails on any
host read (``.item()``, ``.tolist()``, ``.cpu()``, ``bool(tensor)``) and on any tensor created on the wrong
device, so passing here means the step makes no host round trip and no device mismatch on a GPU either.
Reselection reads sizes (how many positions moved) and is allowed to: it runs once per R steps."""

import pytest
import torch
from tiny import tiny_llama, tokens

from training import SftAdamW, SftConfig, SftSelector, SftSM3, get_sft_model


@pytest.mark.parametrize("algorithm", ["rigl", "sm3"])
def test_steps_between_reselections_make_no_host_round_trip(algorithm):
    config = SftConfig(
        density=0.05, selection_algorithm=algorithm, reselection_steps=5, selection_accumulation_steps=2
    )
    # prepared on the CPU (the base fingerprint reads base values), then moved with everything it holds
    model = get_sft_model(tiny_llama(), config).to("meta")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = SftAdamW(params, lr=1e-3) if algorithm == "rigl" else SftSM3(params, model.active_deltas())
    selector = SftSelector(model, optimizer, total_update_steps=20)
    batch = tokens(2, 8).to("meta")
    layer = next(iter(model.sft_layers.values()))
    # steps 1 and 2 are RigL's first selection window (dense gradient observed); the reselection follows step 2
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast for another device is ignored on meta
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        assert layer.sft_values.grad.device.type == "meta"
        optimizer.step()
        optimizer.zero_grad()
        if selector.global_step + 1 < 2:
            selector.step()
    state = optimizer.state[layer.sft_values]
    assert state and all(t.device.type == "meta" for t in state.values() if isinstance(t, torch.Tensor))
    if algorithm == "rigl":
        stats = selector.stats[layer.sft_name]
        assert stats.candidates.device.type == "meta" and stats.current.device.type == "meta"
