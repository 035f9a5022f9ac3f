"""The README's main job, as a user runs it: `deltahub demo` in a subprocess, and its claims checked."""

import re
import subprocess
import sys
from pathlib import Path

from deltahub import load_delta
from deltahub.demo import run_demo


def test_demo_command_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "deltahub.cli", "demo", "--out", str(out), "--steps", "20"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "the base is bit-identical: True" in proc.stdout
    assert re.search(r"\+count -motif\s+\d", proc.stdout)
    for task in ("count", "motif"):
        assert load_delta(out / f"delta-{task}").nnz > 0


def test_demo_claims_hold(tmp_path):
    result = run_demo(tmp_path / "demo", steps=30, echo=lambda *_: None)
    base, losses = result.losses["base"], result.losses
    # each delta lowers its own task's held-out loss, and the sum keeps part of both gains
    assert losses["+count"]["count"] < base["count"] - 0.1
    assert losses["+motif"]["motif"] < base["motif"] - 0.1
    assert losses["+count +motif"]["count"] < base["count"]
    assert losses["+count +motif"]["motif"] < base["motif"]
    assert result.revert_exact
    assert all(b < 0.5 * result.base_bytes for b in result.delta_bytes.values())


def test_demo_help_has_an_example():
    proc = subprocess.run(
        [sys.executable, "-m", "deltahub.cli", "demo", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "Example:" in proc.stdout
    assert (
        Path(__file__).parent.joinpath("..", "README.md").resolve().read_text().count("scripts/demo.sh") >= 1
    )


def test_demo_refuses_to_replace_a_folder_it_did_not_make(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    proc = subprocess.run(
        [sys.executable, "-m", "deltahub.cli", "demo", "--out", str(precious)], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "was not made by `deltahub demo`" in proc.stderr and "Traceback" not in proc.stderr
    assert (precious / "thesis.tex").read_text() == "years of work"
