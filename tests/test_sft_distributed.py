"""Real two-process runs (gloo on CPU, via torchrun) of DDP and of FSDP2: both ranks must end with identical
positions and values, equal to a single-process run on the union of the ranks' batches; FSDP2 must hold half the
base on each rank and resume bit-exactly from an adapter-only checkpoint."""

import json
from pathlib import Path

import dist_train
import pytest
import torch
from launch import TORCHRUN, two_processes
from tiny import tiny_llama

import deltahub
from training import get_sft_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc = two_processes([*TORCHRUN, Path(dist_train.__file__), "--out", out])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def single_process():
    """The same training in one process, each micro-batch the concatenation of the ranks' micro-batches."""
    steps = [
        [torch.cat(pair) for pair in zip(*micro, strict=True)]
        for micro in zip(dist_train.batches(0), dist_train.batches(1), strict=True)
    ]
    deltas = {}
    for algorithm in dist_train.ALGORITHMS:
        model = get_sft_model(tiny_llama(), dist_train.config(algorithm))
        dist_train.train(model, algorithm, steps)
        deltas[algorithm] = model.to_delta()
    return deltas


@pytest.mark.parametrize("engine", dist_train.ENGINES)
@pytest.mark.parametrize("algorithm", dist_train.ALGORITHMS)
def test_ranks_agree_with_each_other_and_with_one_process(runs, single_process, engine, algorithm):
    a = deltahub.load_delta(runs / f"{engine}-{algorithm}-rank0")
    b = deltahub.load_delta(runs / f"{engine}-{algorithm}-rank1")
    reference = single_process[algorithm]
    assert a.nnz == b.nnz == reference.nnz > 0 and list(a) == list(b) == list(reference)
    assert a.provenance["steps"] == dist_train.STEPS
    for name in a:
        assert torch.equal(a[name].indices, b[name].indices), name
        assert torch.equal(a[name].values, b[name].values), name
        # the averaged gradients differ from the big batch's by float rounding only: same choices, close values
        assert torch.equal(a[name].indices, reference[name].indices), name
        torch.testing.assert_close(a[name].values, reference[name].values, rtol=1e-4, atol=1e-6)
    # the positions moved: reselection ran (identically on both ranks) rather than keeping the random start
    start = get_sft_model(tiny_llama(), dist_train.config(algorithm)).sft_layers
    moved = sum(len(set(a[n].indices.tolist()) - set(start[n].sft_indices.tolist())) for n in a)
    assert moved > 0.1 * a.nnz, (moved, a.nnz)


@pytest.mark.parametrize("algorithm", dist_train.ALGORITHMS)
def test_fsdp_resumes_from_an_adapter_only_checkpoint_bit_exactly(runs, algorithm):
    files = {p.name for p in (runs / f"{algorithm}-checkpoint").iterdir()}
    assert files == {"sft_state.safetensors"}
    for rank in (0, 1):
        uninterrupted = deltahub.load_delta(runs / f"fsdp-{algorithm}-rank{rank}")
        resumed = deltahub.load_delta(runs / f"fsdp-{algorithm}-resumed-rank{rank}")
        for name in uninterrupted:
            assert torch.equal(resumed[name].indices, uninterrupted[name].indices), name
            assert torch.equal(resumed[name].values, uninterrupted[name].values), name


def test_fsdp_ranks_hold_half_the_base(runs):
    for rank in (0, 1):
        held = json.loads((runs / f"bytes-rank{rank}.json").read_text())
        for algorithm in dist_train.ALGORITHMS:
            ddp, fsdp = held[f"ddp-{algorithm}"], held[f"fsdp-{algorithm}"]
            assert ddp["base"] == ddp["full_base"] == fsdp["full_base"]
            # every tiny weight has an even number of rows: exactly half, no padding
            assert fsdp["base"] * 2 == fsdp["full_base"], fsdp
            assert fsdp["trainable"] == ddp["trainable"] > 0  # the values stay replicated
