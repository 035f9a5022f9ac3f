"""Streaming deployment merge versus copying the base (the floor) and versus mergekit, paired in one run.

Builds once (cached under --workdir) a ~1B-parameter bf16 Llama from a config (hidden 2048, intermediate 5632,
16 layers, vocab 32000, untied) saved in two shards, and two deltas touching 1% of every linear weight
(lm_head included; bf16 values). Then, round by round in one process, each command runs as a child process
and is measured for wall time and peak RSS (``os.wait4``'s per-child rusage):

* ``cp -r base out``                                    the floor: every byte read and written once
* ``deltahub merge base d0 d1`` with ``sum`` and with ``ties`` (density 0.5)
* ``mergekit-yaml`` task_arithmetic and ties on the equivalent dense fine-tunes (base + delta, written once by
  deltahub), when ``mergekit-yaml`` is found ($MERGEKIT_YAML or PATH; install it in its own venv:
  ``python3 -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 mergekit``). mergekit's ties density is
  applied to the dense task vector, so 0.005 there keeps about the half of the 1% entries that 0.5 keeps here.

Medians over --repeats rounds and same-run ratios to cp are printed (the machine is shared; ``sync`` runs
untimed between commands so one command's write-back does not land on the next). Finally the peak RSS of a
7B-scale merge: measured on a 7B-shaped config (hidden 4096, intermediate 11008, 32 layers) with --seven-b when
disk allows (about 30 GB), else computed from the per-tensor figures and labelled so.

    python benchmarks/merge.py [--repeats 3] [--mergekit-ties-repeats 1] [--seven-b] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from child import measure
from safetensors.torch import save_file
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from deltahub import ParamDelta, SparseDelta, merge, save_delta
from deltahub.fingerprint import tensor_samples

DENSITY = 0.01
SHAPES = {
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
    },
    "7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    },
}


def build(
    workdir: Path, size: str, shards: int, fine_tunes: bool = True
) -> tuple[Path, list[Path], list[Path]]:
    """Base (random bf16 weights written shard by shard, never a whole model in memory), two deltas, and the two
    dense fine-tunes mergekit needs (written by deltahub merge itself, which the tests check is exact)."""
    root = workdir / size
    base, deltas = root / "base", [root / "delta-0", root / "delta-1"]
    fts = [root / "ft-0", root / "ft-1"]
    done = root / "built-v1.1"  # deltas in format 1.1 (rebuilt when the format changes)
    if done.exists():
        return base, deltas, fts
    shutil.rmtree(root, ignore_errors=True)
    base.mkdir(parents=True)
    config = LlamaConfig(vocab_size=32000, tie_word_embeddings=False, dtype="bfloat16", **SHAPES[size])
    config.architectures = ["LlamaForCausalLM"]  # mergekit picks its architecture handler from this
    with torch.device("meta"):
        names = {n: tuple(p.shape) for n, p in LlamaForCausalLM(config).state_dict().items()}
    total = sum(math.prod(s) * 2 for s in names.values())
    gen = torch.Generator().manual_seed(0)
    params: list[dict[str, ParamDelta]] = [{}, {}]
    samples: dict[str, tuple[float, ...]] = {}
    weight_map, shard, used, index = {}, {}, 0, 1
    shard_names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]

    def flush() -> None:
        save_file(shard, str(base / shard_names[index - 1]), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, shard_names[index - 1]))
        shard.clear()

    for name, shape in names.items():
        numel = math.prod(shape)
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if len(shape) == 2 and "embed_tokens" not in name:
            # 1% of positions, sorted and unique: one random offset in each block of 100 (no O(numel) permutation)
            for i in range(2):
                k = int(numel * DENSITY)
                step = numel // k
                idx = torch.arange(k, dtype=torch.int64) * step + torch.randint(0, step, (k,), generator=gen)
                vals = (torch.randn(k, generator=gen) * 2e-3).to(torch.bfloat16)
                params[i][name] = ParamDelta(idx.to(torch.int32), vals, shape, torch.bfloat16)
            samples[name] = tensor_samples(name, t)
        if shard and used + numel * 2 > total / shards * 1.0001 and index < shards:
            flush()
            index, used = index + 1, 0
        shard[name] = t
        used += numel * 2
    flush()
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config.save_pretrained(base)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(base)
    for i, out in enumerate(deltas):
        save_delta(SparseDelta(params[i], base_model=str(base), fingerprint=samples), out, overwrite=True)
    del params
    for d, ft in zip(deltas, fts, strict=True) if fine_tunes else ():
        merge(base, [d], out=ft, overwrite=True, progress=False)
    done.touch()
    return base, deltas, fts


def run(
    cmd: list[str], out: Path, env: dict[str, str] | None = None, keep: bool = False
) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one command; ``out`` is removed before and after (untimed)."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    wall, rss = measure(cmd, env)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    return wall, rss / 1e9


def mergekit_config(path: Path, method: str, base: Path, fts: list[Path]) -> Path:
    models = []
    for ft in fts:
        params = {"weight": 1.0}
        if method == "ties":
            params["density"] = DENSITY * 0.5
        models.append({"model": str(ft), "parameters": params})
    cfg = {"merge_method": method, "base_model": str(base), "models": models, "dtype": "bfloat16"}
    if method == "ties":
        cfg["parameters"] = {"normalize": False}
    path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
    return path


def find_mergekit() -> str | None:
    return (
        os.environ.get("MERGEKIT_YAML")
        or shutil.which("mergekit-yaml")
        or ("/tmp/mk/bin/mergekit-yaml" if Path("/tmp/mk/bin/mergekit-yaml").exists() else None)
    )


def baseline_tree(workdir: Path, rev: str) -> Path:
    """The ``deltahub`` package of git revision ``rev`` (e.g. the 0.1.0 release), unpacked for PYTHONPATH."""
    tree = workdir / f"deltahub-{rev}"
    if not (tree / "deltahub").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        repo = Path(__file__).resolve().parents[1]
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", rev, "deltahub"], check=True, capture_output=True
        )
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def v1_0_copies(deltas: list[Path]) -> list[Path]:
    """The deltas in format 1.0's layout (``sparse`` storage only), which a 0.1.0 reader loads."""
    from deltahub import load_delta
    from deltahub.format import encoding

    out = [d.with_name(d.name + "-v1.0") for d in deltas]
    original = encoding.choose_storage
    encoding.choose_storage = lambda positions, numel: ("sparse", encoding.index_code(numel))
    try:
        for src, dst in zip(deltas, out, strict=True):
            if not (dst / "delta_config.json").exists():
                save_delta(load_delta(src), dst, overwrite=True)
    finally:
        encoding.choose_storage = original
    return out


