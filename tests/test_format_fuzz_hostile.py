"""Hostile deltas in a sandbox: huge integers, many dimensions, size claims far beyond the file, and files that are
not regular files. Every case must load as a valid delta, or raise one DeltaFormatError whose every problem names
the file or parameter, within CPU_LIMIT_S CPU seconds and MEMORY_LIMIT bytes of added resident memory. Each case
runs in a fork of a warm worker (tests/fuzz_sandbox.py) under those caps, so a hang or a multi-GB allocation is a
failed case, not a stuck CI job.

The families mutate deltas written by today's writer, whatever storages it uses (1.0's sparse and dense; any
storage a later format version adds shows up in the files and is fuzzed the same way): the JSON of
``delta_config.json``, of the index, and of every safetensors header.

Bounded for CI (``EXAMPLES`` per family). ``DELTAHUB_FUZZ_LONG=N`` runs N examples per family (and the largest
ranks), e.g. ``DELTAHUB_FUZZ_LONG=5000 .venv/bin/python -m pytest tests/test_format_fuzz_hostile.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from fuzz_sandbox import CPU_LIMIT_S, MEMORY_LIMIT, SELFTEST, Outcome, Sandbox
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from deltahub import ParamDelta, SparseDelta
from deltahub.format import save_delta
from deltahub.format.spec import SUFFIXES

pytestmark = pytest.mark.slow

LONG = int(os.environ.get("DELTAHUB_FUZZ_LONG") or 0)
EXAMPLES = LONG or 30
# Derandomized in CI (the same cases every run, the issue's own ones pinned with @example); random in long mode.
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not LONG,
    suppress_health_check=list(HealthCheck),
)
CONFIG, INDEX = "delta_config.json", "delta.safetensors.index.json"


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox()
    yield box
    box.close()


def _reference_delta() -> SparseDelta:
    """Parameters at several densities, so every storage the writer picks appears (1.0: sparse and dense)."""
    g = torch.Generator().manual_seed(0)

    def param(shape, nnz, dtype=torch.float32, values=torch.float32):
        numel = int(torch.tensor(shape).prod())
        idx = torch.randperm(numel, generator=g)[:nnz].sort().values
        return ParamDelta(idx, torch.randn(nnz, generator=g).to(values), shape, dtype)

    return SparseDelta(
        {
            "layer.sparse.weight": param((40, 50), 20),  # 1% dense
            "layer.half.weight": param((16, 16), 128, torch.bfloat16, torch.bfloat16),  # 50%
            "layer.full.bias": param((12,), 12),  # every position: dense storage
            "layer.empty.weight": param((3, 3), 0),
        },
        base_model="tiny/base",
        fingerprint={"layer.sparse.weight": (0.5,) * 8, "layer.full.bias": (1.0,) * 8},
    )


def _reference_files() -> dict[str, dict[str, bytes]]:
    with tempfile.TemporaryDirectory() as tmp:
        delta = _reference_delta()
        single = save_delta(delta, Path(tmp) / "single")
        sharded = save_delta(delta, Path(tmp) / "sharded", max_shard_size=1)
        return {
            layout: {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
            for layout, folder in (("single", single), ("sharded", sharded))
        }


REFERENCE = _reference_files()
TENSOR_FILES = {
    layout: sorted(n for n in files if n.endswith(".safetensors")) for layout, files in REFERENCE.items()
}


def split_file(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


# JSON with integers Python's json cannot even write (more than 4300 digits): a placeholder string is replaced by
# the raw digits after dumping.
def dumps_raw(obj) -> bytes:
    raws: dict[str, str] = {}

    def walk(v):
        if isinstance(v, RawNumber):
            key = f"__raw_{len(raws)}__"
            raws[key] = v.text
            return key
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    text = json.dumps(walk(obj))
    for key, digits in raws.items():
        text = text.replace(json.dumps(key), digits)
    return text.encode()


class RawNumber:
    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"RawNumber({self.text[:12]}...{len(self.text)} chars)"


def join_file(header: dict, data: bytes) -> bytes:
    text = dumps_raw(header)
    return struct.pack("<Q", len(text)) + text + data


def write_case(root: Path, files: dict[str, bytes]) -> Path:
    folder = root / "delta"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def names_in(folder: Path) -> set[str]:
    """What a problem may name: the folder's files (and those the index names), parameters and tensors."""
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else {folder.name}
    for delta_files in REFERENCE.values():
        names |= set(delta_files)
    for param in _reference_delta():
        names |= {repr(param)} | {repr(param + suffix) for suffix in SUFFIXES}  # every storage's tensors
    return names


