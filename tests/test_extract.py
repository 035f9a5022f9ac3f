"""extract_delta on real tiny transformers models, checked against independent dense top-k computations."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from tiny import tiny_gpt2, tiny_llama

from deltahub import ExtractionError, SparseDelta
from deltahub.extract import extract_delta, natural_key
from deltahub.fingerprint import fingerprint_of

MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def finetune(model: torch.nn.Module, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A "full fine-tune": about half of every weight's entries scaled by a factor in [0.75, 1.25].

    Scaling keeps ``ft`` within a factor of two of ``base``, so ``ft - base`` is exact in float32 (Sterbenz) and
    ``base + (ft - base) == ft`` bit for bit; the untouched half (and zero-initialised biases) give exact zeros.
    """
    ft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():  # tied weights are yielded once
            scale = 1 + 0.5 * (torch.rand(p.shape, generator=gen) - 0.5)
            scale[torch.rand(p.shape, generator=gen) < 0.5] = 1
            p.copy_((p.float() * scale).to(dtype))
    return ft


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tmp_path_factory):
    """(name, base module, fine-tuned module, base folder, fine-tune folder, sharded fine-tune folder)."""
    base = MAKERS[request.param]()
    ft = finetune(base)
    root = tmp_path_factory.mktemp(request.param)
    base.save_pretrained(root / "base")
    ft.save_pretrained(root / "ft")
    ft.save_pretrained(root / "ft-sharded", max_shard_size="20KB")
    assert len(list((root / "ft-sharded").glob("*.safetensors"))) > 1
    return request.param, base, ft, root / "base", root / "ft", root / "ft-sharded"


def dense_diffs(base: torch.nn.Module, ft: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Independent reference: every distinct parameter's float32 difference, in natural name order."""
    fts = dict(ft.named_parameters())
    return {
        n: (fts[n].detach().float() - p.detach().float()).reshape(-1)
        for n, p in sorted(base.named_parameters(), key=lambda kv: natural_key(kv[0]))
    }


def same_params(a: SparseDelta, b: SparseDelta) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].equal(b[name]), name
    assert a.fingerprint == b.fingerprint


def quiet(*args, **kwargs) -> SparseDelta:
    return extract_delta(*args, progress=False, **kwargs)


@pytest.mark.parametrize("scope", ["parameter", "global"])
def test_modules_state_dicts_and_folders_give_identical_deltas(pair, scope):
    _, base, ft, base_dir, ft_dir, ft_sharded = pair
    ref = quiet(base, ft, density=0.1, scope=scope)
    assert ref.nnz > 0
    for b, f in [
        (base.state_dict(), ft.state_dict()),
        (base_dir, ft_dir),
        (str(base_dir), ft_sharded),
        (base, ft_sharded),
    ]:
        same_params(quiet(b, f, density=0.1, scope=scope), ref)


@pytest.mark.parametrize("density", [0.01, 0.1, 0.5, 1.0])
def test_parameter_scope_keeps_each_parameters_top_k(pair, density):
    _, base, ft, *_ = pair
    delta = quiet(base, ft, density=density)
    for name, diff in dense_diffs(base, ft).items():
        k = min(round(density * diff.numel()), int(diff.count_nonzero()))
        if k == 0:
            assert name not in delta
            continue
        p = delta[name]
        idx = p.indices.long()
        assert p.nnz == k, name
        expected = torch.topk(diff.abs(), k).values
        torch.testing.assert_close(diff[idx].abs().sort().values, expected.sort().values, rtol=0, atol=0)
        rest = torch.ones_like(diff, dtype=torch.bool)
        rest[idx] = False
        if rest.any():
            assert diff[idx].abs().min() >= diff[rest].abs().max()
        assert bool((diff[idx] != 0).all())


@pytest.mark.parametrize("density", [0.003, 0.05, 0.3])
def test_global_scope_is_the_dense_top_k_over_all_parameters(pair, density):
    _, base, ft, *_ = pair
    diffs = dense_diffs(base, ft)
    flat = torch.cat(list(diffs.values())).abs()
    k = round(density * flat.numel())
    delta = quiet(base, ft, density=density, scope="global")
    assert delta.nnz == k
    kept = torch.cat([diffs[n][delta[n].indices.long()].abs() for n in delta])
    torch.testing.assert_close(kept.sort().values, torch.topk(flat, k).values.sort().values, rtol=0, atol=0)
    # the delta's parameters come out in the same (natural) order as the reference
    assert list(delta) == [n for n in diffs if n in delta]


@pytest.mark.parametrize("scope", ["parameter", "global"])
def test_applying_values_by_hand_reproduces_the_finetune_exactly(pair, scope):
    _, base, ft, *_ = pair
    delta = quiet(base, ft, density=0.2, scope=scope)
    base_sd, ft_sd = base.state_dict(), ft.state_dict()
    for name, p in delta.items():
        w = base_sd[name].detach().clone().view(-1)
        idx = p.indices.long()
        w[idx] += p.values
        want = ft_sd[name].view(-1)
        assert torch.equal(w[idx], want[idx]), name
        untouched = torch.ones_like(w, dtype=torch.bool)
        untouched[idx] = False
        assert torch.equal(w[untouched], base_sd[name].view(-1)[untouched]), name


