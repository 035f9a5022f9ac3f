"""What a push uploads: the delta with its base named by Hub id and no local path in any file, and its card.

A delta saved on this machine may record where things were here (``base_model: ./models/base``, a fine-tune's
folder in its provenance). :func:`scrub_for_upload` replaces each such path: the base by the id the user gives
(``--base-model``), an HF-cache snapshot path by ``repo_id@commit``, anything else dropped, each drop reported in
one line. When anything changed, the delta is re-saved (its safetensors headers repeat the config) so every
uploaded file agrees. :func:`check_no_local_paths` then reads what is about to be sent as a last guard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .delta import SparseDelta
from .errors import InvalidArgumentError
from .identity import hf_cache_ref, looks_like_local_path, parse_model_id, scrub_local_paths


@dataclass
class Outgoing:
    """The delta a push sends: the folder to upload, the delta as uploaded, and what was changed to get there."""

    folder: Path
    delta: SparseDelta
    notes: list[str] = field(default_factory=list)
    local_paths: list[str] = field(default_factory=list)  # strings that must not appear in any uploaded file
    rewritten: bool = False


def scrub_for_upload(
    delta: SparseDelta, folder: Path, scratch: Path, *, base_model: str | None = None
) -> Outgoing:
    """Name the base by Hub id and take every local path out of ``delta``; re-save it under ``scratch`` when
    anything changed.

    Args:
        delta: the delta as loaded from ``folder``.
        folder: its folder (uploaded as is when nothing changes).
        scratch: an empty temporary folder for the re-saved copy.
        base_model: ``"org/name[@rev]"`` to record as the base (replaces whatever the delta records).
    """
    from .format import save_delta

    notes: list[str] = []
    local: list[str] = []
    new_base, new_revision = delta.base_model, delta.base_revision
    if base_model is not None:
        new_base, new_revision = parse_model_id(base_model)
        if delta.base_model and looks_like_local_path(delta.base_model):
            local.append(delta.base_model)
    elif delta.base_model and looks_like_local_path(delta.base_model):
        cached = hf_cache_ref(delta.base_model)
        if cached is not None:
            new_base, new_revision = cached
        else:
            local.append(delta.base_model)
            notes.append(
                f"base_model {delta.base_model!r} is a local path: left out of the pushed files (the card cannot "
                "link the delta to its base); pass --base-model ID[@REV] (base_model=) to name it"
            )
            new_base, new_revision = None, None
    provenance, dropped = scrub_local_paths(delta.provenance)
    if dropped:
        local += dropped
        shown = ", ".join(repr(d) for d in dropped[:3]) + (
            f" and {len(dropped) - 3} more" if len(dropped) > 3 else ""
        )
        notes.append(f"provenance named local paths {shown}: left out of the pushed files")
    changed = (new_base, new_revision) != (
        delta.base_model,
        delta.base_revision,
    ) or provenance != delta.provenance
    if not changed:
        return Outgoing(folder, delta, notes, local)
    clean = delta.replace(base_model=new_base, base_revision=new_revision, provenance=provenance)
    copy = save_delta(clean, scratch / "upload", max_shard_size=_shard_size(folder))
    return Outgoing(copy, clean, notes, local, rewritten=True)


def _shard_size(folder: Path) -> int | str:
    """A shard size that cuts the re-saved copy like the original (its largest shard's data)."""
    from .format.spec import DEFAULT_MAX_SHARD_SIZE, INDEX_FILE

    index = folder / INDEX_FILE
    if not index.is_file():
        return DEFAULT_MAX_SHARD_SIZE
    shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    return max((folder / s).stat().st_size for s in shards)


def check_no_local_paths(files: Mapping[str, bytes | Path], paths: Iterable[str]) -> None:
    """Refuse to send any file that still contains one of ``paths`` (safetensors: their JSON header only).

    Raises:
        ValueError: naming the file and the path, with the fix.
    """
    needles = [p for p in dict.fromkeys(paths) if p and len(p) > 1]
    for needle in [*needles]:  # a path may appear JSON-escaped ("\\" on Windows) or resolved
        needles.append(json.dumps(needle)[1:-1])
        if os.path.exists(needle):
            needles.append(str(Path(needle).resolve()))
    needles = list(dict.fromkeys(needles))
    for name, content in files.items():
        data = content if isinstance(content, bytes) else _text_part(content)
        for needle in needles:
            if needle.encode("utf-8") in data:
                raise InvalidArgumentError(
                    f"{name} mentions the local path {needle!r}, which must not be uploaded; edit that file (a "
                    "hand-written README.md is pushed as written) or delete it so push generates one"
                )


def _text_part(path: Path) -> bytes:
    """What of a file can hold a path: a safetensors file's JSON header, any other file whole."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return f.read(min(size, 100_000_000))


def existing_card_metadata(info: Any) -> dict[str, Any]:
    """The metadata of the card already on the Hub (``model_info(...).card_data``), as a dict."""
    data = getattr(info, "card_data", None)
    if data is None:
        return {}
    return dict(data.to_dict() if hasattr(data, "to_dict") else data)