def check(outcome: Outcome, folder: Path, secret: bytes | None = None, also: tuple[str, ...] = ()) -> None:
    assert outcome.kind in ("ok", "format_error"), outcome.describe()
    assert outcome.cpu_s <= CPU_LIMIT_S and outcome.rss_growth <= MEMORY_LIMIT, outcome.describe()
    if outcome.kind == "format_error":
        known = names_in(folder) | set(also)
        for problem in outcome.problems:
            assert "\n" not in problem and "Traceback" not in problem, problem
            assert problem.startswith("...") or any(n in problem for n in known), problem
        if secret is not None:  # a link out of the folder must not reveal what it points at
            for leak in (str(int.from_bytes(secret[:8], "little")), secret.decode("latin-1")[:8]):
                assert leak not in outcome.message, outcome.message


# ---- family 1: integers beyond every range ----------------------------------------------------------------------

BIG_INTS = st.sampled_from(
    [
        2**31,
        2**53 + 1,
        2**63,
        2**64,
        10**30,
        10**400,  # beyond float range: float() overflows
        -(10**400),
        10**4000,  # 4001 digits: json parses it, str() of it nearly hits the 4300-digit limit
        RawNumber("9" * 4300),  # the most digits json.loads accepts
        RawNumber("9" * 4301),  # one more: json.loads itself refuses it
        RawNumber("1e400"),  # a float that parses as infinity
        1e308,
        -1,
    ]
)
CONFIG_INT_SLOTS = [
    ("density",),
    ("nnz",),
    ("numel",),
    ("fingerprint", "samples_per_parameter"),
    ("parameters", "*", "nnz"),
    ("parameters", "*", "shape", 0),
    ("parameters", "*", "shape", -1),
    ("parameters", "*", "base_samples", 0),
    ("format_version",),
    ("deltahub_version",),
]


def set_slot(obj, slot, value, which: int) -> bool:
    """Set ``obj[slot...] = value`` ('*' picks the which-th key); False when the slot does not exist."""
    *path, last = slot
    for key in path:
        if key == "*":
            if not isinstance(obj, dict) or not obj:
                return False
            key = list(obj)[which % len(obj)]
        if (isinstance(obj, dict) and key in obj) or (
            isinstance(obj, list) and isinstance(key, int) and -len(obj) <= key < len(obj)
        ):
            obj = obj[key]
        else:
            return False
    if isinstance(obj, dict) or (isinstance(obj, list) and -len(obj) <= last < len(obj)):
        obj[last] = value
    else:
        return False
    return True


@FUZZ
@example("single", "config", ("density",), "shape", 0, 10**400, "number", False)  # OverflowError before
@example("single", "config", ("format_version",), "shape", 0, RawNumber("9" * 5000), "digit string", False)
@example("single", "config", ("parameters", "*", "base_samples", 0), "shape", 0, 10**400, "number", False)
@example("single", "config", ("parameters", "*", "shape", 0), "shape", 0, 10**3000, "number", False)
@example("single", "header", ("nnz",), "shape", 0, 10**4000, "number", True)  # [10**4000, ...] in a header
@example("sharded", "index", ("nnz",), "shape", 0, 10**400, "number", False)
@example("single", "config", ("fingerprint", "samples_per_parameter"), "shape", 0, -1, "number", False)
@given(
    st.sampled_from(["single", "sharded"]),
    st.sampled_from(["config", "index", "header"]),
    st.sampled_from(CONFIG_INT_SLOTS),
    st.sampled_from(["shape", "data_offsets"]),
    st.integers(0, 1000),
    BIG_INTS,
    st.sampled_from(["number", "digit string"]),
    st.booleans(),
)
def test_huge_integers(sandbox, layout, where, slot, header_key, which, value, as_string, lone):
    files = dict(REFERENCE[layout])
    if as_string == "digit string":  # the 4300-digit limit on int(str): format_version "999...9.0"
        text = value.text if isinstance(value, RawNumber) else str(value)
        value = text[:5000] + ".0"
    if where == "config":
        config = json.loads(files[CONFIG])
        set_slot(config, slot, value, which)
        files[CONFIG] = dumps_raw(config)
    elif where == "index" and INDEX in files:
        index = json.loads(files[INDEX])
        index["metadata"]["total_size"] = value
        files[INDEX] = dumps_raw(index)
    else:
        name = TENSOR_FILES[layout][which % len(TENSOR_FILES[layout])]
        header, data = split_file(files[name])
        tensors = sorted(k for k in header if k != "__metadata__")
        entry = header[tensors[which % len(tensors)]]
        if header_key == "shape":
            entry["shape"] = [*entry["shape"], value] if which % 2 else [value, *entry["shape"][1:]]
        else:
            entry["data_offsets"][which % 2] = value
        files[name] = join_file(header, data)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_case(Path(tmp), files)
        target = folder / TENSOR_FILES[layout][which % len(TENSOR_FILES[layout])] if lone else folder
        check(sandbox.load(target), folder)


