"""`deltahub merge`, `deltahub inspect`, `deltahub extract` through click's runner (in process, fast)."""

from __future__ import annotations

import builtins
import json

import pytest
import torch
from click.testing import CliRunner
from test_merge import file_hashes, make_base, make_deltas, raw, tensors_of
from tiny import tiny_llama

import deltahub
from deltahub import merge
from deltahub.cli import main


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.stderr if hasattr(result, "stderr") else "")
    return result


def without_card(folder):
    return {k: v for k, v in file_hashes(folder).items() if k != "README.md"}


@pytest.fixture
def setup(tmp_path):
    base, model = make_base(tmp_path)
    return tmp_path, base, model, make_deltas(tmp_path, model)


def test_merge_command_matches_the_function_and_a_yaml_config_reproduces_it(setup):
    root, base, _, paths = setup
    result = run(
        "merge", base, *paths, "-w", "1", "-w", "-0.5", "--method", "ties", "--density", "0.4", "--dtype",
        "float32", "--max-shard-size", "50KB", "--out", root / "cli", "--quiet",
    )  # fmt: skip
    assert result.output == ""  # --quiet: no progress bar, no summary
    merge(
        base, paths, weights=[1.0, -0.5], method="ties", method_options={"density": 0.4}, dtype="float32",
        max_shard_size="50KB", out=root / "api", progress=False,
    )  # fmt: skip
    (root / "merge.yaml").write_text(
        f"base: {base}\ndeltas:\n  - path: {paths[0]}\n    weight: 1.0\n  - {{path: {paths[1]}, weight: -0.5}}\n"
        "method: ties\noptions: {density: 0.4}\ndtype: float32\nmax_shard_size: 50KB\n"
    )
    run("merge", "--config", root / "merge.yaml", "--out", root / "yaml", "--quiet")
    want = without_card(root / "api")  # the card's title is the folder name
    assert without_card(root / "cli") == want
    assert without_card(root / "yaml") == want
    assert len([n for n in want if n.endswith(".safetensors")]) > 1
    summary = run("merge", base, *paths, "--out", root / "loud").output
    assert summary.startswith("merged 2 delta(s) into 15 of 21 tensors")


def test_the_card_yaml_reproduces_the_merge(setup):
    root, base, _, paths = setup
    run(
        "merge",
        base,
        *paths,
        "-w",
        "0.5",
        "-w",
        "2",
        "--method",
        "dare",
        "--seed",
        "7",
        "--out",
        root / "a",
        "-q",
    )
    card = (root / "a" / "README.md").read_text()
    yaml_text = card.split("```yaml\n")[1].split("```")[0]
    (root / "merge.yaml").write_text(yaml_text)
    run("merge", "--config", root / "merge.yaml", "--out", root / "b", "-q")
    assert without_card(root / "a") == without_card(root / "b")
    # the merge.yaml the card promises is in the folder, is the card's text, and reproduces the merge itself
    assert (root / "a" / "merge.yaml").read_text() == yaml_text
    run("merge", "--config", root / "a" / "merge.yaml", "--out", root / "c", "-q")
    assert without_card(root / "c") == without_card(root / "a")


def test_dry_run_prints_the_plan_and_writes_nothing(setup):
    root, base, _, paths = setup
    before = sorted(p.name for p in root.iterdir())
    out = run("merge", base, *paths, "--dry-run", "--out", root / "out").output
    assert sorted(p.name for p in root.iterdir()) == before
    assert "touched tensors: 15 of 21" in out
    assert "model.layers.0.mlp.down_proj.weight [32, 64]" in out
    assert "sign conflicts" in out and "total (" in out  # the overlap table
    assert "output:" in out and "in 1 file(s)" in out
    assert out.rstrip().endswith("dry run: nothing written")


@pytest.mark.parametrize(
    ("case", "code", "first_line"),
    [
        ("bad_delta", 3, "error: no delta at"),
        ("wrong_base", 6, "error: the deltas were made on a different base (30 parameters differ)"),
        ("missing", 6, "error: the deltas do not fit this base model (parameter names or shapes differ):"),
        ("existing_out", 4, "error: {out} already exists and is not empty; pass --overwrite to replace it"),
        ("bad_option", 2, "error: combination method 'sum' takes no options; got 'density'"),
    ],
)
def test_errors_are_one_clear_line_with_their_exit_code_and_nothing_written(setup, case, code, first_line):
    root, base, _, paths = setup
    out = root / "out"
    args = [base, *paths]
    if case == "bad_delta":
        args = [base, paths[0], root / "no-such-delta"]
    elif case == "wrong_base":
        other, _ = make_base(root, seed=3)
        args = [other, *paths]
    elif case == "missing":
        small = tiny_llama(torch.bfloat16)
        small.model.layers = small.model.layers[:1]
        small.config.num_hidden_layers = 1
        small.save_pretrained(root / "one-layer")
        args = [root / "one-layer", *paths]
    elif case == "existing_out":
        out.mkdir()
        (out / "x").write_text("keep")
    elif case == "bad_option":
        args = [*args, "--density", "0.5"]
    before = sorted(p.name for p in root.iterdir())
    result = CliRunner().invoke(main, ["merge", *map(str, args), "--out", str(out)])
    assert result.exit_code == code
    lines = result.output.splitlines()
    assert lines[0].startswith(first_line.format(out=out)), lines[0]
    assert "Traceback" not in result.output
    assert sorted(p.name for p in root.iterdir()) == before
    if case == "missing":
        assert "parameters not in the base, e.g. ['model.layers.1." in result.output


