"""`deltahub train` as a user runs it: a subprocess on a tiny saved model and a real text file."""

import json
import subprocess
import sys

import pytest
import torch
from tiny import save_char_tokenizer, tiny_llama, tokens

import deltahub

# `deltahub train` as a subprocess
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(folder)
    save_char_tokenizer(folder)
    return folder


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "deltahub.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("algorithm", "placement"),
    [("rigl", ["--device", "cpu", "--gradient-checkpointing"]), ("sm3", ["--bf16"])],
    ids=["rigl-cpu-checkpointing", "sm3-bf16-autocast"],
)
def test_train_writes_a_delta_that_lowers_the_loss(tmp_path, base_folder, algorithm, placement):
    text = tmp_path / "data.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "delta"
    lr = "0.05" if algorithm == "rigl" else "0.1"
    proc = run(
        "train",
        base_folder,
        text,
        "--out",
        out,
        "--steps",
        30,
        "--density",
        0.1,
        "--seq-len",
        32,
        "--batch-size",
        8,
        "--lr",
        lr,
        "--algorithm",
        algorithm,
        "--reselection-steps",
        10,
        "--quiet",
        *placement,
    )
    assert proc.returncode == 0, proc.stderr
    before, after = map(float, proc.stdout.split("held-out loss ")[1].split(";")[0].split(" -> "))
    assert after < before - 0.3
    delta = deltahub.load_delta(out)
    assert delta.provenance["algorithm"] == algorithm and delta.provenance["steps"] == 30
    assert delta.base_model == str(base_folder)
    model = deltahub.load_model(str(base_folder), [out])  # the fingerprint matches the saved base
    with torch.no_grad():
        assert not torch.equal(model(tokens()).logits, tiny_llama()(tokens()).logits)


def test_train_errors_are_one_clear_line(tmp_path, base_folder):
    text = tmp_path / "data.txt"
    text.write_text("abc " * 500)
    proc = run("train", tmp_path / "no-such-base", text, "--out", tmp_path / "d")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert proc.stderr == (
        f"error: no model folder at {str(tmp_path / 'no-such-base')!r}: BASE must be a local folder written by "
        "save_pretrained\n"
    )
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    proc = run("train", base_folder, text, "--out", tmp_path / "taken")
    assert proc.returncode == 4
    assert (
        proc.stderr
        == f"error: {tmp_path / 'taken'} already exists and is not empty; pass --overwrite to replace it\n"
    )
    proc = run("train", base_folder, text, "--out", tmp_path / "d", "--density", 2)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: invalid SftConfig: density must be a number in (0, 1]; got 2.0" in proc.stderr
    records = tmp_path / "data.jsonl"
    records.write_text(json.dumps({"text": "hello"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    proc = run("train", base_folder, records, "--out", tmp_path / "d")
    assert proc.returncode == 2
    assert "data.jsonl:2 has no string field 'text'; choose the field with --text-field" in proc.stderr
    proc = run("train", base_folder, text, "--out", tmp_path / "d", "--seq-len", 4096)
    assert proc.returncode == 2 and "fewer than two blocks of --seq-len 4096" in proc.stderr


def test_device_values_are_checked():
    from training.cli import resolve_device
    from training.errors import SftConfigError

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x", "cpu:0:1"):
        with pytest.raises(SftConfigError, match=r"is not a device; use auto, cpu, cuda or cuda:N"):
            resolve_device(bad)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda works here")
def test_device_cuda_without_a_gpu_is_a_one_line_error(tmp_path, base_folder):
    text = tmp_path / "data.txt"
    text.write_text("abc " * 500)
    proc = run("train", base_folder, text, "--out", tmp_path / "d", "--device", "cuda")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr  # one line
    assert proc.stderr.startswith("error: --device cuda needs a CUDA GPU, but torch sees none")
    assert not (tmp_path / "d").exists()
