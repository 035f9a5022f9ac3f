"""The CLI cases of the hardening issue, each run as a real subprocess: one `error:` line, its documented exit code
(``deltahub --help``), no traceback, and nothing left behind. (Pulls from a hostile Hub: test_hub_hostile.py.)"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from test_merge import make_base, make_deltas

pytestmark = pytest.mark.slow

# A read-only filesystem cannot be mounted without privileges, so the merge's first write into the output's
# folder fails with the errno a read-only mount gives (EROFS), from the real os call site.
_READ_ONLY = """
import errno, os, sys
real_mkdir, read_only = os.mkdir, os.path.abspath(sys.argv[1])
def mkdir(path, *args, **kwargs):
    if os.path.dirname(os.path.abspath(path)) == read_only:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
    return real_mkdir(path, *args, **kwargs)
os.mkdir = mkdir
from deltahub.cli import main
sys.argv = ["deltahub", *sys.argv[2:]]
main()
"""


def deltahub(
    *args, cwd: Path, preexec=None, wrapper: str | None = None, wrapper_args=()
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("DELTAHUB_DEBUG", None)
    command = (
        [sys.executable, "-c", wrapper, *wrapper_args] if wrapper else [sys.executable, "-m", "deltahub.cli"]
    )
    return subprocess.run(
        [*command, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        preexec_fn=preexec,
        timeout=300,
    )


def one_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == code, proc.stderr
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    base, model = make_base(root)
    return root, base, make_deltas(root, model, seeds=(1,))[0]


def test_merge_onto_a_read_only_filesystem(model, tmp_path):
    _, base, delta = model
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    proc = deltahub(
        "merge",
        base,
        delta,
        "--out",
        readonly / "merged",
        cwd=tmp_path,
        wrapper=_READ_ONLY,
        wrapper_args=[readonly],
    )
    one_error(
        proc, 9, f"cannot write the merged model to {readonly / 'merged'}", "read-only file system", "--out"
    )
    assert list(readonly.iterdir()) == []


def test_merge_under_a_file_size_limit(model, tmp_path):
    """A real EFBIG: the shards exceed RLIMIT_FSIZE (Python ignores SIGXFSZ, so the write fails instead)."""
    _, base, delta = model

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    proc = deltahub(
        "merge", base, delta, "--out", tmp_path / "merged", "--quiet", cwd=tmp_path, preexec=limit
    )
    one_error(
        proc, 9, "a file would exceed the file-size limit", "--max-shard-size", "nothing was left behind"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the temporary folder is removed too


def test_demo_with_a_nan_density(tmp_path):
    proc = deltahub("demo", "--fast", "--density", "nan", "--out", tmp_path / "demo", cwd=tmp_path)
    one_error(proc, 2, "Invalid value for '--density': 'nan' is not a finite number")
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("base", ["./no-such-base", "no-org/no-such-model"])
def test_train_on_a_missing_base(tmp_path, base):
    (tmp_path / "data.txt").write_text("some text to train on\n" * 20)
    proc = deltahub("train", base, "data.txt", "--out", "delta", "--steps", "1", cwd=tmp_path)
    one_error(proc, 3, f"no model folder at {base!r}")
    assert not (tmp_path / "delta").exists()


@pytest.mark.parametrize("missing", ["everything", "tokenizer"])
def test_train_on_a_folder_that_is_not_a_saved_model(tmp_path, model, missing):
    (tmp_path / "data.txt").write_text("some text to train on\n" * 20)
    folder = tmp_path / "base"
    folder.mkdir()
    if missing == "tokenizer":  # the model alone, as model.save_pretrained leaves it
        (folder / "config.json").write_bytes((model[1] / "config.json").read_bytes())
        expected = "no tokenizer in './base': the folder has none of tokenizer.json"
    else:
        expected = "no model in './base': the folder has no config.json"
    proc = deltahub("train", "./base", "data.txt", "--out", "delta", "--steps", "1", cwd=tmp_path)
    one_error(proc, 3, expected)
    assert not (tmp_path / "delta").exists()


def test_the_exit_codes_are_documented():
    proc = subprocess.run(
        [sys.executable, "-m", "deltahub.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert (
        "9  the output cannot be written: out of disk space, a read-only filesystem, a file-size limit"
        in proc.stdout
    )
    assert "8  Hub unreachable or failing" in proc.stdout and "7  Hub authentication" in proc.stdout