def test_inspect_json_figures_match_the_deltas(setup):
    _, _, _, paths = setup
    data = json.loads(run("inspect", *paths, "--json").output)
    deltas = [deltahub.load_delta(p) for p in paths]
    for summary, delta in zip(data["deltas"], deltas, strict=True):
        assert summary["nnz"] == delta.nnz and summary["numel"] == delta.numel
        assert summary["density"] == pytest.approx(delta.density)
        assert summary["base_model"] == "tiny"
        assert set(summary["params"]) == set(delta)
        for name, p in delta.items():
            got, v = summary["params"][name], p.values.float()
            assert (got["nnz"], got["numel"], got["shape"]) == (p.nnz, p.numel, list(p.shape))
            assert got["density"] == pytest.approx(p.density)
            assert got["min"] == pytest.approx(float(v.min()))
            assert got["max"] == pytest.approx(float(v.max()))
            assert got["mean"] == pytest.approx(float(v.mean()), abs=1e-7)
            assert got["mean_abs"] == pytest.approx(float(v.abs().mean()))
    assert data["overlap"] == deltahub.overlap_report(deltas).to_dict()
    text = run("inspect", *paths).output
    assert "model.layers.1.self_attn.q_proj.weight" in text and "sign conflicts" in text
    one = json.loads(run("inspect", paths[0], "--json").output)
    assert one["overlap"] is None


def test_inspect_plot_writes_a_png(setup):
    pytest.importorskip("matplotlib")
    root, _, _, paths = setup
    run("inspect", *paths, "--plot", root / "density.png")
    assert (root / "density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_plot_without_matplotlib_is_a_clear_error(setup, monkeypatch):
    root, _, _, paths = setup
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = CliRunner().invoke(main, ["inspect", str(paths[0]), "--plot", str(root / "x.png")])
    assert result.exit_code == 10
    assert "error: plotting needs matplotlib: pip install 'deltahub[plot]'" in result.output
    assert not (root / "x.png").exists()


def test_extract_then_merge_reproduces_the_fine_tunes_top_k_entries_exactly(tmp_path):
    base, _ = make_base(tmp_path)
    finetuned = tiny_llama(torch.bfloat16)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in finetuned.parameters():
            p.add_((torch.randn(p.shape, generator=gen) * 0.01).to(p.dtype))
    finetuned.save_pretrained(tmp_path / "ft")
    run("extract", base, tmp_path / "ft", "--density", "0.05", "--out", tmp_path / "delta", "--quiet")
    run("merge", base, tmp_path / "delta", "--out", tmp_path / "merged", "--quiet")
    delta = deltahub.load_delta(tmp_path / "delta")
    before, after, ft = tensors_of(base), tensors_of(tmp_path / "merged"), tensors_of(tmp_path / "ft")
    assert delta.nnz > 0
    for name, w in before.items():
        if name not in delta:
            assert raw(after[name]) == raw(w), name
            continue
        idx = delta[name].indices.long()
        assert idx.numel() == round(0.05 * w.numel())
        flat_after, flat_ft, flat_base = after[name].reshape(-1), ft[name].reshape(-1), w.reshape(-1)
        assert raw(flat_after[idx]) == raw(flat_ft[idx]), name  # the kept entries are the fine-tune's exactly
        mask = torch.ones(w.numel(), dtype=torch.bool)
        mask[idx] = False
        assert raw(flat_after[mask]) == raw(flat_base[mask]), name  # the rest is the base's
        # and they are the top-k: no dropped entry moved more than the smallest kept one
        moved = (flat_ft.float() - flat_base.float()).abs()
        assert moved[mask].max() <= moved[idx].min()


def test_every_verb_has_examples_in_its_help():
    for verb in ("merge", "inspect", "extract"):
        out = run(verb, "--help").output
        assert "Examples:" in out and f"deltahub {verb} " in out
    # option help comes from the method registry
    assert "ties: fraction of each delta's entries kept" in " ".join(run("merge", "--help").output.split())


def test_the_plot_keeps_one_colour_scale_from_zero_whole_layer_ticks_and_lists_what_it_leaves_out(tmp_path):
    from deltahub.report import plot_summary

    def summary(source, densities):
        params = {name: {"density": d} for name, d in densities.items()}
        return {"source": source, "params": params}

    layers = {f"model.layers.{i}.mlp.down_proj.weight": 0.05420 + 0.00001 * (i % 9) for i in range(40)}
    first = summary("a", {**layers, "model.embed_tokens.weight": 0.5, "lm_head.weight": 0.01})
    second = summary("b", {n: d / 2 for n, d in layers.items()})
    result = plot_summary([first, second], None, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    # one scale for every density panel, from zero: 0.05420-0.05428 is one colour band, not the map's two ends
    assert result.scales == {"density": (0.0, pytest.approx(0.05428))}
    assert result.layer_ticks == list(range(0, 40, 3)) and all(isinstance(t, int) for t in result.layer_ticks)
    assert result.left_out == ["lm_head.weight", "model.embed_tokens.weight"]
