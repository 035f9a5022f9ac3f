"""Every example in every verb's ``--help`` runs, as written, in a shell, against tiny real fixtures named as the
examples name them and a loopback Hub holding the repos they mention. An example that drifts from the CLI (a
renamed flag, a removed option, a value the verb now refuses) fails here.

Not executable here, so only parsed by the verb's own option parser: ``deltahub demo`` on SmolLM2 (minutes and
its own packages), the demo pointed at huggingface.co (the network) and training on ``--device cuda`` (a GPU).
``deltahub demo --fast`` is run by tests/test_demo.py, as a subprocess, with its claims checked: parsed only here.

The examples run in this process (``main`` as the console script calls it, the environment, working folder and
``>`` redirection of the line applied): the same code as a shell would run, without paying torch's and
transformers' imports twenty times (that made this the slowest test of the suite, 3 of its 9 minutes).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import HfApi, constants
from safetensors.torch import load_file, save_file
from tiny import chat_tokenizer, random_delta, save_char_tokenizer, tiny_llama

import deltahub
from deltahub.cli import main
from deltahub.demo.localhub import HubServer

VERBS = ["train", "push", "pull", "merge", "inspect", "extract", "convert", "demo"]
# Parsed only: the demo (SmolLM2 takes minutes; --fast is tests/test_demo.py's; huggingface.co is the network) and
# `--device cuda` (a GPU, which CI has not).
PARSE_ONLY = ("deltahub demo", "--hub-endpoint https://huggingface.co", "--device cuda")
TOKEN = "hf_examples_token_0123456789"
# Budgets the examples give for real models, scaled to the tiny fixtures (18k weights in the targeted modules).
SCALED = {"--num-tunable-weights 1000000": "--num-tunable-weights 1000", "--num 5000000": "--num 5000"}


def examples(verb: str) -> list[str]:
    """The example command lines of ``deltahub VERB --help``, continuation lines joined, comments dropped."""
    done = CliRunner().invoke(main, [verb, "--help"], prog_name="deltahub", terminal_width=120)
    assert done.exit_code == 0, done.output
    text = done.output
    block = text.split("Examples:\n", 1)[1].split("\n\n", 1)[0]
    lines, current = [], ""
    for raw in block.splitlines():
        line = raw.strip()
        current = f"{current} {line}" if current else line
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        lines.append(re.sub(r"\s+#.*$", "", current))
        current = ""
    return lines


@pytest.mark.slow
def test_every_verb_has_examples_that_its_own_parser_accepts():
    for verb in VERBS:
        found = examples(verb)
        assert len(found) >= 2, verb
        for line in found:
            words = shlex.split(line)
            words = words[next(i for i, w in enumerate(words) if w == "deltahub") + 1 :]
            words = [w for w in words if w != ">" and not w.endswith(".json")]
            assert words[0] == verb, line
            command = main.get_command(None, verb)  # type: ignore[arg-type]
            command.make_context(verb, words[1:], resilient_parsing=False)


def _fixtures(root: Path) -> None:
    base = tiny_llama(torch.bfloat16)
    for name in ("llama", "smollm2", "base", "my-llm"):
        base.save_pretrained(root / name)
        save_char_tokenizer(root / name)
    (root / "plays.txt").write_text("to be or not to be, that is the question.\n" * 200)
    (root / "data.jsonl").write_text(
        "".join(json.dumps({"text": f"a line of text, {i}."}) + "\n" for i in range(300))
    )
    # instruction data for `train`: a chat model (the tiny one with a chat template) and conversations
    base.save_pretrained(root / "smollm2-instruct")
    chat_tokenizer().save_pretrained(root / "smollm2-instruct")
    chats = [[{"role": "user", "content": f"what is {i} plus one?"}, {"role": "assistant", "content": f"{i + 1}."}]
             for i in range(120)]  # fmt: skip
    (root / "chats.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    import pandas as pd

    pd.DataFrame({"text": [f"a row of text, {i}." for i in range(300)]}).to_parquet(root / "data.parquet")
    for i, name in enumerate(("math-delta", "style-delta", "a", "b")):
        # math-delta names its base by the id the loopback Hub holds it under: `merge acme/math-delta@v1` alone
        base_model = "meta-llama/Llama-3.2-1B" if name == "math-delta" else "tiny"
        deltahub.save_delta(random_delta(base, 0.05, seed=i + 1, base_model=base_model), root / name)
    _adapters(root, base)
    finetuned = tiny_llama(torch.bfloat16)
    with torch.no_grad():
        for p in finetuned.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)).to(p.dtype) * 0.01)
    finetuned.save_pretrained(root / "llama-sft")
    # a fine-tune with one tensor the base does not have (e.g. new tokens' head): --on-mismatch skip
    finetuned.save_pretrained(root / "llama-with-new-tokens")
    weights = load_file(root / "llama-with-new-tokens" / "model.safetensors")
    weights["model.extra_head.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    save_file(weights, root / "llama-with-new-tokens" / "model.safetensors", metadata={"format": "pt"})


def _adapters(root: Path, base) -> None:
    """What `deltahub convert`'s examples convert: an SFT-fork adapter, a peft LoRA, a composable-sft diff."""
    from peft import LoraConfig, get_peft_model

    fork = root / "llama-sft-adapter"
    fork.mkdir()
    (fork / "adapter_config.json").write_text(
        json.dumps({"peft_type": "SFT", "base_model_name_or_path": str(root / "llama")})
    )
    save_file({"base_model.model.model.layers.0.mlp.up_proj.sft_delta.indices": torch.tensor([9, 2], dtype=torch.int32),
               "base_model.model.model.layers.0.mlp.up_proj.sft_delta.values": torch.tensor([0.5, -0.5])},
              str(fork / "adapter_model.safetensors"))  # fmt: skip
    from transformers import AutoModelForCausalLM

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "llama"),
                          LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))  # fmt: skip
    lora.save_pretrained(root / "llama-lora")
    (root / "composable-sft").mkdir()
    diff = torch.sparse_coo_tensor(torch.tensor([[0, 3]]), torch.tensor([0.25, -0.25]), size=(32,)).coalesce()
    torch.save({"body": {"model.norm.weight": diff}, "head": {"lm_head.weight": torch.zeros(64, 32)}},
               root / "composable-sft" / "pytorch_diff.bin")  # fmt: skip


