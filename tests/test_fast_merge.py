"""The merge's torch-free fast path (deltahub/merging/fast.py): the torch path's files byte for byte, no torch
import, and the torch path wherever the fast one does not apply."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_merge import make_base, make_deltas

import deltahub.merging.fast as fast
from deltahub import ParamDelta, SparseDelta, merge, native, save_delta
from deltahub.merging import fast_methods
from deltahub.methods.magnitude import magnitude
from deltahub.methods.ties import ties
from deltahub.sparse_ops import top_fraction, weighted_sum

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the fast path is not used")


def hashes(folder: Path) -> dict[str, str]:
    # The card names the output folder (AAA, BBB, CCC, DDD); everything else must be identical.
    return {
        p.name: hashlib.sha256(p.read_bytes().replace(folder.name.encode(), b"OUT")).hexdigest()
        for p in sorted(folder.iterdir())
    }


@pytest.fixture
def spy(monkeypatch):
    """Counts fast-path merges; ``spy.torch()`` turns the fast path off for the rest of the test."""
    calls = []
    real = fast.write_shards
    monkeypatch.setattr(fast, "write_shards", lambda *a, **k: calls.append(1) or real(*a, **k))

    class Spy:
        count = property(lambda self: len(calls))

        def torch(self):
            monkeypatch.setattr(fast, "eligible", lambda *a, **k: False)

    return Spy()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("method", "options", "weights"),
    [
        ("sum", {}, [1.0, -0.7]),
        ("sum", {}, [1.0]),  # one delta of weight 1: combine's shortcut
        ("ties", {"density": 0.5}, [1.0, 0.5]),
        ("magnitude", {"density": 0.3}, [-1.0, 2.0]),
    ],
)
def test_fast_path_writes_the_torch_paths_bytes(tmp_path, spy, dtype, method, options, weights):
    base, model = make_base(tmp_path, dtype, shard="30KB")
    paths = make_deltas(tmp_path, model)[: len(weights)]
    kwargs = dict(
        weights=weights, method=method, method_options=options, max_shard_size="40KB", progress=False
    )
    quick = merge(base, paths, out=tmp_path / "AAA", **kwargs)
    assert spy.count == 1
    spy.torch()
    slow = merge(base, paths, out=tmp_path / "BBB", **kwargs)
    assert spy.count == 1
    assert hashes(quick.out) == hashes(slow.out)
    assert quick.nnz == slow.nnz
    assert str(quick.plan).replace("AAA", "X") == str(slow.plan).replace("BBB", "X")


@pytest.mark.slow
def test_the_cli_merge_imports_no_torch(tmp_path):
    base, model = make_base(tmp_path)
    paths = make_deltas(tmp_path, model)
    code = (
        "import sys; sys.modules['torch'] = None; from deltahub.cli import main; "
        f"main({['merge', str(base), *map(str, paths), '--method', 'ties', '--out', str(tmp_path / 'CCC'), '-q']!r})"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    assert done.returncode == 0, done.stderr
    reference = merge(base, paths, method="ties", out=tmp_path / "DDD", progress=False).out
    assert hashes(tmp_path / "CCC") == hashes(reference)


def test_what_the_fast_path_does_not_cover_goes_through_torch(tmp_path, spy):
    base, model = make_base(tmp_path)
    paths = make_deltas(tmp_path, model)
    merge(base, paths, method="dare", method_options={"seed": 1}, out=tmp_path / "a", progress=False)
    merge(base, paths, dtype="float32", out=tmp_path / "b", progress=False)
    merge(base, [deltahub_delta(paths[0])], out=tmp_path / "c", progress=False)
    assert merge(base, paths, dry_run=True, out=tmp_path / "d").dry_run
    assert spy.count == 0
    merge(base, paths, out=tmp_path / "e", progress=False)
    assert spy.count == 1


def deltahub_delta(path):
    import deltahub

    return deltahub.load_delta(path)


def test_a_tied_name_the_checkpoint_stores_under_another_falls_back(tmp_path, spy):
    base, model = make_base(tmp_path, torch.float32, shard="5GB", gpt2=True)
    idx = torch.arange(0, model.lm_head.weight.numel(), 7)
    p = ParamDelta(idx, torch.randn(idx.numel()) * 0.1, tuple(model.lm_head.weight.shape), torch.float32)
    save_delta(SparseDelta({"lm_head.weight": p}), tmp_path / "tied")
    merge(base, [tmp_path / "tied"], out=tmp_path / "out", progress=False)
    assert spy.count == 0  # fast_merge saw the alias and handed over to the torch path, which resolves it


def test_a_failure_mid_way_leaves_nothing(tmp_path, monkeypatch, spy):
    base, model = make_base(tmp_path)
    paths = make_deltas(tmp_path, model)
    calls, real = [], fast.patch_tensor

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(fast, "patch_tensor", failing)
    with pytest.raises(RuntimeError, match="boom"):
        merge(base, paths, out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_weights_that_overflow_float32_are_refused(tmp_path):
    base, model = make_base(tmp_path)
    paths = make_deltas(tmp_path, model)
    with pytest.raises(ValueError, match=r"gave an invalid result for .* overflows float32"):
        merge(base, paths, weights=[3e39, 1.0], out=tmp_path / "out", progress=False)  # inf in float32
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# The numpy twins of the methods, against torch's


def _entries(draw, k, numel):
    out = []
    for _ in range(k):
        n = draw(st.integers(0, numel))
        positions = sorted(draw(st.sets(st.integers(0, numel - 1), min_size=n, max_size=n)))
        # Few distinct magnitudes, so that trimming has ties to break; zeros of both signs.
        vals = draw(
            st.lists(st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -2.0, 3e-3, 1e-40]), min_size=n, max_size=n)
        )
        out.append((np.array(positions, dtype=np.int32), np.array(vals, dtype=np.float32)))
    return out


@st.composite
def method_inputs(draw):
    k = draw(st.integers(1, 4))
    entries = _entries(draw, k, draw(st.integers(1, 40)))
    weights = draw(st.lists(st.sampled_from([1.0, -1.0, 0.5, -0.3, 2.0]), min_size=k, max_size=k))
    density = draw(st.sampled_from([0.07, 0.3, 0.5, 1.0]))
    return entries, weights, density


def _torch(entries):
    return [(torch.from_numpy(i), torch.from_numpy(v)) for i, v in entries]


def _same(a, b) -> None:
    assert a[0].tolist() == b[0].tolist()
    assert np.array_equal(np.asarray(a[1], dtype=np.float32).view(np.uint32), b[1].numpy().view(np.uint32))


@settings(max_examples=200, deadline=None, database=None)
@given(method_inputs())
def test_numpy_methods_give_torchs_bits(case):
    entries, weights, density = case
    _same(
        fast_methods.ties(entries, weights, density=density),
        ties(_torch(entries), weights, name="w", numel=0, density=density),
    )
    _same(
        fast_methods.magnitude(entries, weights, density=density),
        magnitude(_torch(entries), weights, name="w", numel=0, density=density),
    )
    _same(fast_methods.weighted_sum(entries, weights), weighted_sum(_torch(entries), weights))
    for (i, v), (ti, tv) in zip(entries, _torch(entries), strict=True):
        _same(fast_methods.top_fraction(i, v, density), top_fraction(ti, tv, density))
