"""The shared plumbing, once: Hub id rules, atomic outputs, the cache root, MergeConfig, the CLI's error layer."""

from __future__ import annotations

import os
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from huggingface_hub.utils import HFValidationError, validate_repo_id

from deltahub import DeltaExistsError
from deltahub._atomic import atomic_folder, check_output
from deltahub.cache import cache_dir
from deltahub.cli import main
from deltahub.cli._errors import EXIT_CODES, exit_code, to_flags
from deltahub.errors import (
    DeltahubError,
    InvalidArgumentError,
    InvalidRepoIdError,
    MergeConfigError,
    PathNotFoundError,
)
from deltahub.hub_ids import is_repo_id, parse_ref
from deltahub.merging.config import DeltaEntry, MergeConfig

IDS = [
    "org/name", "a/b", "Org-1/name.v2_x", "_x/y", "org/_name", "name", "gpt2", "org/-name", "org/name-",
    "org/.name", "org/name.", "org/na--me", "org/na..me", "org/name.git", "a/b/c", "org/", "/name", "",
    "org/caf\u00e9", "o" * 96 + "/n", "o" * 97 + "/n", "org/n" + "x" * 95, "org/n a", "org/name@v1",
]  # fmt: skip


def _hub_accepts(repo_id: str) -> bool:
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


@pytest.mark.parametrize("repo_id", IDS)
def test_repo_id_rules_are_the_hubs(repo_id):
    assert is_repo_id(repo_id, namespaced=False) == _hub_accepts(repo_id), repo_id
    # deltas are always namespaced; otherwise the same rules
    assert is_repo_id(repo_id) == (_hub_accepts(repo_id) and "/" in repo_id), repo_id


def test_refs_split_at_the_first_at_and_bad_ones_name_the_expected_form():
    assert parse_ref("acme/math@refs/pr/1") == ("acme/math", "refs/pr/1")
    assert parse_ref("acme/math") == ("acme/math", None)
    for bad in ("acme/math@", "acme/math@ ", "gpt2", "acme/ma--th@v1", 3):
        with pytest.raises(InvalidRepoIdError, match="expected a Hub repo id like 'org/name'"):
            parse_ref(bad)
    assert issubclass(InvalidRepoIdError, ValueError)


def test_the_cache_root_is_isolated_by_the_test_suite(tmp_path, monkeypatch):
    assert Path.home() not in cache_dir().parents  # conftest points DELTAHUB_CACHE at a temp folder
    monkeypatch.setenv("DELTAHUB_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("DELTAHUB_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "deltahub"


def test_atomic_folder_installs_only_a_complete_folder(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_folder(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither the target nor the hidden sibling
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(DeltaExistsError, match="already exists and is not empty; pass overwrite=True"):
        check_output(target, overwrite=False, keyword="out")
    with atomic_folder(target, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(InvalidArgumentError, match=r"`out` needs a folder path with a name; got '\.'"):
        check_output(".", overwrite=True, keyword="out")


def test_merge_config_round_trips_through_yaml(tmp_path):
    config = MergeConfig(
        base="org/base@0123abc",
        deltas=(DeltaEntry("org/yes", 1.0, "v1"), DeltaEntry("./1e3", -0.5)),
        method="dare",
        options={"density": 0.3, "seed": 7},
        dtype="bfloat16",
        max_shard_size="2GiB",
        out="./merged",
    )
    path = tmp_path / "merge.yaml"
    path.write_text(config.to_yaml())
    assert MergeConfig.from_yaml(path) == config
    kwargs = config.merge_kwargs()
    assert kwargs["deltas"] == ["org/yes@v1", "./1e3"] and kwargs["weights"] == [1.0, -0.5]
    assert kwargs["method_options"] == {"density": 0.3, "seed": 7}


def test_merge_config_lists_every_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base: 3\ndeltas:\n  - {path: ./a, weight: .nan, extra: 1}\n  - 7\nmethod: ties\ncolour: red\n")
    with pytest.raises(MergeConfigError) as info:
        MergeConfig.from_yaml(path)
    text = str(info.value)
    for problem in ("unknown keys ['colour']", "'base' must be", "deltas[0] has unknown keys ['extra']",
                    "deltas[0].weight must be a finite number", "deltas[1] must be a path string"):  # fmt: skip
        assert problem in text
    with pytest.raises(PathNotFoundError, match="no merge config at"):
        MergeConfig.from_yaml(tmp_path / "missing.yaml")


def test_keyword_arguments_become_the_verbs_flags():
    @click.command()
    @click.argument("base")
    @click.option("--out")
    @click.option("--overwrite", is_flag=True)
    @click.option("--on-mismatch")
    def verb(base, out, overwrite, on_mismatch): ...

    message = "x exists; pass overwrite=True; retry with on_mismatch='skip'; `out` and `base` must differ; token=1"
    assert to_flags(message, verb) == (
        "x exists; pass --overwrite; retry with --on-mismatch skip; --out and BASE must differ; token=1"
    )


def test_every_error_kind_has_one_code_and_deltahub_errors_are_builtins_too():
    import deltahub.errors as errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, DeltahubError)]
    assert len(classes) >= 20
    for cls in classes:
        if cls is not DeltahubError:
            assert cls.__mro__[1:] != (DeltahubError, Exception, BaseException), cls  # also a builtin
    assert exit_code(PathNotFoundError("x")) == exit_code(FileNotFoundError("x")) == 3
    assert len({e.code for e in EXIT_CODES}) == len(EXIT_CODES)


def test_one_error_line_and_a_traceback_only_with_deltahub_debug(tmp_path, monkeypatch):
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(tmp_path / "nothing-here")])
    assert result.exit_code == 3
    assert result.stderr.startswith("error: no delta at") and len(result.stderr.splitlines()) == 1
    result = runner.invoke(main, ["merge", "--bogus"], prog_name="deltahub")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: No such option '--bogus'")
    assert result.stderr.endswith("(see `deltahub merge --help`)\n")
    monkeypatch.setenv("DELTAHUB_DEBUG", "1")
    result = runner.invoke(main, ["inspect", str(tmp_path / "nothing-here")])
    assert result.exit_code == 3 and "Traceback (most recent call last)" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: no delta at")
    assert os.environ["DELTAHUB_DEBUG"] == "1"


def test_docs_list_exactly_the_exit_codes_the_cli_uses():
    text = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    for entry in EXIT_CODES:
        assert f"| {entry.code} | {entry.kind} |" in text, entry


def test_no_core_module_imports_the_demo_or_training():
    import ast

    root = Path(__file__).resolve().parent.parent / "deltahub"
    offenders = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("demo/") or rel == "cli/demo.py":  # the demo itself, and its CLI verb (lazily)
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                package = rel.split("/")[:-1]
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join(["deltahub", *base, node.module or ""] if node.level else [node.module or ""])
                names = [module] + [f"{module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n.startswith(("deltahub.demo", "training")) for n in names):
                offenders.append(f"{rel}: {names[0]}")
    assert offenders == []
