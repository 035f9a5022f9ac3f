"""Format versions: files written by format 1.0 (deltahub 0.1.0) load unchanged."""

from __future__ import annotations

from pathlib import Path

import torch
from format_helpers import assert_same

from deltahub import ParamDelta, SparseDelta, load_delta

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