# ---- family 2: many dimensions -----------------------------------------------------------------------------------

RANKS = [9, 64, 1000, 10_000, 100_000] + ([400_000] if LONG else [])


@FUZZ
@example("single", "header", 100_000, 2, 0)  # 47 s before (a 2 MB file)
@example("single", "config", 100_000, 10, 0)  # past 120 s before
@example("sharded", "both", 10_000, 10, 1)
@given(
    st.sampled_from(["single", "sharded"]),
    st.sampled_from(["config", "header", "both"]),
    st.sampled_from(RANKS),
    st.sampled_from([1, 2, 10, 0]),
    st.integers(0, 1000),
)
def test_many_dimensions(sandbox, layout, where, rank, dim, which):
    """Quadratic time before the fix: a product over 100,000 dimensions, then formatting the result."""
    files = dict(REFERENCE[layout])
    shape = [dim] * rank
    config = json.loads(files[CONFIG])
    param = list(config["parameters"])[which % len(config["parameters"])]
    if where in ("config", "both"):
        config["parameters"][param]["shape"] = shape
        files[CONFIG] = json.dumps(config).encode()
    if where in ("header", "both"):
        for name in TENSOR_FILES[layout]:
            header, data = split_file(files[name])
            for key in header:
                if key.startswith(param + "."):
                    header[key]["shape"] = shape
            files[name] = join_file(header, data)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_case(Path(tmp), files)
        check(sandbox.load(folder), folder)


# ---- family 3: sizes claimed far beyond the file ----------------------------------------------------------------


@FUZZ
@example("single", "config shape", 30, 2)  # the dense parameter: 8.6 s and 4.3 GB before
@example("single", "config shape", 31, 2)  # RuntimeError: can't allocate, before
@example("sharded", "header and config", 40, 0)
@example("single", "config nnz", 62, 0)
@given(
    st.sampled_from(["single", "sharded"]),
    st.sampled_from(["config shape", "config nnz", "header shape", "header and config"]),
    st.integers(20, 62),
    st.integers(0, 1000),
)
def test_size_claims_beyond_the_file(sandbox, layout, where, log2, which):
    """A config saying 2**30 elements over a file of 64 values must be refused before 2**30 of anything is
    allocated (it took 8.6 s and 4.3 GB)."""
    files = dict(REFERENCE[layout])
    numel = 2**log2
    config = json.loads(files[CONFIG])
    param = list(config["parameters"])[which % len(config["parameters"])]
    entry = config["parameters"][param]
    if where in ("config shape", "header and config"):
        entry["shape"] = [numel]
        if entry["storage"] == "dense":
            entry["nnz"] = numel
        config["numel"] = sum(
            int(torch.tensor(e["shape"], dtype=torch.float64).prod()) for e in config["parameters"].values()
        )
    if where == "config nnz":
        entry["nnz"] = numel
    files[CONFIG] = json.dumps(config).encode()
    if where in ("header shape", "header and config"):
        for name in TENSOR_FILES[layout]:
            header, data = split_file(files[name])
            for key in header:
                if key.startswith(param + "."):
                    header[key]["shape"] = [numel]
            files[name] = join_file(header, data)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_case(Path(tmp), files)
        check(sandbox.load(folder), folder)


