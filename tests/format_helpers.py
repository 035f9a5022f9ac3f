"""Shared helpers of the format tests: building deltas and writing files by hand."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deltahub import DeltaFormatError, ParamDelta, SparseDelta
from deltahub.format import load_delta

# ---------------------------------------------------------------------------------------------------------
# Helpers


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so -0.0 != 0.0 and every payload bit counts."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_same(a: SparseDelta, b: SparseDelta) -> None:
    assert list(a) == list(b)
    for name in a:
        pa, pb = a[name], b[name]
        assert (pa.shape, pa.dtype, pa.values.dtype) == (pb.shape, pb.dtype, pb.values.dtype), name
        assert pa.indices.dtype == pb.indices.dtype, name
        assert torch.equal(pa.indices, pb.indices), name
        assert torch.equal(bits(pa.values), bits(pb.values)), name
    assert (a.base_model, a.base_revision, a.provenance) == (b.base_model, b.base_revision, b.provenance)
    assert a.fingerprint.keys() == b.fingerprint.keys()
    for name, samples in a.fingerprint.items():
        assert [repr(x) for x in samples] == [repr(x) for x in b.fingerprint[name]]


def pd(idx, vals, shape, dtype=torch.float32, values_dtype=torch.float32) -> ParamDelta:
    return ParamDelta(torch.tensor(idx), torch.tensor(vals, dtype=values_dtype), shape, dtype)


def small_delta(values_dtype=torch.float32) -> SparseDelta:
    tricky = [-0.0, 1e-30, -3.5, 65504.0 if values_dtype == torch.float16 else 1e30, 2.0**-14]
    return SparseDelta(
        {
            "model.layers.0.mlp.down_proj.weight": pd(
                [0, 3, 7, 8, 11], tricky, (3, 4), torch.bfloat16, values_dtype
            ),
            "model.norm.weight": pd([1], [0.25], (4,), torch.float32, values_dtype),
        },
        base_model="tiny/base",
        base_revision="abc123",
        fingerprint={
            "model.norm.weight": (1.0, -2.5, float("nan"), float("inf"), float("-inf"), 0.0, 3.0, 4.0)
        },
        provenance={"algorithm": "rigl", "steps": 10, "hyper": {"density": 0.01}},
    )


def cfg_entry(shape, nnz, dtype="float32", storage="sparse", **extra):
    return {"shape": list(shape), "dtype": dtype, "nnz": nnz, "storage": storage, **extra}


def config(params: dict, **extra) -> dict:
    return {
        "format": "deltahub.sparse_delta",
        "format_version": "1.0",
        "base_model": "tiny/base",
        "base_revision": None,
        "parameters": params,
        "fingerprint": None,
        "provenance": {},
        **extra,
    }


def write_by_hand(folder: Path, tensors: dict, cfg: dict, *, header_config: bool = True) -> Path:
    """A delta made with nothing but safetensors and json, as docs/format.md describes."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.clone() for k, v in tensors.items()}  # safetensors refuses tensors sharing memory
    meta = {"format": cfg["format"], "format_version": cfg["format_version"]}
    if header_config:
        meta["delta_config"] = json.dumps(cfg)
    save_file(tensors, str(folder / "delta.safetensors"), metadata=meta)
    (folder / "delta_config.json").write_text(json.dumps(cfg))
    return folder


def raw_file(path: Path, header: bytes | dict, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file with an arbitrary (possibly lying) header."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(head) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + head + data)
    return path


def rehash(path: Path) -> None:
    """Record the SHA-256 of a .safetensors file's tensors as they now are (keeping the data bytes), as a writer
    of deliberately bad files would: the checks behind the checksum then see the damage instead of it."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    header["__metadata__"]["sha256"] = json.dumps(
        {
            key: hashlib.sha256(data[entry["data_offsets"][0] : entry["data_offsets"][1]]).hexdigest()
            for key, entry in header.items()
            if key != "__metadata__"
        }
    )
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


def edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def problems_of(path) -> list[str]:
    with pytest.raises(DeltaFormatError) as info:
        load_delta(path)
    return info.value.problems


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


W = "w"
IDX = torch.tensor([1, 4, 6], dtype=torch.int32)
VAL = torch.tensor([0.5, -1.0, 2.0])
