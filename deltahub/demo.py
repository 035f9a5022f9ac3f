"""The README's main job: an end-to-end run on a tiny model built from a config, offline, in under a minute.

Two full fine-tunes of one tiny Llama on two synthetic tasks are turned into sparse deltas (``extract_delta``),
saved in the deltahub format, inspected for overlap, then composed onto the base at load time in several ways
(alone, summed, one negated) with held-out loss on both tasks for each, hot-swapped with exact reverts.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

MARKER = ".deltahub-demo"
VOCAB = 128
SEQ_LEN = 32


def counting_task(n: int, gen: torch.Generator) -> torch.Tensor:
    """Sequences that count up by a per-sequence stride: the next token is predictable from the last two."""
    start = torch.randint(0, VOCAB, (n, 1), generator=gen)
    stride = torch.randint(1, 4, (n, 1), generator=gen)
    return (start + stride * torch.arange(SEQ_LEN)) % VOCAB


def motif_task(n: int, gen: torch.Generator) -> torch.Tensor:
    """Sequences repeating a random 4-token motif: predictable once the motif has been seen."""
    motif = torch.randint(0, VOCAB, (n, 4), generator=gen)
    return motif.repeat(1, SEQ_LEN // 4)


TASKS: dict[str, Callable[[int, torch.Generator], torch.Tensor]] = {
    "count": counting_task,
    "motif": motif_task,
}


def tiny_base(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def loss_on(model, batch: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=batch, labels=batch).loss)


def fine_tune(model, task: str, steps: int, seed: int) -> None:
    """A short full fine-tune: the kind of checkpoint users have today and want as a small delta."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = TASKS[task](16, gen)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix == ".safetensors")


@dataclass
class DemoResult:
    out: Path
    losses: dict[str, dict[str, float]]
    delta_bytes: dict[str, int]
    base_bytes: int
    revert_exact: bool


def run_demo(out: Path, *, steps: int = 60, density: float = 0.1, seed: int = 0, echo=print) -> DemoResult:
    """Run the whole flow and print what happens; returns the figures so tests can check the claims."""
    from transformers.utils import logging as hf_logging

    from . import apply_deltas, extract_delta, load_delta, load_model, overlap_report, save_delta

    hf_logging.disable_progress_bar()

    t0 = time.perf_counter()
    out = Path(out)
    if out.exists():
        # Only ever delete a folder an earlier demo made: --out might point at something precious.
        if not (out / MARKER).exists() and any(out.iterdir()):
            raise FileExistsError(
                f"{out} exists and was not made by `deltahub demo`; choose another --out or remove it yourself"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by `deltahub demo`; the next run replaces this folder\n")

    base = tiny_base(seed)
    base.save_pretrained(out / "base")
    n_params = sum(p.numel() for p in base.parameters())
    echo(f"[1/5] base: a tiny Llama built from a config ({n_params / 1e6:.2f}M parameters) -> {out / 'base'}")

    echo(f"[2/5] full fine-tunes, {steps} steps each, then extract_delta at density {density}:")
    gen = torch.Generator().manual_seed(seed + 100)
    held_out = {task: make(64, gen) for task, make in TASKS.items()}
    delta_paths, full_losses = {}, {}
    for i, task in enumerate(TASKS):
        tuned = tiny_base(seed)
        fine_tune(tuned, task, steps, seed + 1 + i)
        full_losses[f"full fine-tune {task}"] = {t: loss_on(tuned, batch) for t, batch in held_out.items()}
        tuned.save_pretrained(out / f"finetune-{task}")
        delta = extract_delta(out / "base", out / f"finetune-{task}", density=density, progress=False)
        delta_paths[task] = save_delta(delta, out / f"delta-{task}")
        echo(f"      {task:6s} nnz={delta.nnz:,}  -> {delta_paths[task]}")
    base_bytes = folder_size(out / "base")
    delta_bytes = {t: folder_size(p) for t, p in delta_paths.items()}
    echo(
        f"[3/5] sizes: base {base_bytes / 1e6:.2f} MB; "
        + ", ".join(f"delta-{t} {b / 1e6:.3f} MB ({b / base_bytes:.1%})" for t, b in delta_bytes.items())
    )
    deltas = {t: load_delta(p) for t, p in delta_paths.items()}
    echo("      overlap between the two deltas:")
    for line in str(overlap_report(list(deltas.values()))).splitlines():
        echo(f"      {line}")

    echo("[4/5] held-out loss, composing at load time and hot-swapping with exact reverts:")
    model = load_model(str(out / "base"))
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    compositions = {
        "base": ([], []),
        "+count": (["count"], [1.0]),
        "+motif": (["motif"], [1.0]),
        "+count +motif": (["count", "motif"], [1.0, 1.0]),
        "+count -motif": (["count", "motif"], [1.0, -1.0]),
    }
    losses: dict[str, dict[str, float]] = {}
    for label, (names, weights) in compositions.items():
        handle = apply_deltas(model, [deltas[n] for n in names], weights) if names else None
        losses[label] = {task: loss_on(model, batch) for task, batch in held_out.items()}
        if handle is not None:
            handle.revert()
    revert_exact = all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    echo(f"      {'model':22s}" + "".join(f"{'loss/' + t:>12s}" for t in TASKS))
    for label, row in {**losses, **full_losses}.items():
        echo(f"      {label:22s}" + "".join(f"{row[t]:12.3f}" for t in TASKS))
    echo(f"      after five apply/revert cycles the base is bit-identical: {revert_exact}")

    echo(f"[5/5] done in {time.perf_counter() - t0:.1f} s. Repeat by hand:")
    echo(
        '      python -c "import deltahub; m = deltahub.load_model('
        f"'{out / 'base'}', ['{delta_paths['count']}', '{delta_paths['motif']}'], weights=[1, -1])\""
    )
    return DemoResult(out, losses, delta_bytes, base_bytes, revert_exact)