# ---- family 4: files that are not regular files -----------------------------------------------------------------

SECRET = b"\x13\x37secret-bytes-outside-the-folder"
KINDS = [
    "/dev/zero",
    "/dev/null",
    "/dev/urandom",
    "fifo",
    "dangling",
    "loop",
    "folder",
    "outside",
    "inside",
    "socket",
]


def replace_with(path: Path, kind: str, outside: Path) -> None:
    if path.exists() or path.is_symlink():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if kind.startswith("/dev/"):
        path.symlink_to(kind)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dangling":
        path.symlink_to(path.parent / "no-such-file")
    elif kind == "loop":
        path.symlink_to(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "outside":
        path.symlink_to(outside)
    elif kind == "inside":  # a link to another file of the same folder: harmless, may even load
        others = sorted(p for p in path.parent.iterdir() if p.is_file() and p != path)
        path.symlink_to(others[0].name)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(os.fspath(path))
        s.close()


@FUZZ
@example("sharded", INDEX, "/dev/zero", 0)  # read until MemoryError (5.4 GB in 15 s) before
@example("sharded", INDEX, "fifo", 0)  # blocked forever before
@example("sharded", "shard", "outside", 0)  # followed, and its first 8 bytes quoted as a number
@example("single", CONFIG, "fifo", 0)
@example("single", "lone file", "fifo", 0)
@given(
    st.sampled_from(["single", "sharded"]),
    st.sampled_from([CONFIG, INDEX, "delta.safetensors", "shard", "lone file"]),
    st.sampled_from(KINDS),
    st.integers(0, 1000),
)
def test_files_that_are_not_regular_files(sandbox, layout, target, kind, which):
    files = dict(REFERENCE[layout])
    with tempfile.TemporaryDirectory() as tmp:
        outside = Path(tmp) / "elsewhere" / "secret.safetensors"
        outside.parent.mkdir()
        outside.write_bytes(SECRET)
        folder = write_case(Path(tmp), files)
        if target == "shard":
            target = TENSOR_FILES[layout][which % len(TENSOR_FILES[layout])]
        if target == "lone file":
            lone = Path(tmp) / "lone.safetensors"
            if kind in ("outside", "inside"):  # a lone path named by the caller may link anywhere: it loads
                lone.symlink_to(folder / TENSOR_FILES[layout][0])
            else:
                replace_with(lone, kind, outside)
            check(sandbox.load(lone), folder, also=(lone.name,))
            return
        if target not in files:
            target = TENSOR_FILES[layout][0]
        replace_with(folder / target, kind, outside)
        check(sandbox.load(folder), folder, secret=SECRET)


def test_the_sandbox_catches_what_it_should(sandbox, tmp_path):
    """The harness can fail: a blocked read, a CPU spin, a huge allocation, a resident-memory overrun and a
    crash are each reported as such, and a valid delta loads."""
    assert sandbox.load(Path(SELFTEST + "spin")).kind == "cpu_timeout"
    allocate = sandbox.load(Path(SELFTEST + "allocate"))
    assert allocate.kind == "exception" and "RuntimeError" in allocate.exc_type + allocate.message
    grow = sandbox.load(Path(SELFTEST + "grow"))
    assert grow.kind == "ok" and grow.rss_growth > MEMORY_LIMIT  # check() refuses this outcome
    with pytest.raises(AssertionError):
        check(grow, tmp_path)
    assert sandbox.load(Path(SELFTEST + "crash")).kind == "crashed"
    folder = save_delta(_reference_delta(), tmp_path / "ok")
    ok = sandbox.load(folder)
    assert ok.kind == "ok" and set(ok.params) == set(_reference_delta()), ok.describe()
    assert ok.rss_growth < MEMORY_LIMIT and ok.cpu_s < CPU_LIMIT_S


def test_the_sandbox_catches_a_blocked_read(sandbox, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert sandbox.load(Path(f"{SELFTEST}block:{fifo}")).kind == "wall_timeout"
