"""The format's bytes, pinned: a fixed delta saved today must give exactly these format-1.1 bytes, and the
format-1.0 bytes 0.1.0 wrote for it must still read back to it.

A change to the writer, the config's key order, the header metadata or the layout that alters what lands on
disk fails here, so a format change is always a deliberate one (a new ``format_version`` and an update of these
constants), never a side effect. ``deltahub_version`` is the one field that may differ. The metadata is compared
as an object (0.1.0's safetensors kept it in a Rust HashMap, whose key order changed from run to run; 1.1's
writer is deltahub's own); everything else byte for byte: the header's length, the ``delta_config`` string,
every tensor entry and the data region.
"""

from __future__ import annotations

import hashlib
import json

import torch

import deltahub
from deltahub import ParamDelta, SparseDelta

# Format 1.1, as save_delta writes it: the 3-of-8 positions as a 1-byte bitmap, wider dtypes first.
GOLDEN_HEADER = (
    '{"__metadata__":{"format":"deltahub.sparse_delta","format_version":"1.1","delta_config":"{\\"format\\":'
    '\\"deltahub.sparse_delta\\",\\"format_version\\":\\"1.1\\",\\"deltahub_version\\":\\"VERSION\\",'
    '\\"base_model\\":\\"org/base\\",\\"base_revision\\":\\"0123456789abcdef0123456789abcdef01234567\\",'
    '\\"values_dtype\\":\\"mixed\\",\\"nnz\\":6,\\"numel\\":11,\\"density\\":0.5454545454545454,'
    '\\"parameters\\":{\\"model.layers.0.mlp.down_proj.weight\\":{\\"shape\\":[2,4],\\"dtype\\":'
    '\\"bfloat16\\",\\"nnz\\":3,\\"storage\\":\\"bitmap\\"},\\"model.norm.weight\\":{\\"shape\\":[3],'
    '\\"dtype\\":\\"float32\\",\\"nnz\\":3,\\"storage\\":\\"dense\\"}},\\"fingerprint\\":null,'
    '\\"provenance\\":{\\"algorithm\\":\\"hand\\"}}",'
    # each tensor's SHA-256 (of the data slices below, computed independently with hashlib)
    '"sha256":"{\\"model.layers.0.mlp.down_proj.weight.values\\":'
    '\\"a75294174934fcb16c03ce056ec3726081a6f3baff150c56f9a48b5a5db4415f\\",'
    '\\"model.norm.weight.dense\\":\\"d5635152c4a91420c6a5649eb835d1ca5ab52243fd64e489f623d016e7f65c66\\",'
    '\\"model.layers.0.mlp.down_proj.weight.bitmap\\":'
    '\\"3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d\\"}"},'
    '"model.layers.0.mlp.down_proj.weight.values":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},'
    '"model.norm.weight.dense":{"dtype":"BF16","shape":[3],"data_offsets":[12,18]},'
    '"model.layers.0.mlp.down_proj.weight.bitmap":{"dtype":"U8","shape":[1],"data_offsets":[18,19]}}'
)
# values 0.5, -1.25, 2.0 (F32), the dense norm 1, 2, 3 (BF16), positions 1, 5, 6 as bits of one byte (0x62)
GOLDEN_DATA = "0000003f0000a0bf00000040" + "803f00404040" + "62"