def test_density_one_stores_every_nonzero_difference_and_no_zero(pair):
    _, base, ft, *_ = pair
    delta = quiet(base, ft, density=1.0)
    for name, diff in dense_diffs(base, ft).items():
        nonzero = torch.nonzero(diff).flatten()
        if nonzero.numel() == 0:
            assert name not in delta  # e.g. GPT-2's zero-initialised biases stay zero when scaled
        else:
            assert torch.equal(delta[name].indices.long(), nonzero), name
            assert torch.equal(delta[name].values, diff[nonzero]), name


def test_num_budget_parameter_scope_shares_by_size(pair):
    _, base, ft, *_ = pair
    num = 1000
    diffs = dense_diffs(base, ft)
    total = sum(d.numel() for d in diffs.values())
    delta = quiet(base, ft, num=num)
    for name, diff in diffs.items():
        want = min(num * diff.numel() // total, int(diff.count_nonzero()))
        assert (delta[name].nnz if name in delta else 0) == want, name
    assert delta.nnz <= num


def test_num_budget_global_scope_keeps_exactly_num(pair):
    _, base, ft, *_ = pair
    assert quiet(base, ft, num=777, scope="global").nnz == 777


def test_metadata_fingerprint_and_provenance(pair):
    _, base, _, base_dir, ft_dir, _ = pair
    delta = quiet(base_dir, ft_dir, density=0.05, values_dtype="bf16", scope="global")
    assert delta.base_model == str(base_dir)
    assert delta.fingerprint == fingerprint_of(base.state_dict(), list(delta))
    assert delta.provenance == {
        "method": "extract",
        "density": 0.05,
        "scope": "global",
        "finetuned": str(ft_dir),
        "skipped": [],
    }
    assert delta.values_dtype == torch.bfloat16
    as_fp32 = quiet(base_dir, ft_dir, density=0.05, scope="global")
    for name in delta:
        assert torch.equal(delta[name].values, as_fp32[name].values.to(torch.bfloat16))
        assert delta[name].dtype == torch.float32 and delta[name].shape == tuple(
            base.state_dict()[name].shape
        )


def test_tied_gpt2_embedding_appears_once(tmp_path):
    base = tiny_gpt2()
    ft = finetune(base)
    sd = ft.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    delta = quiet(base, ft, density=1.0)
    assert "transformer.wte.weight" in delta and "lm_head.weight" not in delta
    # a folder saved by transformers has only the first name too, so mixing sources lines up
    ft.save_pretrained(tmp_path)
    same_params(quiet(base, tmp_path, density=1.0), delta)


def test_bfloat16_models_round_trip_through_folders(tmp_path):
    base = tiny_llama(torch.bfloat16)
    ft = finetune(base, dtype=torch.bfloat16)
    base.save_pretrained(tmp_path / "b")
    ft.save_pretrained(tmp_path / "f")
    delta = quiet(tmp_path / "b", tmp_path / "f", density=0.3, scope="global")
    ft_sd = ft.state_dict()
    for name, w in base.state_dict().items():
        if name in delta:
            p = delta[name]
            assert p.dtype == torch.bfloat16
            flat = w.float().view(-1).clone()
            flat[p.indices.long()] += p.values
            idx = p.indices.long()
            assert torch.equal(flat.to(torch.bfloat16)[idx], ft_sd[name].view(-1)[idx]), name


def resized_llama():
    base = tiny_llama()
    ft = finetune(base)
    ft.resize_token_embeddings(72)
    return base, ft


def test_resized_embeddings_are_reported_with_shapes_and_the_fix():
    base, ft = resized_llama()
    with pytest.raises(ExtractionError) as info:
        quiet(base, ft, density=0.1)
    msg = str(info.value)
    assert msg.startswith("the base and the fine-tune do not line up on 2 tensor(s):\n")
    assert "  - model.embed_tokens.weight: shape [64, 32] in the base, [72, 32] in the fine-tune\n" in msg
    assert "  - lm_head.weight: shape [64, 32] in the base, [72, 32] in the fine-tune\n" in msg
    assert "on_mismatch='skip'" in msg and "include=" in msg
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight: shape \[64, 32\] in the base"):
        quiet(base, ft, density=0.1)


def test_skip_leaves_mismatches_out_and_records_them():
    base, ft = resized_llama()
    delta = quiet(base, ft, density=0.1, on_mismatch="skip")
    assert delta.provenance["skipped"] == ["lm_head.weight", "model.embed_tokens.weight"]
    assert "lm_head.weight" not in delta and "model.embed_tokens.weight" not in delta
    only_layers = quiet(base, ft, density=0.1, include=r"\.layers\.")
    assert set(only_layers) == {n for n in delta if ".layers." in n}
    same_params(only_layers, quiet(base, ft, density=0.1, include=lambda n: ".layers." in n))


def test_names_in_only_one_model_are_listed():
    base = {"a.weight": torch.ones(2, 3), "b.weight": torch.ones(4)}
    ft = {"a.weight": torch.full((2, 3), 2.0), "c.weight": torch.ones(5)}
    listed = r"(?s)2 tensor.*b\.weight: only in the base \(shape \[4\]\).*c\.weight: only in the fine-tune \(shape \[5\]\)"
    with pytest.raises(ExtractionError, match=listed):
        quiet(base, ft, num=3)
    delta = quiet(base, ft, num=3, on_mismatch="skip")
    assert list(delta) == ["a.weight"] and delta["a.weight"].nnz == 3
    assert delta.provenance["skipped"] == ["b.weight", "c.weight"]


def test_non_floating_tensors_equal_are_ignored_and_changed_are_reported():
    base = {"w": torch.zeros(4), "step": torch.tensor([3])}
    delta = quiet(base, {"w": torch.ones(4), "step": torch.tensor([3])}, density=1.0)
    assert list(delta) == ["w"] and delta.provenance["skipped"] == []
    with pytest.raises(ExtractionError, match=r"step: non-floating \(int64\) and changed"):
        quiet(base, {"w": torch.ones(4), "step": torch.tensor([4])}, density=1.0)


def test_global_ties_break_by_parameter_order_then_position():
    # "layers.2" sorts before "layers.10" (numbers compare as numbers), whatever order the dict has.
    base = {"layers.10.w": torch.zeros(3), "layers.2.w": torch.zeros(4)}
    ft = {"layers.10.w": torch.tensor([1.0, -1.0, 1.0]), "layers.2.w": torch.tensor([-1.0, 0.0, 2.0, 1.0])}
    delta = quiet(base, ft, num=4, scope="global")
    assert list(delta) == ["layers.2.w", "layers.10.w"]
    assert delta["layers.2.w"].indices.tolist() == [0, 2, 3]
    assert delta["layers.2.w"].values.tolist() == [-1.0, 2.0, 1.0]
    assert delta["layers.10.w"].indices.tolist() == [0]
    # per parameter: ties at the k-th magnitude go to the earliest positions
    per = quiet(base, ft, density=0.5)
    assert per["layers.2.w"].indices.tolist() == [0, 2]
    assert per["layers.10.w"].indices.tolist() == [0, 1]  # round(1.5) == 2


def test_fewer_nonzero_differences_than_the_budget_keeps_only_nonzero():
    base = {"w": torch.zeros(10)}
    ft = {"w": torch.tensor([0, 0, 3.0, 0, 0, 0, 0, 0, -1.0, 0])}
    for scope in ("parameter", "global"):
        d = quiet(base, ft, num=5, scope=scope)
        assert d["w"].indices.tolist() == [2, 8], scope
    assert len(quiet(base, base, density=1.0)) == 0


def test_non_finite_differences_are_refused():
    base = {"w": torch.zeros(3), "v": torch.zeros(2)}
    ft = {"w": torch.tensor([1.0, float("nan"), 0]), "v": torch.tensor([float("inf"), 1.0])}
    for scope in ("parameter", "global"):
        with pytest.raises(ExtractionError, match=r"2 parameter\(s\) have NaN or infinite differences"):
            quiet(base, ft, density=0.5, scope=scope)
    with pytest.raises(ExtractionError, match="overflows float16"):
        quiet({"w": torch.zeros(2)}, {"w": torch.tensor([1e6, 1.0])}, density=1.0, values_dtype=torch.float16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give exactly one of density"),
        ({"density": 0.1, "num": 5}, "give exactly one of density"),
        ({"density": 0.0}, r"density must be a fraction in \(0, 1\]"),
        ({"density": 1.5}, r"density must be a fraction in \(0, 1\]"),
        ({"num": 0}, "num must be a positive integer"),
        ({"num": 2.5}, "num must be a positive integer"),
        ({"num": 5, "scope": "layer"}, "scope must be 'parameter' or 'global'"),
        ({"num": 5, "on_mismatch": "ignore"}, "on_mismatch must be 'error' or 'skip'"),
        ({"num": 5, "values_dtype": torch.int8}, "values_dtype must be one of"),
        ({"num": 5, "include": "("}, "not a valid regular expression"),
        ({"num": 5, "include": "nothing-matches"}, "nothing to extract"),
    ],
)
def test_bad_options_are_refused_with_the_expected_form(kwargs, message):
    sd = {"w": torch.zeros(4)}
    with pytest.raises(ValueError, match=message):
        quiet(sd, {"w": torch.ones(4)}, **kwargs)


def test_progress_bar_can_be_on(capsys, monkeypatch):
    # tqdm hides its bar when stderr is not a terminal (capsys's is not): make it one, as a user's shell is.
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    sd = {"w": torch.zeros(4)}
    delta = extract_delta(sd, {"w": torch.ones(4)}, density=0.5, progress=True)
    assert delta.nnz == 2 and math.isclose(delta.density, 0.5)
    err = capsys.readouterr().err
    assert "extract" in err and "1/1" in err and "tensor" in err
    extract_delta(sd, {"w": torch.ones(4)}, density=0.5, progress=False)
    assert capsys.readouterr().err == ""