def run_example(line: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """Run one example line as the shell would: leading ``NAME=value`` words set the environment, ``> file``
    writes stdout to the file; the rest is ``deltahub``'s arguments. Returns (exit status, stdout, stderr)."""
    words = shlex.split(line)
    with monkeypatch.context() as scoped:
        while re.fullmatch(r"[A-Z_]+=.*", words[0]):
            name, value = words.pop(0).split("=", 1)
            scoped.setenv(name, value)
        assert words[0] == "deltahub", line
        target = None
        if ">" in words:
            at = words.index(">")
            target, words = words[at + 1], words[:at]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main.main(words[1:], prog_name="deltahub")
                code = 0
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    if target is not None:
        Path(target).write_text(out.getvalue())
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_every_help_example_runs(tmp_path, monkeypatch):
    root = tmp_path / "work"
    root.mkdir()
    _fixtures(root)
    with HubServer(tmp_path / "hub", {TOKEN: "acme"}, orgs={"org": ["acme"], "meta-llama": ["acme"]}) as hub:
        api = HfApi(endpoint=hub.url, token=TOKEN)
        # the examples' client (this process's): no Xet (the loopback Hub serves LFS), the loopback endpoint
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.chdir(root)
        # The repos the examples name: deltas (with the tags they pin), a base and a fine-tune.
        pushed = deltahub.push_delta(
            root / "math-delta", "acme/math-delta", private=True, endpoint=hub.url, token=TOKEN
        )
        api.create_tag("acme/math-delta", tag="v1", revision=pushed.sha)
        for repo, folder in (
            ("org/math", "math-delta"),
            ("org/code", "style-delta"),
            ("org/code-delta", "a"),
        ):
            sha = deltahub.push_delta(root / folder, repo, endpoint=hub.url, token=TOKEN).sha
            for tag in ("v1", "v2"):
                api.create_tag(repo, tag=tag, revision=sha)
        for repo, folder in (("meta-llama/Llama-3.2-1B", "llama"), ("org/llama-sft", "llama-sft")):
            api.create_repo(repo)
            api.upload_folder(repo_id=repo, folder_path=root / folder)
        ran = 0
        for verb in VERBS:
            for line in examples(verb):
                if any(marker in line for marker in PARSE_ONLY):
                    continue
                for real, tiny in SCALED.items():
                    line = line.replace(real, tiny)
                line = line.replace("https://hub.example.com", hub.url).replace("3f2a9c0e...", pushed.sha)
                line = line.replace("HF_TOKEN=hf_... ", "")
                code, out, err = run_example(line, monkeypatch)
                assert code == 0, f"{line}\n{out[-2000:]}\n{err[-2000:]}"
                ran += 1
    assert ran >= 18
    assert (root / "report.json").stat().st_size > 0 and (root / "overlap.png").stat().st_size > 0
    assert (root / "llama-mix-again" / "merge.yaml").read_text() == (
        root / "llama-mix" / "merge.yaml"
    ).read_text()
