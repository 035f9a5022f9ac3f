"""Adapter-only checkpoints from a custom loop: exact resume, and files from elsewhere checked before use."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import tiny_llama, tokens

from training import SftAdamW, SftConfig, SftSelector, SftSM3, SftStateError, get_sft_model
from training.checkpoint import FILE_NAME

STEPS = 12


def setup(algorithm: str):
    config = SftConfig(
        density=0.05, selection_algorithm=algorithm, reselection_steps=4, selection_accumulation_steps=2
    )
    model = get_sft_model(tiny_llama(), config)
    params = [p for p in model.parameters() if p.requires_grad]
    if algorithm == "sm3":
        optimizer = SftSM3(params, model.active_deltas(), lr=0.05, momentum=0.5)
    else:
        optimizer = SftAdamW(params, lr=1e-2)
    return model, optimizer, SftSelector(model, optimizer, total_update_steps=STEPS)


def train(model, optimizer, selector, steps):
    for step in steps:
        batch = tokens(4, 16, seed=step)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        selector.step()


@pytest.mark.parametrize("algorithm", ["rigl", "sm3"])
def test_custom_loop_resumes_bit_exactly(tmp_path, algorithm):
    model, optimizer, selector = setup(algorithm)
    train(model, optimizer, selector, range(5))  # step 5 is inside the window of the reselection after 6
    selector.save_checkpoint(tmp_path / "ckpt")
    train(model, optimizer, selector, range(5, STEPS))
    resumed_model, resumed_optimizer, resumed_selector = setup(algorithm)
    resumed_selector.load_checkpoint(tmp_path / "ckpt")
    assert resumed_selector.global_step == 5
    train(resumed_model, resumed_optimizer, resumed_selector, range(5, STEPS))
    a, b = model.to_delta(), resumed_model.to_delta()
    for name in a:
        assert torch.equal(a[name].indices, b[name].indices), name
        assert torch.equal(a[name].values, b[name].values), name
    # the weights themselves (base + values at the active positions, the base elsewhere) agree bit for bit
    for (name, p), (_, q) in zip(model.named_parameters(), resumed_model.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def _checkpoint(tmp_path):
    model, optimizer, selector = setup("rigl")
    train(model, optimizer, selector, range(3))
    return selector.save_checkpoint(tmp_path / "ckpt")


def _rewrite(path, change_tensors=None, change_meta=None):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    if change_tensors:
        change_tensors(tensors)
    if change_meta:
        change_meta(meta)
    save_file(tensors, str(path), metadata=meta)


def test_checkpoints_from_elsewhere_are_checked_before_use(tmp_path):
    path = _checkpoint(tmp_path)
    name = next(k for k in load_file(str(path)) if k.startswith("sft/") and k.endswith(".indices"))

    def out_of_range(t):
        t[name][0] = 10**6

    def repeated(t):
        t[name][1] = t[name][0]

    cases = [
        (lambda: _rewrite(path, out_of_range), r"saved positions are not integers in \[0, \d+\)"),
        (lambda: _rewrite(path, repeated), "saved positions repeat"),
        (
            lambda: _rewrite(path, change_meta=lambda m: m.update(version="3")),
            "is SFT state version 3; this deltahub reads version 2",
        ),
        (
            lambda: _rewrite(path, change_meta=lambda m: m.update(format="something-else")),
            "is not a deltahub SFT state file",
        ),
        (
            lambda: _rewrite(
                path,
                change_meta=lambda m: m.update(
                    optimizer=json.dumps({**json.loads(m["optimizer"]), "class": "SftSM3"})
                ),
            ),
            "the checkpoint's optimizer is SftSM3, this run's is SftAdamW",
        ),
    ]
    for damage, message in cases:
        path = _checkpoint(tmp_path)
        damage()
        _, _, selector = setup("rigl")
        with pytest.raises(SftStateError, match=message):
            selector.load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / FILE_NAME).write_bytes(b"\x00" * 64)
    with pytest.raises(SftStateError, match="is not a readable safetensors file"):
        setup("rigl")[2].load_checkpoint(tmp_path / "ckpt")
