"""The CUDA tier: the op, selection, optimizers, Trainer resume and apply/revert on a GPU.

Skipped without one. On a GPU machine: ``python -m pytest -m cuda -q`` (or ``bash scripts/gpu_check.sh``, which
also runs the GPU benchmarks). ``DELTAHUB_CUDA_TIER_DEVICE=cpu`` rehearses the tier's code on the CPU (the
Triton kernel then runs in Triton's interpreter); it proves the tests run, not that the GPU paths work.
"""

import os

import pytest
import torch
from tiny import random_delta, tiny_gpt2, tiny_llama, tokens
from torch.utils._python_dispatch import TorchDispatchMode

import deltahub
from training import SftAdamW, SftConfig, SftSelector, SftSM3, get_sft_model, sddmm

DEVICE = torch.device(os.environ.get("DELTAHUB_CUDA_TIER_DEVICE", "cuda"))

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(),
        reason="no CUDA GPU here; the cuda tier runs where there is one (python -m pytest -m cuda)",
    ),
]


@pytest.fixture
def triton_here(request):
    """The Triton kernel on DEVICE: compiled on a GPU, interpreted in a CPU rehearsal."""
    if sddmm.triton_unavailable():
        pytest.skip(f"the Triton kernel {sddmm.triton_unavailable()}")
    if DEVICE.type != "cuda":
        request.getfixturevalue("triton_interpreter")


