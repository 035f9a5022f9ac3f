"""Format versions: 1.0 files (deltahub 0.1.0) load unchanged; 1.0 readers refuse 1.1 files cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from format_helpers import assert_same

from deltahub import ParamDelta, SparseDelta, load_delta, save_delta

FIXTURES = Path(__file__).parent / "fixtures"


def v1_0_delta() -> SparseDelta:
    """The delta in ``fixtures/delta-v1.0`` (written by ``fixtures/make_v1_0.py`` with the 1.0 writer)."""
    tricky = torch.tensor([-0.0, 1e-30, -3.5, 1e30, 2.0**-14, 7.25])
    return SparseDelta(
        {
            "model.layers.0.mlp.down_proj.weight": ParamDelta(
                torch.tensor([0, 3, 7, 8, 11, 300]), tricky, (20, 16), torch.bfloat16
            ),
            "model.layers.0.self_attn.q_proj.weight": ParamDelta(
                torch.tensor([5, 6, 1000, 4095]),
                torch.tensor([0.5, -0.25, 3.0, -1.0], dtype=torch.bfloat16),
                (64, 64),
                torch.bfloat16,
            ),
            "model.norm.weight": ParamDelta(
                torch.arange(8), torch.linspace(-1, 1, 8, dtype=torch.float16), (8,), torch.float32
            ),
            "model.layers.1.mlp.up_proj.weight": ParamDelta(
                torch.zeros(0, dtype=torch.int64), torch.zeros(0), (4, 4), torch.float32
            ),
        },
        base_model="tiny/base",
        base_revision="abc123",
        fingerprint={
            "model.norm.weight": (1.0, -2.5, float("nan"), float("inf"), float("-inf"), 0.0, 3.0, 4.0)
        },
        provenance={"algorithm": "rigl", "steps": 10, "hyper": {"density": 0.01}},
    )


def test_format_1_0_files_load_unchanged():
    folder = FIXTURES / "delta-v1.0"
    assert '"format_version": "1.0"' in (folder / "delta_config.json").read_text()
    assert_same(load_delta(folder), v1_0_delta())
    for shard in sorted(folder.glob("delta-*.safetensors")):
        loaded = load_delta(shard)  # a lone shard describes itself through its header
        assert set(loaded) <= set(v1_0_delta())


# The last commit whose reader is format 1.0 (deltahub 0.1.0), run from git as a released reader would be.
V1_0_COMMIT = "063cdb9b505d969b8a0ceb1ecd28093d99c67516"
REPO = Path(__file__).resolve().parents[1]

_OLD_READER = """
import json, sys
sys.path.insert(0, sys.argv[1])
import deltahub
assert deltahub.__file__.startswith(sys.argv[1]), deltahub.__file__
out = {}
for path in sys.argv[2:]:
    try:
        out[path] = {"nnz": deltahub.load_delta(path).nnz}
    except deltahub.DeltaFormatError as e:
        out[path] = {"problems": e.problems}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_format_1_0_reader_refuses_1_1_files_cleanly(tmp_path):
    if not (REPO / ".git").exists():
        pytest.skip("needs the git history (the 1.0 reader is taken from it)")
    old = tmp_path / "deltahub-0.1.0"
    old.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", V1_0_COMMIT, "deltahub"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    compact = save_delta(
        SparseDelta(
            {
                "g": ParamDelta(torch.tensor([3, 4, 900]), torch.ones(3), (1000,), torch.float32),
                "b": ParamDelta(torch.tensor([0, 2, 5]), torch.ones(3), (6,), torch.float32),
            }
        ),
        tmp_path / "compact",
    )
    plain = save_delta(
        SparseDelta({"d": ParamDelta(torch.arange(4), torch.ones(4), (4,), torch.float32)}),
        tmp_path / "plain",
    )
    result = subprocess.run(
        [sys.executable, "-c", _OLD_READER, str(old), str(compact), str(plain)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    problems = out[str(compact)]["problems"]
    # A DeltaFormatError (no crash, nothing misread) that opens with the storage it does not know.
    assert problems[0].endswith("'storage' must be 'sparse' or 'dense', got 'gaps'"), problems
    assert any("got 'bitmap'" in p for p in problems)
    # A 1.1 file that needs no 1.1 storage is still read by 1.0 readers.
    assert out[str(plain)] == {"nnz": 4}
