"""A merge killed at any instant leaves a temporary folder the next merge into the same place removes, including
a kill between removing its in-progress marker and the final rename (the folder's name says whose it is)."""

from __future__ import annotations

import os
import subprocess
import sys

from deltahub.merging.base import MARKER
from deltahub.merging.write import make_tmp, remove_stale

_DIE_AFTER_UNMARKING = """
import os, sys
from pathlib import Path
from deltahub.merging.base import MARKER
from deltahub.merging.write import make_tmp
tmp = make_tmp(Path(sys.argv[1]))
(tmp / "model.safetensors").write_bytes(b"complete, but not renamed yet")
(tmp / MARKER).unlink()  # what merge() does right before install_folder
print(tmp, flush=True)
os._exit(9)  # killed here
"""


def test_an_unmarked_temporary_folder_of_a_dead_merge_is_removed(tmp_path):
    out = tmp_path / "merged"
    proc = subprocess.run(
        [sys.executable, "-c", _DIE_AFTER_UNMARKING, str(out)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 9, proc.stderr
    left = tmp_path / os.path.basename(proc.stdout.strip())
    assert left.is_dir() and not (left / MARKER).exists()
    mine = make_tmp(out)  # a merge still running (this process), marker removed too: left alone
    (mine / MARKER).unlink()
    other_host = tmp_path / ".merged.merge-1-000000-abcdef12"  # another host's name: never ours to remove
    other_host.mkdir()
    unknown = tmp_path / ".merged.merge-oops"  # not a name we write: left alone
    unknown.mkdir()
    remove_stale(out)
    assert not left.exists()
    assert mine.exists() and other_host.exists() and unknown.exists()


def test_a_marker_that_is_not_ours_is_left_alone(tmp_path):
    out = tmp_path / "merged"
    for name, text in [("a", "not json"), ("b", '{"pid": "12", "host": 3}'), ("c", "[1]")]:
        folder = tmp_path / f".merged.merge-x{name}"
        folder.mkdir()
        (folder / MARKER).write_text(text)
    remove_stale(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".merged.merge-xa",
        ".merged.merge-xb",
        ".merged.merge-xc",
    ]
