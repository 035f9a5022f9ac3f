"""A real two-process DDP run (gloo on CPU, via torchrun): both ranks must choose identical positions."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltahub

# two processes under torchrun
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("algorithm", ["rigl", "sm3"])
def test_two_ranks_end_with_identical_positions_and_values(tmp_path, algorithm):
    worker = Path(__file__).parent / "ddp_train.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(worker),
            "--out",
            str(tmp_path),
            "--algorithm",
            algorithm,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = deltahub.load_delta(tmp_path / "rank0"), deltahub.load_delta(tmp_path / "rank1")
    assert a.nnz == b.nnz > 0 and list(a) == list(b)
    for name in a:
        assert torch.equal(a[name].indices, b[name].indices), name
        assert torch.equal(a[name].values, b[name].values), name
    assert a.provenance["steps"] == 12
    # the positions moved: reselection ran (identically on both ranks) rather than keeping the random start
    initial = [load_file(str(tmp_path / f"initial{r}.safetensors")) for r in (0, 1)]
    assert initial[0].keys() == initial[1].keys() == set(a)
    moved = 0
    for name in a:
        assert torch.equal(initial[0][name], initial[1][name]), name
        start = set(initial[0][name].tolist())
        moved += len(set(a[name].indices.tolist()) - start)
    assert moved > 0.1 * a.nnz, (moved, a.nnz)
