"""Base identity by content: deltas of one base combine whatever their base_model strings say; a different base
is refused naming the parameters, and force works everywhere. Plus the boundary checks of the one call shape,
HF-cache paths mapped back to repo ids, and local paths scrubbed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import random_delta, tiny_llama, tokens

import deltahub
from deltahub import BaseMismatchError, MethodOptionError, save_delta
from deltahub.errors import InvalidRepoIdError
from deltahub.identity import (
    hf_cache_ref,
    looks_like_local_path,
    model_identity,
    parse_model_id,
    scrub_local_paths,
)

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    tiny_llama().save_pretrained(root / "base")
    tiny_llama(seed=1).save_pretrained(root / "other")
    return root


def two_names_one_base(root: Path) -> list[Path]:
    """Two deltas made on the same weights, one recording a local folder, one a Hub id."""
    model = tiny_llama()
    a = random_delta(model, seed=1, base_model="./models/base")
    b = random_delta(model, seed=2, base_model="alice/tiny-base").replace(base_revision=SHA)
    snapshot = f"/home/u/.cache/huggingface/hub/models--alice--tiny-base/snapshots/{SHA}"
    c = random_delta(model, seed=3, base_model=snapshot)
    return [save_delta(d, root / name, overwrite=True) for d, name in ((a, "d1"), (b, "d2"), (c, "d3"))]


def test_deltas_recording_different_names_for_one_base_merge(bases, tmp_path):
    paths = two_names_one_base(tmp_path)
    result = deltahub.merge(str(bases / "base"), paths, out=tmp_path / "merged", progress=False)
    composed = deltahub.load_model(str(bases / "base"), paths)
    merged = deltahub.load_model(str(tmp_path / "merged"))
    x = tokens()
    with torch.no_grad():
        assert torch.equal(composed(x).logits, merged(x).logits)
    # `d1 + d2` too, and the name kept is the Hub id with its revision
    total = deltahub.load_delta(paths[0]) + deltahub.load_delta(paths[1])
    assert (total.base_model, total.base_revision) == ("alice/tiny-base", SHA)
    assert result.plan.deltas[0].params > 0


def test_a_different_base_is_refused_naming_parameters_and_force_merges(bases, tmp_path):
    d1 = random_delta(tiny_llama(), seed=1, base_model="alice/tiny-base")
    d2 = random_delta(tiny_llama(seed=1), seed=2, base_model="alice/tiny-base")  # same name, other weights
    paths = [save_delta(d1, tmp_path / "d1"), save_delta(d2, tmp_path / "d2")]
    with pytest.raises(BaseMismatchError, match=r"different base weights \(\d+ parameters differ\)") as err:
        deltahub.merge(str(bases / "base"), paths, out=tmp_path / "out", progress=False)
    assert "model.layers.0.self_attn.q_proj.weight: delta 1 was made on base values" in str(err.value)
    for call in (
        lambda **kw: deltahub.combine(paths, **kw),
        lambda **kw: deltahub.overlap_report(paths, **kw),
        lambda **kw: deltahub.apply_deltas(tiny_llama(), paths, **kw),
        lambda **kw: deltahub.load_model(str(bases / "base"), paths, **kw),
    ):
        with pytest.raises(BaseMismatchError):
            call()
        call(force=True)
    assert deltahub.merge(
        str(bases / "base"), paths, out=tmp_path / "out", force=True, progress=False
    ).out.is_dir()
    # against the base itself: the deltas' own base is fine, another one is refused, force applies anyway
    with pytest.raises(BaseMismatchError, match="made on a different base"):
        deltahub.merge(str(bases / "other"), paths[:1], out=tmp_path / "x", progress=False)


def test_the_call_shape_is_validated_once_at_the_boundary(tmp_path):
    model = tiny_llama()
    d = random_delta(model)
    with pytest.raises(TypeError, match=r"force must be True or False; got 3\.0.*method_options"):
        deltahub.apply_deltas(model, [d], method="ties", force=3.0)
    with pytest.raises(MethodOptionError, match="combination method 'ties' has no option 'force'"):
        deltahub.apply_deltas(model, [d], method="ties", method_options={"force": 3.0})
    with pytest.raises(TypeError, match="takes 2 positional arguments"):
        deltahub.apply_deltas(model, [d], [1.0])  # type: ignore[misc]  # keyword-only after deltas
    with pytest.raises(TypeError, match="method_options must be a mapping"):
        deltahub.combine([d], method_options=[("density", 0.5)])  # type: ignore[arg-type]
    before = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].clone()
    with pytest.raises(ValueError, match="got 2 weights for 1 deltas"):
        deltahub.apply_deltas(model, [d], weights=[1.0, 2.0])
    assert torch.equal(model.state_dict()["model.layers.0.self_attn.q_proj.weight"], before)  # nothing done


def test_load_model_without_a_base_needs_one_recorded(bases, tmp_path):
    delta = random_delta(tiny_llama(), seed=4, base_model=str(bases / "base"))
    explicit = deltahub.load_model(str(bases / "base"), [delta])
    recorded = deltahub.load_model(deltas=[delta])  # the local base the delta records
    for name, t in explicit.state_dict().items():
        assert torch.equal(recorded.state_dict()[name], t), name
    with pytest.raises(ValueError, match="none of the deltas records its base model; pass base="):
        deltahub.load_model(deltas=[delta.replace(base_model=None)])
    with pytest.raises(FileNotFoundError, match="a local path that does not exist here; pass base="):
        deltahub.load_model(deltas=[delta.replace(base_model=str(tmp_path / "gone"))])


def test_hf_cache_snapshot_paths_map_back_to_repo_id_and_commit(tmp_path):
    snapshot = tmp_path / "hub" / "models--acme--tiny.v2" / "snapshots" / SHA
    assert hf_cache_ref(snapshot) == ("acme/tiny.v2", SHA)
    assert hf_cache_ref(snapshot / "config.json") == ("acme/tiny.v2", SHA)
    assert hf_cache_ref(tmp_path / "models--acme--tiny" / "snapshots" / "main") is None  # not a commit
    assert hf_cache_ref(tmp_path / "base") is None
    assert model_identity(snapshot) == ("acme/tiny.v2", SHA)
    assert model_identity("./models/base") == ("./models/base", None)
    assert parse_model_id("acme/tiny@v1") == ("acme/tiny", "v1") and parse_model_id("gpt2") == ("gpt2", None)
    for bad in ("./models/base", "/abs/base", "acme/tiny@", "a/b/c"):
        with pytest.raises(InvalidRepoIdError, match="invalid base model id"):
            parse_model_id(bad)
    # A delta trained or extracted from a snapshot folder records the id and commit, not the cache path.
    snapshot.mkdir(parents=True)
    tiny_llama().save_pretrained(snapshot)
    tiny_llama(seed=2).save_pretrained(tmp_path / "ft")
    delta = deltahub.extract_delta(snapshot, tmp_path / "ft", density=0.01, progress=False)
    assert (delta.base_model, delta.base_revision) == ("acme/tiny.v2", SHA)
    assert delta.provenance["finetuned"] == str(tmp_path / "ft")


def test_local_paths_are_recognised_and_scrubbed(tmp_path):
    for local in ("/data/base", "./base", "../x", "~/m", str(tmp_path), "C:\\models\\base"):
        assert looks_like_local_path(local), local
    for not_local in ("alice/tiny-base", "gpt2", "https://huggingface.co/a/b", "rigl", ""):
        assert not looks_like_local_path(not_local), not_local
    snapshot = f"/c/models--a--b/snapshots/{SHA}"
    value, dropped = scrub_local_paths(
        {"finetuned": snapshot, "data": ["./train.txt", "ok"], "nested": {"p": "/tmp/x"}, "n": 3}
    )
    assert value == {"finetuned": f"a/b@{SHA}", "data": [None, "ok"], "nested": {"p": None}, "n": 3}
    assert dropped == ["./train.txt", "/tmp/x"]