# Format 1.0, as 0.1.0 wrote the same delta (safetensors' writer: sparse int32 indices).
GOLDEN_V1_0_HEADER = (
    '{"__metadata__":{"format":"deltahub.sparse_delta","delta_config":"{\\"format\\":\\"deltahub.sparse_delta\\",'
    '\\"format_version\\":\\"1.0\\",\\"deltahub_version\\":\\"VERSION\\",\\"base_model\\":\\"org/base\\",'
    '\\"base_revision\\":\\"0123456789abcdef0123456789abcdef01234567\\",\\"values_dtype\\":\\"mixed\\",'
    '\\"nnz\\":6,\\"numel\\":11,\\"density\\":0.5454545454545454,\\"parameters\\":{'
    '\\"model.layers.0.mlp.down_proj.weight\\":{\\"shape\\":[2,4],\\"dtype\\":\\"bfloat16\\",\\"nnz\\":3,'
    '\\"storage\\":\\"sparse\\"},\\"model.norm.weight\\":{\\"shape\\":[3],\\"dtype\\":\\"float32\\",\\"nnz\\":3,'
    '\\"storage\\":\\"dense\\"}},\\"fingerprint\\":null,\\"provenance\\":{\\"algorithm\\":\\"hand\\"}}",'
    '"format_version":"1.0"},'
    '"model.layers.0.mlp.down_proj.weight.values":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},'
    '"model.layers.0.mlp.down_proj.weight.indices":{"dtype":"I32","shape":[3],"data_offsets":[12,24]},'
    '"model.norm.weight.dense":{"dtype":"BF16","shape":[3],"data_offsets":[24,30]}}'
)
# values 0.5, -1.25, 2.0 (F32), indices 1, 5, 6 (I32), the dense norm 1, 2, 3 (BF16), little-endian
GOLDEN_V1_0_DATA = "0000003f0000a0bf00000040" + "010000000500000006000000" + "803f00404040"


def golden_delta() -> SparseDelta:
    return SparseDelta(
        {
            "model.layers.0.mlp.down_proj.weight": ParamDelta(
                torch.tensor([1, 5, 6]), torch.tensor([0.5, -1.25, 2.0]), (2, 4), torch.bfloat16
            ),
            "model.norm.weight": ParamDelta(
                torch.tensor([0, 1, 2]),
                torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16),
                (3,),
                torch.float32,
            ),
        },
        base_model="org/base",
        base_revision="0123456789abcdef0123456789abcdef01234567",
        provenance={"algorithm": "hand"},
    )


def _split(header: str) -> tuple[dict, str]:
    """(the metadata object, the header text after it: the tensor entries, byte for byte)."""
    metadata, end = json.JSONDecoder().raw_decode(header, len('{"__metadata__":'))
    return metadata, header[end:]


def test_a_fixed_delta_is_written_as_these_exact_v1_1_bytes(tmp_path):
    deltahub.save_delta(golden_delta(), tmp_path / "d")
    raw = (tmp_path / "d" / "delta.safetensors").read_bytes()
    golden = GOLDEN_HEADER.replace("VERSION", deltahub.__version__)
    padded = len(golden) + (-len(golden) % 8)  # the header is padded to 8-byte alignment
    n = int.from_bytes(raw[:8], "little")
    assert n == padded
    header = raw[8 : 8 + n].decode("utf-8")
    assert header == header.rstrip(" ") + " " * (n - len(header.rstrip(" ")))
    metadata, tensors = _split(header.rstrip(" "))
    golden_metadata, golden_tensors = _split(golden)
    assert tensors == golden_tensors  # every entry, its order, dtypes, shapes, offsets
    assert metadata == golden_metadata  # the four keys, whatever order the HashMap gave them
    assert metadata["delta_config"] == golden_metadata["delta_config"]  # our JSON, byte for byte
    assert raw[8 + n :] == bytes.fromhex(GOLDEN_DATA), hashlib.sha256(raw).hexdigest()


def test_the_golden_bytes_of_both_versions_read_back_to_the_same_delta(tmp_path):
    for version, (text, data) in {
        "1.1": (GOLDEN_HEADER, GOLDEN_DATA),
        "1.0": (GOLDEN_V1_0_HEADER, GOLDEN_V1_0_DATA),
    }.items():
        header = text.replace("VERSION", "0.0.1").encode()
        header += b" " * (-len(header) % 8)
        path = tmp_path / f"lone-{version}.safetensors"  # a lone file: self-describing through its header
        path.write_bytes(len(header).to_bytes(8, "little") + header + bytes.fromhex(data))
        assert deltahub.load_delta(path).equal(golden_delta()), version
