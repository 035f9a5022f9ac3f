"""The Triton kernel for the values' gradient (training/triton_sddmm.py), run on CPU tensors through Triton's
interpreter, against the float64 dense reference; and the DELTAHUB_SDDMM_KERNEL switch that forces a kernel."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_llama, tokens

from training import SftConfig, SftConfigError, get_sft_model, kernels, sddmm


@pytest.fixture
def interpret(triton_interpreter):
    """Every kernel test runs in Triton's interpreter (skipped with the reason where it cannot)."""


def _reference(p, q, flat):
    return (p.double().t() @ q.double()).view(-1)[flat]


def _run(p, q, flat, shape, **kwargs):
    from training import triton_sddmm

    block_r = kwargs.pop("block_r", triton_sddmm.BLOCK_R)
    blocks = triton_sddmm.build_blocks(flat, shape, block_r=block_r)
    got = triton_sddmm.sampled_dot(p, q, blocks, **kwargs)
    assert got.dtype == torch.float32 and got.shape == (flat.numel(),)
    out = torch.empty_like(got)
    out[blocks.perm] = got  # kernel order back to the order of ``flat``
    return out


@pytest.mark.parametrize(
    ("tokens_", "n_rows", "n_cols", "k", "dtype", "splits", "block_r"),
    [
        (37, 45, 29, 100, torch.float32, 1, 16),  # odd sizes: ragged row blocks, token tail, column tail
        (70, 33, 50, 300, torch.bfloat16, 3, 16),  # bf16 operands, tokens split over three programs each
        (19, 5, 7, 35, torch.float16, 1, 16),  # every position of a matrix smaller than one row block
        (50, 40, 30, 200, torch.float32, 2, 32),  # 32-row blocks
        (16, 8, 8, 0, torch.float32, 1, 16),  # no positions
        (0, 8, 8, 10, torch.float32, 1, 16),  # no tokens: zero gradient
    ],
)
def test_kernel_equals_the_float64_dense_reference(
    interpret, tokens_, n_rows, n_cols, k, dtype, splits, block_r
):
    gen = torch.Generator().manual_seed(k + tokens_)
    p = torch.randn(tokens_, n_rows, generator=gen).to(dtype)
    q = torch.randn(tokens_, n_cols, generator=gen).to(dtype)
    flat = torch.randperm(n_rows * n_cols, generator=gen)[:k]
    got = _run(p, q, flat, (n_rows, n_cols), splits=splits, block_r=block_r)
    # the operands are exact in float32: only the float32 accumulation differs from the float64 reference
    torch.testing.assert_close(got.double(), _reference(p, q, flat), rtol=1e-5, atol=1e-5)


def test_kernel_reads_non_contiguous_operands(interpret):
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(40, 64, generator=gen)[:, ::2]  # column stride 2
    q = torch.randn(33, 40, generator=gen).t()  # column-major
    flat = torch.randperm(32 * 33, generator=gen)[:90]
    assert not p.is_contiguous() and not q.is_contiguous()
    got = _run(p, q, flat, (32, 33))
    torch.testing.assert_close(got.double(), _reference(p, q, flat), rtol=1e-5, atol=1e-5)


def test_blocks_group_rows_and_sort_columns_inside_each_block(interpret):
    from training.triton_sddmm import build_blocks

    flat = torch.tensor([5 * 10 + 3, 0 * 10 + 9, 17 * 10 + 1, 3 * 10 + 2, 16 * 10 + 0, 2 * 10 + 9])
    blocks = build_blocks(flat, (20, 10), block_r=16, block_c=2)
    # rows 0-15 are block 0 (columns 2, 3, 9, 9), rows 16-19 block 1 (columns 0, 1)
    assert blocks.cols.tolist() == [2, 3, 9, 9, 0, 1]
    assert blocks.rows.tolist()[4:] == [16, 17]
    assert torch.equal(flat[blocks.perm] // 10, blocks.rows.long())
    # programs: (first row, first position, count); block 0 needs two chunks of two, block 1 one
    assert blocks.programs.tolist() == [[0, 0, 16], [0, 2, 4], [2, 2, 2]]


def test_forced_triton_on_cpu_needs_the_interpreter(interpret, monkeypatch):
    monkeypatch.setenv("DELTAHUB_SDDMM_KERNEL", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(
        SftConfigError,
        match=r"DELTAHUB_SDDMM_KERNEL=triton forces the Triton kernel, which needs a CUDA device; on cpu set "
        r"TRITON_INTERPRET=1 as well",
    ):
        get_sft_model(tiny_llama(), SftConfig(density=0.05))


def test_forced_triton_trains_a_bf16_model_like_the_dense_path(interpret, monkeypatch):
    """The public op on a bf16 model: forced Triton gives the dense path's gradients (both float32 sums of
    exact bf16 products)."""
    batch = tokens(2, 9)
    grads = {}
    for choice in ("triton", "0"):
        monkeypatch.setenv("DELTAHUB_SDDMM_KERNEL", choice)
        model = get_sft_model(tiny_llama(torch.bfloat16), SftConfig(density=0.05, seed=3))
        with torch.no_grad():
            for layer in model.sft_layers.values():
                layer.sft_values.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        model(input_ids=batch, labels=batch).loss.backward()
        grads[choice] = {n: layer.sft_values.grad for n, layer in model.sft_layers.items()}
        blocks_built = all(layer._sft_pattern is not None for layer in model.sft_layers.values())
        assert blocks_built == (choice == "triton")
    for name, g in grads["triton"].items():
        torch.testing.assert_close(g, grads["0"][name], rtol=1e-4, atol=1e-6)


def test_forced_c_kernel_runs_even_on_tiny_weights(monkeypatch):
    if kernels.library() is None:
        pytest.skip("no C compiler with OpenMP here: the CPU kernel cannot be built")
    monkeypatch.setenv("DELTAHUB_SDDMM_KERNEL", "c")
    model = get_sft_model(tiny_llama(), SftConfig(density=0.05))
    batch = tokens(2, 8)
    model(input_ids=batch, labels=batch).loss.backward()
    # the size rules would pick the dense product for 2K-element weights; the int32 positions are the kernel's
    assert all(layer._sft_pattern._int32 is not None for layer in model.sft_layers.values())


def test_an_unknown_switch_value_names_the_choices(monkeypatch):
    monkeypatch.setenv("DELTAHUB_SDDMM_KERNEL", "cuda")
    with pytest.raises(
        SftConfigError, match=r"DELTAHUB_SDDMM_KERNEL='cuda' is not a valid choice; use one of auto"
    ):
        get_sft_model(tiny_llama(), SftConfig(density=0.05))


@pytest.mark.slow
def test_kernel_compiles_for_ampere_and_hopper_gpus(tmp_path):
    """No GPU needed: Triton compiles ahead of time to PTX and cubin for a named target (its wheel ships ptxas).
    Catches what the interpreter does not: types, layouts, the tensor-core lowering. In a fresh process: one
    that imported triton in interpreter mode cannot compile."""
    if sddmm.triton_unavailable():
        pytest.skip(f"the Triton kernel {sddmm.triton_unavailable()}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    script = Path(__file__).with_name("triton_compile.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = [line for line in proc.stdout.splitlines() if line.startswith("compiled")]
    assert len(compiled) == 3, proc.stdout
