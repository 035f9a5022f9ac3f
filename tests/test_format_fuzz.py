"""Fuzzing the reader: whatever the bytes, loading either succeeds or raises DeltaFormatError, nothing else."""

from __future__ import annotations

import contextlib
import json
import math
import struct
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from format_helpers import rehash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from deltahub import DeltaFormatError, ParamDelta, SparseDelta
from deltahub.format import load_delta, save_delta

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


def load_or_format_error(path: Path) -> SparseDelta | None:
    """Load ``path``; a DeltaFormatError is an accepted outcome, any other exception fails the test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_delta(path)
    except DeltaFormatError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)
        return None


def _reference() -> tuple[bytes, dict[str, bytes]]:
    # One parameter in each storage: bitmap, dense, uint8 gaps with an escape, uint16 gaps with an escape, sparse.
    delta = SparseDelta(
        {
            "a": ParamDelta(torch.tensor([0, 2, 5]), torch.tensor([1.0, -2.0, 0.5]), (2, 3), torch.float32),
            "b": ParamDelta(torch.arange(4), torch.ones(4, dtype=torch.bfloat16), (4,), torch.bfloat16),
            "c": ParamDelta(
                torch.tensor([3, 4, 5, 6, 400]), torch.arange(5, dtype=torch.float16), (1000,), torch.float32
            ),
            "d": ParamDelta(torch.tensor([10, 70000, 99999]), torch.ones(3), (100_000,), torch.float32),
            "e": ParamDelta(torch.tensor([300, 9_000_000]), torch.ones(2), (10_000_000,), torch.float32),
        },
        base_model="tiny/base",
        fingerprint={"a": (0.0,) * 8},
    )
    with tempfile.TemporaryDirectory() as tmp:
        single = save_delta(delta, Path(tmp) / "one")
        sharded = save_delta(delta, Path(tmp) / "many", max_shard_size=1)
        return (single / "delta.safetensors").read_bytes(), {
            p.name: p.read_bytes() for p in sharded.iterdir()
        }


SINGLE_BYTES, SHARDED_FILES = _reference()
STORAGES = {n: e["storage"] for n, e in json.loads(SHARDED_FILES["delta_config.json"])["parameters"].items()}
INDEX = "delta.safetensors.index.json"

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "x.safetensors"
        file.write_bytes(data)
        assert load_or_format_error(file) is None


DATA_START = 8 + int.from_bytes(SINGLE_BYTES[:8], "little")
# Half the edits land in the data region, where the header stays valid and the tensor checks must catch them.
positions = st.integers(0, DATA_START - 1) | st.integers(DATA_START, len(SINGLE_BYTES) - 1)


@FUZZ
@given(
    st.lists(st.tuples(positions, st.integers(0, 255)), min_size=1, max_size=6),
    st.one_of(st.none(), st.integers(0, len(SINGLE_BYTES))),
    st.booleans(),
    st.booleans(),
)
def test_mutated_valid_file(edits, cut, as_folder, rehashed):
    data = bytearray(SINGLE_BYTES)
    for pos, byte in edits:
        data[pos] = byte
    if cut is not None:
        data = data[:cut]
    with tempfile.TemporaryDirectory() as tmp:
        if as_folder:
            files = {**SHARDED_FILES, "delta-00001-of-00005.safetensors": bytes(data)}
            path = write(Path(tmp) / "d", files)
            file = path / "delta-00001-of-00005.safetensors"
        else:
            path = file = Path(tmp) / "x.safetensors"
            path.write_bytes(bytes(data))
        if (
            rehashed
        ):  # checksums recorded for the damaged bytes: the checks behind them must hold on their own
            # a header too damaged to rewrite stays as it is
            with contextlib.suppress(ValueError, KeyError, TypeError, IndexError, AttributeError):
                rehash(file)
        load_or_format_error(path)


def test_every_bit_flip_in_the_tensor_data_is_refused(tmp_path):
    """Each tensor's SHA-256 is recorded in its header: a flip that leaves positions and values in range (which
    no structural check can see) is refused too, naming the damaged tensor. Without the checksums (recorded
    anew, as a crafted file would) many of the same flips load as a different delta."""
    path = tmp_path / "x.safetensors"
    silent = 0
    for pos in range(DATA_START, len(SINGLE_BYTES)):
        for bit in range(8):
            data = bytearray(SINGLE_BYTES)
            data[pos] ^= 1 << bit
            path.write_bytes(bytes(data))
            with pytest.raises(DeltaFormatError, match=r"tensor '\w+\.\w+' does not match the SHA-256"):
                load_delta(path)
            rehash(path)
            silent += load_or_format_error(path) is not None
    assert silent > 0  # what the checksum adds: these loaded silently before it


NAMES = ["a.indices", "a.values", "a.dense", "b.dense", "b.values", "c", "__metadata__", ".indices"]
DTYPES = ["F32", "BF16", "F16", "I32", "I64", "F64", "U8", "BOOL", 7, None, ["F32"]]


@st.composite
def headers(draw):
    """A header dict and data bytes; with ``tidy``, offsets are laid out consistently so safetensors reads it."""
    tidy = draw(st.booleans())
    header: dict = {}
    offset = 0
    for name in draw(st.lists(st.sampled_from(NAMES[:6]), unique=True, max_size=4)):
        dtype = draw(st.sampled_from(DTYPES[:5] if tidy else DTYPES))
        shape = draw(st.lists(st.integers(0, 4) if tidy else st.integers(-2, 2**33), max_size=3))
        if tidy:
            size = math.prod(shape) * {"F32": 4, "BF16": 2, "F16": 2, "I32": 4, "I64": 8}[dtype]
            offsets = [offset, offset + size]
            offset += size
        else:
            offsets = draw(st.lists(st.integers(-1, 64), min_size=0, max_size=3))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    mode = draw(st.sampled_from(["none", "consistent", "random"]))
    if mode == "consistent":
        # A config that matches the tensors, so loading gets as far as checking the data bytes.
        params = {}
        for name, info in header.items():
            base, _, suffix = name.rpartition(".")
            if suffix == "dense":
                shape = info["shape"]
                params[base] = {
                    "shape": shape,
                    "dtype": "float32",
                    "nnz": math.prod(shape),
                    "storage": "dense",
                }
            elif suffix in ("indices", "values") and base not in params:
                n = info["shape"][0] if len(info["shape"]) == 1 else 0
                params[base] = {
                    "shape": [draw(st.integers(n, n + 64))],
                    "dtype": "float32",
                    "nnz": n,
                    "storage": "sparse",
                }
        config = {"format": "deltahub.sparse_delta", "format_version": "1.0", "parameters": params}
        header["__metadata__"] = {"delta_config": json.dumps(config)}
    elif mode == "random":
        params = draw(
            st.dictionaries(
                st.sampled_from(["a", "b", "c"]),
                st.fixed_dictionaries(
                    {
                        "shape": st.lists(st.integers(0, 4), max_size=2),
                        "dtype": st.sampled_from(["float32", "bfloat16", "int8"]),
                        "nnz": st.integers(0, 8),
                        "storage": st.sampled_from(["sparse", "dense"]),
                    }
                ),
                max_size=3,
            )
        )
        config = {
            "format": "deltahub.sparse_delta",
            "format_version": draw(st.sampled_from(["1.0", "1.3", "2.0"])),
        }
        config["parameters"] = params
        header["__metadata__"] = {"delta_config": json.dumps(config)}
    data = draw(st.binary(min_size=offset, max_size=offset)) if tidy else draw(st.binary(max_size=64))
    return header, data


@FUZZ
@given(headers(), st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_json_headers(header_and_data, length):
    header, data = header_and_data
    text = json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "x.safetensors"
        file.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
        load_or_format_error(file)


FILE_NAMES = st.sampled_from(
    [
        "delta-00001-of-00002.safetensors",
        "delta-00002-of-00002.safetensors",
        "delta-00003-of-00002.safetensors",
        "../delta-00001-of-00002.safetensors",
        "/etc/passwd",
        "sub/x.safetensors",
        "delta_config.json",
        ".",
        "",
    ]
)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["a.indices", "a.values", "b.dense", "ghost.values"]) | st.text(max_size=6),
        FILE_NAMES | json_scalars,
        max_size=5,
    ),
    st.one_of(
        st.none(), json_values, st.fixed_dictionaries({"total_size": st.integers(-5, 100) | json_scalars})
    ),
    st.booleans(),
)
def test_index_contents(weight_map, metadata, raw):
    index: dict = {"weight_map": weight_map}
    if metadata is not None:
        index["metadata"] = metadata
    text = json.dumps(index) if not raw else json.dumps(weight_map)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write(Path(tmp) / "d", {**SHARDED_FILES, INDEX: text.encode()})
        load_or_format_error(folder)


CONFIG_KEYS = [
    "format",
    "format_version",
    "base_model",
    "values_dtype",
    "nnz",
    "numel",
    "density",
    "parameters",
    "fingerprint",
    "provenance",
    "base_revision",
]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), json_values), max_size=3), json_values, st.booleans())
def test_config_contents(changes, param_entry, touch_param):
    config = json.loads(SHARDED_FILES["delta_config.json"])
    for key, value in changes:
        config[key] = value
    if touch_param and isinstance(config.get("parameters"), dict):
        config["parameters"]["a"] = param_entry
    with tempfile.TemporaryDirectory() as tmp:
        folder = write(Path(tmp) / "d", {**SHARDED_FILES, "delta_config.json": json.dumps(config).encode()})
        load_or_format_error(folder)


values_strategy = st.floats(width=32, allow_nan=True, allow_infinity=True)


@FUZZ
@given(
    st.lists(st.integers(0, 4), min_size=1, max_size=2),
    st.lists(st.tuples(st.integers(-3, 20), values_strategy), max_size=12),
    st.sampled_from([torch.int32, torch.int64]),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_index_value_arrays(shape, entries, index_dtype, values_dtype):
    """Arbitrary index/value arrays load exactly when they satisfy the invariants, and then round-trip."""
    idx = torch.tensor([i for i, _ in entries], dtype=index_dtype)
    vals = torch.tensor([v for _, v in entries], dtype=torch.float32).to(values_dtype)
    numel = math.prod(shape)
    config = {
        "format": "deltahub.sparse_delta",
        "format_version": "1.0",
        "parameters": {"w": {"shape": shape, "dtype": "float32", "nnz": len(entries), "storage": "sparse"}},
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "d"
        folder.mkdir()
        save_file({"w.indices": idx, "w.values": vals}, str(folder / "delta.safetensors"))
        (folder / "delta_config.json").write_text(json.dumps(config))
        loaded = load_or_format_error(folder)
        valid = (
            all(0 <= i < numel for i in idx.tolist())
            and all(a < b for a, b in zip(idx.tolist(), idx.tolist()[1:], strict=False))
            and bool(torch.isfinite(vals).all())
        )
        assert (loaded is not None) == valid
        if loaded is not None:
            assert torch.equal(loaded["w"].indices.to(torch.int64), idx.to(torch.int64))
            assert torch.equal(loaded["w"].values.view(torch.uint8), vals.view(torch.uint8))


def test_the_fuzzed_files_hold_every_storage():
    assert STORAGES == {"a": "bitmap", "b": "dense", "c": "gaps", "d": "gaps", "e": "sparse"}
    header = json.loads(SINGLE_BYTES[8:DATA_START])
    assert (header["c.gaps"]["dtype"], header["c.escapes"]["shape"]) == ("U8", [1])
    assert (header["d.gaps"]["dtype"], header["d.escapes"]["shape"]) == ("U16", [1])


def _write_param(folder: Path, tensors: dict, storage: str, shape: list, nnz: int) -> Path:
    folder.mkdir()
    config = {
        "format": "deltahub.sparse_delta",
        "format_version": "1.1",
        "parameters": {"w": {"shape": shape, "dtype": "float32", "nnz": nnz, "storage": storage}},
    }
    save_file(tensors, str(folder / "delta.safetensors"))
    (folder / "delta_config.json").write_text(json.dumps(config))
    return folder


@FUZZ
@given(
    st.integers(0, 70_000),
    st.lists(st.integers(0, 300), max_size=12),
    st.lists(st.integers(-5, 70_000), max_size=4),
    st.sampled_from([torch.uint8, torch.int16]),
    st.sampled_from([torch.int32, torch.int64]),
    st.integers(-2, 2),
)
def test_gap_arrays(numel, gaps, escapes, gap_dtype, escape_dtype, nnz_shift):
    """Arbitrary gap/escape arrays load exactly when an independent decode says they are valid, and then give
    that decode's positions. (int16 stands in for uint16: same bytes, and safetensors' torch side lacks U16.)"""
    limit = 255 if gap_dtype == torch.uint8 else 65535
    stored = [g % (limit + 1) for g in gaps]
    g = torch.tensor(stored, dtype=torch.int32).to(gap_dtype)
    e = torch.tensor(escapes, dtype=escape_dtype)
    nnz = len(stored) + nnz_shift
    with tempfile.TemporaryDirectory() as tmp:
        folder = _write_param(
            Path(tmp) / "d",
            {"w.gaps": g, "w.escapes": e, "w.values": torch.ones(len(stored))},
            "gaps",
            [numel],
            nnz,
        )
        if gap_dtype == torch.int16:  # relabel the bytes as U16, which they are
            data = (folder / "delta.safetensors").read_bytes().replace(b'"I16"', b'"U16"')
            (folder / "delta.safetensors").write_bytes(data)
        loaded = load_or_format_error(folder)
    # The reference: every 0 takes the next escape, escapes are larger than the gap type and positions fit.
    queue, positions, at, valid = list(escapes), [], -1, nnz == len(stored)
    for gap in stored:
        if gap == 0:
            if not queue:
                valid = False
                break
            gap = queue.pop(0)
            valid &= gap > limit
        at += gap
        positions.append(at)
    valid = valid and not queue and (not positions or positions[-1] < numel)
    assert (loaded is not None) == valid, (stored, escapes, numel)
    if loaded is not None:
        assert loaded["w"].indices.tolist() == positions


@FUZZ
@given(st.integers(0, 40), st.binary(max_size=6), st.integers(-1, 1))
def test_bitmap_arrays(numel, raw, nnz_shift):
    bits = [i for i in range(len(raw) * 8) if raw[i // 8] >> (i % 8) & 1]
    nnz = max(len(bits) + nnz_shift, 0)
    values = torch.ones(nnz)
    with tempfile.TemporaryDirectory() as tmp:
        bitmap = torch.tensor(list(raw), dtype=torch.uint8)
        folder = _write_param(
            Path(tmp) / "d", {"w.bitmap": bitmap, "w.values": values}, "bitmap", [numel], nnz
        )
        loaded = load_or_format_error(folder)
    valid = len(raw) == -(-numel // 8) and all(b < numel for b in bits) and nnz == len(bits)
    assert (loaded is not None) == valid
    if loaded is not None:
        assert loaded["w"].indices.tolist() == bits
