"""The sparse fine-tuning op: gradients of the values against an explicit dense computation, and exports that
reproduce the trained model on a fresh base."""

import pytest
import torch
from tiny import tiny_gpt2, tiny_llama, tokens
from torch import nn

import deltahub
import training.sddmm as sddmm_module
from training import SftConfig, get_sft_model, kernels, unwrap_sft_model
from training.layer import SftLayerMixin


def _dense_reference_grads(model, batch):
    """The same loss through an explicit effective weight W + scatter(values): autograd's dense gradient at the
    active positions is the reference for the values' gradient."""
    layers = model.sft_layers
    saved = {}
    for name, layer in layers.items():
        saved[name] = layer.weight.data.clone()
        layer.weight.data.view(-1).index_copy_(0, layer.sft_indices, layer.sft_base)  # back to the base
    effective = {}
    for name, layer in layers.items():
        w = layer.weight.detach().clone()
        w.view(-1).index_add_(0, layer.sft_indices, layer.sft_values.detach().to(w.dtype))
        effective[name] = w.requires_grad_(True)
    originals = {}
    for name, layer in layers.items():
        originals[name] = layer.forward
        transposed = layer.sft_transposed
        w = effective[name]

        def fwd(x, w=w, layer=layer, transposed=transposed):
            return x @ w + layer.bias if transposed else nn.functional.linear(x, w, layer.bias)

        layer.forward = fwd
    try:
        model(input_ids=batch, labels=batch).loss.backward()
    finally:
        for name, layer in layers.items():
            layer.forward = originals[name]
            layer.weight.data.copy_(saved[name])
    return {name: effective[name].grad.view(-1)[layer.sft_indices] for name, layer in layers.items()}


@pytest.mark.parametrize("path", ["kernel", "sddmm", "dense", "triton"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama-linear", "gpt2-conv1d"])
def test_values_gradient_equals_dense_computation(make, path, monkeypatch, request):
    # every way of computing the sampled gradient, whatever the size rules would pick for these tiny weights
    if path == "kernel" and kernels.library() is None:
        pytest.skip("no C compiler with OpenMP here: the CPU kernel cannot be built")
    if path == "triton":  # forced through the public switch; on CPU it runs in Triton's interpreter
        request.getfixturevalue("triton_interpreter")
        monkeypatch.setenv("DELTAHUB_SDDMM_KERNEL", "triton")
    monkeypatch.setattr(sddmm_module, "KERNEL_MAX_DENSITY", 1.0 if path == "kernel" else 0.0)
    monkeypatch.setattr(sddmm_module, "KERNEL_MIN_NUMEL", 0)
    monkeypatch.setattr(sddmm_module, "SDDMM_MIN_NUMEL", 0)
    monkeypatch.setattr(sddmm_module, "SDDMM_MAX_DENSITY", 1.0 if path == "sddmm" else 0.0)
    model = get_sft_model(make(), SftConfig(density=0.05, seed=1))
    with torch.no_grad():
        for layer in model.sft_layers.values():
            layer.sft_values.normal_(0, 0.05)  # a non-trivial point, so the weight is base + values
    batch = tokens(3, 10)
    model(input_ids=batch, labels=batch).loss.backward()
    got = {name: layer.sft_values.grad.clone() for name, layer in model.sft_layers.items()}
    for layer in model.sft_layers.values():
        layer.sft_values.grad = None
    reference = _dense_reference_grads(model, batch)
    for name in got:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-4, atol=1e-6)
    # outside a RigL window no dense product is formed; the sampled paths built their sorted pattern
    assert all((layer._sft_pattern is not None) == (path != "dense") for layer in model.sft_layers.values())


def test_gradient_accumulation_and_checkpointing_give_the_same_gradient():
    batch = tokens(4, 12)
    plain = get_sft_model(tiny_llama(), SftConfig(density=0.05))
    plain(input_ids=batch, labels=batch).loss.backward()
    accumulated = get_sft_model(tiny_llama(), SftConfig(density=0.05))
    if hasattr(accumulated, "activation_checkpointing_enable"):  # transformers >= 5.x
        accumulated.activation_checkpointing_enable({"use_reentrant": False})
    else:
        accumulated.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    accumulated.train()
    calls = []
    accumulated.model.layers[0].mlp.up_proj.register_forward_hook(lambda *_: calls.append(1))
    for half in (batch[:2], batch[2:]):
        (accumulated(input_ids=half, labels=half).loss / 2).backward()
    assert len(calls) == 4  # each micro-batch's layers ran twice: checkpointing recomputed them in backward
    for name, layer in plain.sft_layers.items():
        torch.testing.assert_close(
            accumulated.sft_layers[name].sft_values.grad, layer.sft_values.grad, rtol=1e-4, atol=1e-7
        )


def test_autocast_bf16_forward_and_backward():
    model = get_sft_model(tiny_llama(), SftConfig(density=0.05))
    batch = tokens(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    grads = [layer.sft_values.grad for layer in model.sft_layers.values()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exported_delta_reproduces_the_trained_model_on_a_fresh_base(dtype):
    model = get_sft_model(tiny_llama(dtype), SftConfig(density=0.05))
    with torch.no_grad():
        for layer in model.sft_layers.values():
            layer.sft_values.normal_(0, 0.05)
    delta = model.to_delta()
    assert delta.nnz == sum(layer.sft_indices.numel() for layer in model.sft_layers.values())
    assert delta.provenance["method"] == "sft" and delta.provenance["algorithm"] == "rigl"
    fresh = tiny_llama(dtype)
    deltahub.apply_deltas(fresh, delta)  # also verifies the fingerprint against the fresh base
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x).logits, fresh(x).logits)
    # a saved model is a plain transformers model with the values merged in
    assert not any("sft" in k for k in model.state_dict())


def test_prepared_model_is_unchanged_until_trained_and_unwraps_exactly():
    base = tiny_llama()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_sft_model(base, SftConfig(density=0.1))
    x = tokens()
    with torch.no_grad():
        before = tiny_llama()(x).logits
        assert torch.equal(model(x).logits, before)
        for layer in model.sft_layers.values():
            layer.sft_values.add_(0.1)
        assert not torch.equal(model(x).logits, before)
    layer_types = {type(m) for m in model.modules()}
    assert any(issubclass(t, SftLayerMixin) for t in layer_types)
    unwrap_sft_model(model, merge=False)
    assert not any(issubclass(type(m), SftLayerMixin) for m in model.modules())
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