def _reference(p, q, flat):
    return (p.double().t() @ q.double()).view(-1)[flat.cpu()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("tokens_", "n_rows", "n_cols", "density"), [(1000, 300, 257, 0.02), (77, 45, 29, 1.0)]
)
def test_triton_kernel_equals_the_float64_reference(triton_here, dtype, tokens_, n_rows, n_cols, density):
    from training import triton_sddmm

    gen = torch.Generator().manual_seed(0)
    p = torch.randn(tokens_, n_rows, generator=gen).to(dtype)
    q = torch.randn(tokens_, n_cols, generator=gen).to(dtype)
    flat = torch.randperm(n_rows * n_cols, generator=gen)[: int(density * n_rows * n_cols)]
    for block_r in (16, 128):
        blocks = triton_sddmm.build_blocks(flat.to(DEVICE), (n_rows, n_cols), block_r=block_r)
        # a non-contiguous q (a column-major copy) and the default token splits
        got = triton_sddmm.sampled_dot(p.to(DEVICE), q.to(DEVICE).t().contiguous().t(), blocks)
        out = torch.empty_like(got)
        out[blocks.perm] = got
        # fp32 operands go through three TF32 passes: float32-accurate, not exact
        torch.testing.assert_close(out.double().cpu(), _reference(p, q, flat), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("choice", ["triton", "0", "auto"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama-linear", "gpt2-conv1d"])
def test_values_gradient_on_the_device_equals_the_cpu_one(make, choice, monkeypatch, request):
    if choice == "triton":
        request.getfixturevalue("triton_here")
    batch = tokens(3, 10)
    grads = {}
    for device in ("cpu", DEVICE):  # the CPU reference through torch's dense product
        monkeypatch.setenv("DELTAHUB_SDDMM_KERNEL", "0" if device == "cpu" else choice)
        model = get_sft_model(make().to(device), SftConfig(density=0.05, seed=1))
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for layer in model.sft_layers.values():
                layer.sft_values.copy_(torch.randn(layer.sft_values.shape, generator=gen) * 0.05)
        model(input_ids=batch.to(device), labels=batch.to(device)).loss.backward()
        grads[str(device)] = {n: layer.sft_values.grad.cpu() for n, layer in model.sft_layers.items()}
        assert all(
            layer.sft_values.grad.device.type == torch.device(device).type
            for layer in model.sft_layers.values()
        )
    for name, g in grads["cpu"].items():
        torch.testing.assert_close(grads[str(DEVICE)][name], g, rtol=1e-3, atol=1e-5)


def test_bf16_autocast_step_with_the_triton_kernel_matches_the_dense_path(triton_here, monkeypatch):
    batch = tokens(4, 16).to(DEVICE)
    grads = {}
    for choice in ("triton", "0"):
        monkeypatch.setenv("DELTAHUB_SDDMM_KERNEL", choice)
        model = get_sft_model(tiny_llama().to(DEVICE), SftConfig(density=0.05, seed=4))
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        grads[choice] = {n: layer.sft_values.grad for n, layer in model.sft_layers.items()}
    for name, g in grads["triton"].items():
        torch.testing.assert_close(g, grads["0"][name], rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("algorithm", ["rigl", "sm3"])
def test_training_with_reselection_stays_on_the_device_and_consistent(algorithm):
    config = SftConfig(
        density=0.05, selection_algorithm=algorithm, reselection_steps=3, selection_accumulation_steps=2
    )
    model = get_sft_model(tiny_llama().to(DEVICE), config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SftAdamW(params, lr=1e-2) if algorithm == "rigl" else SftSM3(params, model.active_deltas(), lr=0.05)
    selector = SftSelector(model, opt, total_update_steps=10)
    batch = tokens(4, 16).to(DEVICE)
    initial = {n: layer.sft_indices.clone() for n, layer in model.sft_layers.items()}
    losses = []
    for _ in range(10):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
        selector.step()
    assert losses[-1] < losses[0]
    for layer in model.sft_layers.values():
        assert layer.sft_indices.device.type == DEVICE.type
        assert torch.unique(layer.sft_indices).numel() == layer.sft_indices.numel()
        layer.sft_sync()
        expected = (layer.sft_base.float() + layer.sft_values.detach().float()).to(layer.weight.dtype)
        assert torch.equal(layer.weight.view(-1)[layer.sft_indices], expected)
    moved = sum(
        int((~torch.isin(layer.sft_indices, initial[n])).sum()) for n, layer in model.sft_layers.items()
    )
    assert moved > 0


@pytest.mark.parametrize("algorithm", ["rigl", "sm3"])
def test_optimizer_step_on_the_device_equals_the_cpu_step(algorithm):
    results = {}
    for device in ("cpu", DEVICE):
        model = get_sft_model(tiny_llama().to(device), SftConfig(density=0.05, selection_algorithm=algorithm))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = (
            SftAdamW(params, lr=1e-2, weight_decay=0.1)
            if algorithm == "rigl"
            else SftSM3(params, model.active_deltas(), lr=0.05, momentum=0.5)
        )
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(device)
            opt.step()
        results[str(device)] = [p.detach().cpu() for p in params]
    for a, b in zip(results["cpu"], results[str(DEVICE)], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("algorithm", ["rigl", "sm3"])
def test_trainer_resume_on_the_device_continues_exactly(tmp_path, algorithm):
    from test_sft_trainer import make_trainer
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # the math attention backend: the fused ones may accumulate in a different order on each run
    with sdpa_kernel(SDPBackend.MATH):
        full = make_trainer(tmp_path / "full", algorithm, use_cpu=DEVICE.type == "cpu")
        full.train()
        assert next(full.model.parameters()).device.type == DEVICE.type
        delta = full.model.to_delta()
        resumed = make_trainer(tmp_path / "resumed", algorithm, use_cpu=DEVICE.type == "cpu")
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
        again = resumed.model.to_delta()
    for name in delta:
        assert torch.equal(again[name].indices, delta[name].indices), name
        assert torch.equal(again[name].values, delta[name].values), name


class _HostCopies(TorchDispatchMode):
    """Records every op that takes a tensor on the device and returns one on the host, with its size."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outputs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        if any(t.device.type != "cpu" for t in inputs):
            self.copies += [(str(func), o.numel()) for o in outputs if o.device.type == "cpu"]
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_and_revert_on_the_device_without_host_copies(dtype):
    host = tiny_llama(dtype)
    base = {k: v.clone() for k, v in host.state_dict().items()}
    delta = random_delta(host, density=0.1)
    deltahub.apply_deltas(host, delta)
    model = tiny_llama(dtype).to(DEVICE)
    with _HostCopies() as watch:
        handle = deltahub.apply_deltas(model, delta)
    # only the base fingerprint's few samples per parameter come back to the host
    assert all(n <= 8 for _, n in watch.copies), watch.copies
    for k, v in model.state_dict().items():
        assert torch.equal(v.cpu(), host.state_dict()[k]), k  # same float32 sum, rounded once, on any device
    with _HostCopies() as watch:
        handle.revert()
    assert all(n <= 1 for _, n in watch.copies), watch.copies  # the revert checksums compare on the device
    for k, v in model.state_dict().items():
        assert torch.equal(v.cpu(), base[k]), k


def test_a_trained_delta_moves_between_models_on_the_device():
    model = get_sft_model(tiny_llama().to(DEVICE), SftConfig(density=0.05))
    with torch.no_grad():
        for layer in model.sft_layers.values():
            layer.sft_values.normal_(0, 0.05)
    delta = model.to_delta(device=None)
    assert all(p.values.device.type == DEVICE.type for p in delta.values())
    fresh = tiny_llama().to(DEVICE)
    with _HostCopies() as watch:
        deltahub.apply_deltas(fresh, delta)
    assert all(n <= 8 for _, n in watch.copies), watch.copies
    x = tokens().to(DEVICE)
    with torch.no_grad():
        assert torch.equal(model(x).logits, fresh(x).logits)
    assert all(p.values.device.type == "cpu" for p in model.to_delta().values())  # the default: the host
