"""`deltahub train` as a user runs it: a subprocess on a tiny saved model and a real text file."""

import json
import random
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from launch import TORCHRUN, two_processes
from tiny import chat_tokenizer, save_char_tokenizer, tiny_llama, tokens

import deltahub
from deltahub.cli import main

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


def run_here(*args):
    """The same command in-process (no interpreter start, no imports): for the error paths."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


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
        40,
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
    assert delta.provenance["algorithm"] == algorithm and delta.provenance["steps"] == 40
    assert delta.base_model == str(base_folder)
    model = deltahub.load_model(str(base_folder), [out])  # the fingerprint matches the saved base
    with torch.no_grad():
        assert not torch.equal(model(tokens()).logits, tiny_llama()(tokens()).logits)


def test_train_errors_are_one_clear_line(tmp_path, base_folder):
    text = tmp_path / "data.txt"
    text.write_text("abc " * 500)
    proc = run_here("train", tmp_path / "no-such-base", text, "--out", tmp_path / "d")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert proc.stderr == (
        f"error: no model folder at {str(tmp_path / 'no-such-base')!r}: BASE must be a local folder written by "
        "save_pretrained\n"
    )
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    proc = run_here("train", base_folder, text, "--out", tmp_path / "taken")
    assert proc.returncode == 4
    assert (
        proc.stderr
        == f"error: {tmp_path / 'taken'} already exists and is not empty; pass --overwrite to replace it\n"
    )
    proc = run_here("train", base_folder, text, "--out", tmp_path / "d", "--density", 2)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: invalid SftConfig: density must be a number in (0, 1]; got 2.0" in proc.stderr
    records = tmp_path / "data.jsonl"
    records.write_text(json.dumps({"text": "hello"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    proc = run_here("train", base_folder, records, "--out", tmp_path / "d")
    assert proc.returncode == 2
    assert (
        "data.jsonl: record 2 has no string field 'text' (got None); choose the field with --text-field"
        in proc.stderr
    )
    proc = run_here("train", base_folder, text, "--out", tmp_path / "d", "--seq-len", 4096)
    assert proc.returncode == 2 and "fewer than two blocks of --seq-len 4096" in proc.stderr


COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow"}


def dialogues(n: int, seed: int = 0) -> list[dict]:
    """A learnable dialogue task: the reply names the color of the thing asked about."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        thing = rng.choice(sorted(COLORS))
        messages = [
            {"role": "user", "content": f"what color is the {thing}?"},
            {"role": "assistant", "content": f"the {thing} is {COLORS[thing]}."},
        ]
        if rng.random() < 0.5:
            messages.insert(0, {"role": "system", "content": "answer in one line."})
        records.append({"messages": messages})
    return records


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory):
    """The tiny model with the chat tokenizer. Its output head is scaled up: SFT leaves the head frozen, and a
    random one at init scale caps every logit near +-0.6 (no prediction above ~5% however well the layers
    learn); a pretrained head is confident, and so must this one be for the task to be learnable."""
    folder = tmp_path_factory.mktemp("chat-base")
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(25)
    model.save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    return folder


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def held_out(stdout: str) -> tuple[float, float]:
    return tuple(map(float, stdout.split("held-out loss ")[-1].split(";")[0].split(" -> ")))


@pytest.mark.slow
def test_chat_training_learns_the_replies(tmp_path, chat_base):
    data = write_jsonl(tmp_path / "chats.jsonl", dialogues(240))
    common = ["--density", 0.1, "--lr", 0.02, "--batch-size", 8, "--reselection-steps", 10, "--quiet"]
    proc = run(
        "train", chat_base, data, "--out", tmp_path / "d", "--max-steps", 40, "--eval-every", 20, *common
    )
    assert proc.returncode == 0, proc.stderr
    before, after = held_out(proc.stdout)
    # uniform guessing is ln(64) = 4.16 and the replies' character frequencies alone ~3: below 2, the model
    # predicts the reply from the question
    assert after < 2.0 and after < before, proc.stdout
    assert "step 20: held-out loss" in proc.stdout
    assert "216 training and 24 held-out conversations" in proc.stdout
    # packing and epochs: 216 conversations of ~40 tokens in blocks of 64, 8 per batch -> 1.5 epochs
    proc = run(
        "train",
        chat_base,
        data,
        "--out",
        tmp_path / "p",
        "--packing",
        "--seq-len",
        64,
        "--epochs",
        1.5,
        *common,
    )
    assert proc.returncode == 0, proc.stderr
    blocks = int(proc.stdout.split("conversations, packed")[0].split("(")[-1].split()[0])
    assert "packed into blocks of 64 tokens" in proc.stdout and blocks == 216
    steps = deltahub.load_delta(tmp_path / "p").provenance["steps"]
    assert steps > 1


def test_chat_data_errors_are_one_clear_line(tmp_path, base_folder, chat_base):
    chats = write_jsonl(tmp_path / "chats.jsonl", dialogues(20))
    proc = run_here("train", base_folder, chats, "--out", tmp_path / "d")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert (
        "error: the tokenizer of the base has no chat template, which the messages column needs; use a chat "
        "(instruct) model's tokenizer, or pass one with --chat-template (a Jinja template file)"
        in proc.stderr
    )
    proc = run_here("train", chat_base, chats, "--out", tmp_path / "d", "--messages-field", "conversation")
    assert (
        "has no column 'conversation' (its columns: messages); choose one with --messages-field"
        in proc.stderr
    )
    broken = tmp_path / "broken.jsonl"
    broken.write_text(chats.read_text() + "{oops\n")
    proc = run_here("train", chat_base, broken, "--out", tmp_path / "d")
    assert proc.returncode == 2 and "broken.jsonl:21 is not valid JSON" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


LAUNCHERS = {
    "torchrun": TORCHRUN,
    # accelerate's multi-process launcher (torchrun underneath) also serves CPUs: gloo is chosen without CUDA
    "accelerate": [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ],
}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "data.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    return path


@pytest.fixture(scope="module")
def one_process_delta(tmp_path_factory, base_folder, text_file):
    out = tmp_path_factory.mktemp("one") / "d"
    proc = run_here("train", base_folder, text_file, "--out", out, *MULTI_ARGS, "--batch-size", 8)
    assert proc.returncode == 0, proc.stderr
    return deltahub.load_delta(out), held_out(proc.stdout)


MULTI_ARGS = ["--max-steps", 8, "--seq-len", 32, "--density", 0.1, "--lr", 0.05, "--reselection-steps", 3]
MULTI_ARGS += ["--selection-accumulation-steps", 2, "--quiet"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_fsdp_under_a_launcher_matches_one_process(
    tmp_path, base_folder, text_file, one_process_delta, launcher
):
    out = tmp_path / "d"
    command = [*LAUNCHERS[launcher], "-m", "deltahub.cli", "train", base_folder, text_file, "--out", out]
    command += [*MULTI_ARGS, "--batch-size", 4, "--fsdp"]  # 2 x 4 rows: the single process's batches of 8
    proc = two_processes(command)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained rigl delta") == 1 and "on 2 processes" in proc.stdout  # rank 0 reports
    reference, (before, after) = one_process_delta
    got = deltahub.load_delta(out)
    assert got.provenance["steps"] == 8 and list(got) == list(reference)
    for name in got:
        assert torch.equal(got[name].indices, reference[name].indices), name
        torch.testing.assert_close(got[name].values, reference[name].values, rtol=1e-4, atol=1e-6)
    got_before, got_after = held_out(proc.stdout)
    assert got_before == pytest.approx(before, abs=1e-4) and got_after == pytest.approx(after, abs=1e-4)


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