def shard_hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "deltahub-bench-merge")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--mergekit-ties-repeats", type=int, default=1, help="mergekit ties takes minutes a run"
    )
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--seven-b", action="store_true", help="also build a 7B-shaped base (~30 GB disk)")
    parser.add_argument(
        "--baseline",
        metavar="GIT_REV",
        help="also time the merge of this git revision of deltahub (e.g. 063cdb9, the 0.1.0 release) on format-1.0 "
        "copies of the deltas, and check that its shards are byte-identical to this one's",
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    base, deltas, fts = build(args.workdir, "1b", shards=2)
    print(f"1B fixture ready in {time.perf_counter() - t0:.0f} s (cached in {args.workdir})")
    size = sum(f.stat().st_size for f in base.iterdir())
    nnz = sum(json.loads((d / "delta_config.json").read_text())["nnz"] for d in deltas)
    print(f"base: {size / 1e9:.2f} GB, 2 deltas: {nnz:,} entries in total\n")
    out = args.workdir / "out"
    dh = [
        sys.executable,
        "-m",
        "deltahub.cli",
        "merge",
        str(base),
        *map(str, deltas),
        "--out",
        str(out),
        "--quiet",
    ]
    commands: dict[str, list[str]] = {
        "cp -r": ["cp", "-r", str(base), str(out)],
        "deltahub merge sum": dh,
        "deltahub merge ties": [*dh, "--method", "ties", "--density", "0.5"],
    }
    envs: dict[str, dict[str, str]] = {}
    if args.baseline:
        tree = baseline_tree(args.workdir, args.baseline)
        # -P: not the current folder first on sys.path, where this checkout's deltahub would shadow PYTHONPATH's.
        old = [dh[0], "-P", *dh[1:5], *map(str, v1_0_copies(deltas)), *dh[7:]]
        for method, extra in (("sum", []), ("ties", ["--method", "ties", "--density", "0.5"])):
            name = f"{args.baseline} merge {method}"
            commands[name] = [*old, *extra]
            envs[name] = {**os.environ, "PYTHONPATH": str(tree)}
    mk = None if args.no_mergekit else find_mergekit()
    if mk:
        for method in ("task_arithmetic", "ties"):
            cfg = mergekit_config(args.workdir / f"mergekit-{method}.yaml", method, base, fts)
            commands[f"mergekit {method}"] = [mk, str(cfg), str(out), "--quiet"]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for r in range(args.repeats):
        for name, cmd in commands.items():
            if name == "mergekit ties" and r >= args.mergekit_ties_repeats:
                continue
            results[name].append(run(cmd, out, envs.get(name)))
            wall, rss = results[name][-1]
            print(f"  round {r + 1}: {name:24s} {wall:7.2f} s  {rss:5.2f} GB", flush=True)
    cp = statistics.median(w for w, _ in results["cp -r"])
    print(f"\nmedians over {args.repeats} rounds (mergekit ties: {args.mergekit_ties_repeats}), same run:")
    print(f"{'command':24s} {'wall s':>7s} {'x cp':>6s} {'peak RSS GB':>12s}")
    for name, rs in results.items():
        walls, rsss = [w for w, _ in rs], [m for _, m in rs]
        print(f"{name:24s} {fmt(walls)} {statistics.median(walls) / cp:6.2f} {statistics.median(rsss):12.2f}")
    if args.baseline:
        for method in ("sum", "ties"):
            new, old = f"deltahub merge {method}", f"{args.baseline} merge {method}"
            run(commands[new], out, keep=True)
            want = shard_hashes(out)
            run(commands[old], out, envs[old], keep=True)
            same = shard_hashes(out) == want
            shutil.rmtree(out, ignore_errors=True)
            print(f"{method}: shards of this deltahub and of {args.baseline} byte-identical: {same}")
    if not mk and not args.no_mergekit:
        print("mergekit-yaml not found (set MERGEKIT_YAML or put it on PATH): mergekit rows skipped")

    print("\n7B scale (hidden 4096, intermediate 11008, 32 layers, vocab 32000):")
    # Computed: the process baseline measured above plus what grows with the model: the loaded deltas and the
    # largest touched tensor (read buffer; the combined entries of one tensor are ~2% of it).
    dh_rss = statistics.median(m for _, m in results["deltahub merge sum"])
    scale = {k: v for k, v in SHAPES["7b"].items()}
    big_1b = 32000 * 2048 * 2
    big_7b = 32000 * scale["hidden_size"] * 2
    delta_1b = nnz * 6
    params_7b = 32000 * 4096 * 2 + 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    delta_7b = 2 * int(params_7b * DENSITY) * 6
    estimate = dh_rss - (big_1b + delta_1b) / 1e9 + (big_7b + delta_7b) / 1e9
    print(
        f"  computed from per-tensor figures (not measured): {dh_rss:.2f} GB at 1B - (largest tensor "
        f"{big_1b / 1e9:.2f} + deltas {delta_1b / 1e9:.2f}) + (largest tensor {big_7b / 1e9:.2f} + deltas "
        f"{delta_7b / 1e9:.2f}) = {estimate:.2f} GB"
    )
    if args.seven_b:
        free = shutil.disk_usage(args.workdir).free
        if free < 40e9 and not (args.workdir / "7b" / "built").exists():
            print(f"  not measured: {free / 1e9:.0f} GB free, need ~40 GB")
            return
        t0 = time.perf_counter()
        base7, deltas7, _ = build(args.workdir, "7b", shards=3, fine_tunes=False)
        print(f"  7B fixture ready in {time.perf_counter() - t0:.0f} s")
        out7 = args.workdir / "out-7b"
        dh7 = [
            sys.executable,
            "-m",
            "deltahub.cli",
            "merge",
            str(base7),
            *map(str, deltas7),
            "--out",
            str(out7),
            "--quiet",
        ]
        for name, cmd in (("cp -r", ["cp", "-r", str(base7), str(out7)]), ("deltahub merge sum", dh7),
                          ("deltahub merge ties", [*dh7, "--method", "ties", "--density", "0.5"])):  # fmt: skip
            wall, rss = run(cmd, out7)
            print(f"  measured: {name:24s} {wall:7.2f} s  peak RSS {rss:5.2f} GB")


if __name__ == "__main__":
    main()
