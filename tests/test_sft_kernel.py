"""The CPU kernel for the values' gradient (training/kernels.py): exact sampled products, and a clean fallback
where it cannot be built."""

import warnings

import pytest
import torch

from training import kernels


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """library() re-evaluated under this test's environment, with an empty kernel cache; reset afterwards."""
    monkeypatch.setenv("DELTAHUB_CACHE", str(tmp_path / "cache"))
    kernels.library.cache_clear()
    yield
    kernels.library.cache_clear()


def _sorted_positions(n1, n2, k, gen):
    flat = torch.randperm(n1 * n2, generator=gen)[:k].sort().values
    return (flat // n2).to(torch.int32), (flat % n2).to(torch.int32)


@pytest.mark.parametrize(
    ("tokens", "n1", "n2", "k", "block_bytes"),
    [
        (40, 37, 21, 100, 1 << 20),  # sizes that are not multiples of the 16-column transposes
        (300, 64, 48, 700, 48 * 4 * 32),  # 32-token blocks: 300 tokens take ten, the last one short
        (7, 5, 3, 15, 1 << 20),  # every position of the matrix
        (16, 8, 8, 0, 1 << 20),  # no positions at all
        (0, 8, 8, 10, 1 << 20),  # no tokens: zero gradient
    ],
)
def test_kernel_equals_the_sampled_dense_product(tokens, n1, n2, k, block_bytes, monkeypatch):
    if kernels.library() is None:
        pytest.skip("no C compiler with OpenMP here: the CPU kernel cannot be built")
    monkeypatch.setattr(kernels, "BLOCK_BYTES", block_bytes)
    gen = torch.Generator().manual_seed(k)
    p, q = torch.randn(tokens, n1, generator=gen), torch.randn(tokens, n2, generator=gen)
    rows, cols = _sorted_positions(n1, n2, k, gen)
    reference = (p.double().t() @ q.double())[rows.long(), cols.long()]
    got = kernels.sampled_dot(p, q, rows, cols)
    assert got.dtype == torch.float32 and got.shape == (k,)
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-5)
    # a non-contiguous operand (a transposed view) is read correctly too
    got_t = kernels.sampled_dot(p.t().contiguous().t(), q, rows, cols)
    torch.testing.assert_close(got_t, got)


def test_without_a_compiler_sft_warns_once_and_falls_back(fresh_library, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(RuntimeWarning, match=r"kernel for sparse gradients is unavailable .*/nonexistent/cc"):
        assert kernels.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.library() is None  # cached: no second warning


def test_the_kernel_can_be_switched_off_silently(fresh_library, monkeypatch):
    monkeypatch.setenv("DELTAHUB_SDDMM_KERNEL", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.library() is None


@pytest.mark.slow
def test_the_kernel_is_built_once_into_the_cache(fresh_library, tmp_path):
    if kernels.library() is None:
        pytest.skip("no C compiler with OpenMP here: the CPU kernel cannot be built")
    built = list((tmp_path / "cache" / "kernels").glob("sddmm-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    kernels.library.cache_clear()
    assert kernels.library() is not None
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
