"""Reading a format-1.x delta (a folder or a lone ``.safetensors`` file).

Files may come from strangers, so everything is checked and every problem is collected into one
:class:`~deltahub.DeltaFormatError`. The order matters for safety: the config and every raw header are checked
first (sizes against the real file), and only then are tensor bytes read, each into an array of exactly the
size the checked header gives; their contents are checked with vectorised numpy operations (no per-element
Python) so loading stays fast. This module checks the folder (config, index, which file holds which
parameter); :mod:`deltahub.format.params` reads one file's tensors and checks and decodes each parameter.

:func:`read_delta` does all of that without torch and returns numpy arrays (the streaming merge's fast path
uses it); :func:`load_delta` turns the result into a :class:`~deltahub.SparseDelta`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._dtypes import VALUE_DTYPE_NAMES
from ..errors import DeltaFormatError
from .config import RESAVE, DeltaConfig, is_int, parse_config
from .header import Header, parse_json, read_header
from .params import RawParam, TensorFile, checksums, read_param
from .spec import (
    CONFIG_FILE,
    DENSE,
    INDEX_FILE,
    MAX_HEADER_SIZE,
    SINGLE_FILE,
    STORAGE_HELP,
    STORAGE_PARTS,
    STORAGE_SPARSE,
    SUFFIXES,
    VALUES,
    version_problem,
)
from .untrusted import preview, read_capped, regular_file

if TYPE_CHECKING:
    from ..delta import SparseDelta

# Beyond this many, more lines would bury the first ones (a corrupt file can produce thousands).
MAX_PROBLEMS = 50


def _fail(source: str, problems: list[str]) -> DeltaFormatError:
    if len(problems) > MAX_PROBLEMS:
        extra = len(problems) - MAX_PROBLEMS
        problems = [*problems[:MAX_PROBLEMS], f"... and {extra} more problems"]
    return DeltaFormatError(source, problems)


def _read_json(path: Path, label: str, problems: list[str]) -> Any:
    try:
        # The same ceiling as a safetensors header, counted in bytes actually read (a device's size says 0).
        data = read_capped(path, MAX_HEADER_SIZE)
        if data is None:
            problems.append(f"{label}: larger than {MAX_HEADER_SIZE} bytes; this is not a delta's JSON file")
            return None
        return parse_json(data)
    except OSError as e:
        problems.append(f"{label}: cannot be read ({e.strerror or e})")
    except (ValueError, RecursionError) as e:
        problems.append(f"{label}: not valid JSON ({str(e)[:200]}); {RESAVE} or fix the file")
    return None


def _check_version(obj: object, where: str, source: str) -> None:
    if not isinstance(obj, dict):
        raise _fail(source, [f"{where}: must be a JSON object; {RESAVE}"])
    problem = version_problem(obj.get("format"), obj.get("format_version"), where)
    if problem:
        # Alone on purpose: under another format or major version every other check would be noise.
        raise _fail(source, [problem])


def _header_agrees(header: Header, label: str, obj: dict[str, Any], problems: list[str]) -> None:
    for key in ("format", "format_version"):
        if key in header.metadata and header.metadata[key] != obj.get(key):
            problems.append(
                f"{label}: header metadata says {key} {header.metadata[key]!r} but the config says "
                f"{obj.get(key)!r}; the files come from different saves: {RESAVE}"
            )
    checksums(header, label, problems)


def _shard_names(index: object, problems: list[str]) -> tuple[list[str], dict[str, str] | None, int | None]:
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        problems.append(
            f"{INDEX_FILE}: must be an object with a 'weight_map' of tensor name -> shard file; {RESAVE}"
        )
        return [], None, None
    weight_map: dict[str, str] = {}
    files: dict[str, None] = {}
    for tensor, fname in index["weight_map"].items():
        ok = (
            isinstance(fname, str)
            and fname.endswith(".safetensors")
            and fname not in (".", "..")
            and not any(c in fname for c in "/\\\0:")
            and fname == os.path.basename(fname)
        )
        if not ok:
            problems.append(
                f"{INDEX_FILE}: tensor {tensor!r} maps to {str(fname)[:80]!r}; shard files must be plain "
                f"'*.safetensors' names inside the delta folder (no paths)"
            )
            continue
        weight_map[tensor] = fname
        files[fname] = None
    total = None
    meta = index.get("metadata")
    if meta is not None:
        if not isinstance(meta, dict) or ("total_size" in meta and not is_int(meta["total_size"])):
            problems.append(f"{INDEX_FILE}: 'metadata' must be an object whose 'total_size' is an integer")
        else:
            total = meta.get("total_size")
    return list(files), weight_map, total


@dataclass
class RawDelta:
    """A checked delta as numpy arrays (what :func:`read_delta` returns)."""

    source: str
    params: dict[str, RawParam]
    base_model: str | None = None
    base_revision: str | None = None
    fingerprint: dict[str, tuple[float, ...]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)

    # The parts of the SparseDelta interface that common_base and check_base use.
    def items(self):
        return self.params.items()

    def __iter__(self):
        return iter(self.params)

    def __getitem__(self, name: str) -> RawParam:
        return self.params[name]

    def __contains__(self, name: object) -> bool:
        return name in self.params

    def __len__(self) -> int:
        return len(self.params)

    @property
    def nnz(self) -> int:
        return sum(p.nnz for p in self.params.values())


def _locate(
    headers: dict[str, tuple[Path, Header]],
    weight_map: dict[str, str] | None,
    total_size: int | None,
    unread: set[str],
    problems: list[str],
) -> dict[str, dict[str, str]]:
    """``{param: {suffix: file}}`` from the headers themselves; the index is only cross-checked against them."""
    found: dict[str, dict[str, str]] = {}
    data_bytes = 0
    for label, (_, header) in headers.items():
        for key, entry in header.tensors.items():
            data_bytes += entry.end - entry.begin
            suffix = next((s for s in SUFFIXES if key.endswith(s) and len(key) > len(s)), None)
            if suffix is None:
                problems.append(
                    f"{label}: unexpected tensor {key!r}; a delta holds only '<param>.indices', "
                    f"'<param>.values' and '<param>.dense': remove it"
                )
                continue
            where = found.setdefault(key[: -len(suffix)], {})
            if suffix in where:
                problems.append(f"{label}: tensor {key!r} also appears in {where[suffix]}; keep one copy")
            where[suffix] = label
            if weight_map is not None and weight_map.get(key) != label:
                problems.append(
                    f"{INDEX_FILE}: tensor {key!r} is in {label} but the weight_map says "
                    f"{weight_map.get(key)!r}; {RESAVE}"
                )
    if weight_map is not None:
        for key, label in weight_map.items():
            if label in headers and key not in headers[label][1].tensors:
                problems.append(f"{INDEX_FILE}: lists tensor {key!r} in {label}, which does not contain it")
        if total_size is not None and total_size != data_bytes and not unread:
            problems.append(
                f"{INDEX_FILE}: metadata total_size is {total_size} but the shards hold {data_bytes} bytes"
            )
    return found


def _storage_of(name: str, parts: set[str], declared: str | None) -> tuple[str | None, str]:
    """``(storage, "")`` when ``parts`` are exactly one storage's tensors, else ``(None, what is wrong)``."""
    for storage, wanted in STORAGE_PARTS.items():
        if parts == set(wanted):
            return storage, ""
    if DENSE in parts:
        return None, "; '.dense' excludes the others"
    # Which storage was meant: the one whose own tensors are there, else the config's, else 1.0's sparse.
    meant = [st for st, wanted in STORAGE_PARTS.items() if parts & (set(wanted) - {VALUES})]
    if len(meant) > 1:
        return None, f"; it mixes the tensors of storages {' and '.join(repr(m) for m in meant)}"
    storage = meant[0] if meant else declared if declared in STORAGE_PARTS else STORAGE_SPARSE
    return None, f", missing {[name + s for s in STORAGE_PARTS[storage] if s not in parts]}"


def _layout(
    cfg: DeltaConfig,
    found: dict[str, dict[str, str]],
    weight_map: dict[str, str] | None,
    unread: set[str],
    problems: list[str],
) -> dict[str, tuple[str, str]]:
    """``{param: (storage, file)}`` for the parameters whose tensors are complete and agree with the config."""
    for name in found:
        if name not in cfg.params:
            problems.append(
                f"{name!r}: has tensors in the files but no entry in {cfg.where}'s 'parameters'; {RESAVE}"
            )
    layout: dict[str, tuple[str, str]] = {}  # name -> (storage, file)
    for name, spec in cfg.params.items():
        where = found.get(name)
        if where is None and spec is None:
            continue  # its entry is already reported as broken
        if where is None:
            # A parameter in a file that could not be read was already reported with that file.
            in_unread = (
                bool(unread)
                if weight_map is None
                else any(weight_map.get(name + s) in unread for s in SUFFIXES)
            )
            if not in_unread:
                problems.append(
                    f"{name!r}: listed in {cfg.where} but no tensors for it are in the files; {RESAVE}"
                )
            continue
        storage, why = _storage_of(name, set(where), spec.storage if spec else None)
        if storage is None:
            problems.append(
                f"{name!r}: has tensors {sorted(name + s for s in where)}{why}; a parameter is stored as "
                f"{STORAGE_HELP}; {RESAVE}"
            )
            continue
        if len(set(where.values())) > 1:
            problems.append(f"{name!r}: its tensors are split over {sorted(set(where.values()))}; {RESAVE}")
            continue
        if spec is not None and spec.storage != storage:
            problems.append(
                f"{name!r}: {cfg.where} says storage {spec.storage!r} but the files store it {storage}"
            )
            continue
        layout[name] = (storage, next(iter(where.values())))
    return layout


def _read_params(
    cfg: DeltaConfig,
    layout: dict[str, tuple[str, str]],
    headers: dict[str, tuple[Path, Header]],
    problems: list[str],
) -> dict[str, RawParam]:
    """Read the laid-out parameters' bytes and check their contents (vectorised, O(nnz) per parameter)."""
    params: dict[str, RawParam] = {}
    files: dict[str, TensorFile | None] = {}
    try:
        for name, (storage, label) in layout.items():
            spec = cfg.params[name]
            if spec is None:
                continue
            if label not in files:
                try:
                    files[label] = TensorFile(headers[label][0], headers[label][1], label)
                except OSError as e:
                    problems.append(
                        f"{label}: cannot be read ({e.strerror or e}); check the file's permissions"
                    )
                    files[label] = None
            file = files[label]
            if file is None:
                continue
            param, bad = read_param(file, name, storage, spec, cfg.where)
            if bad:
                problems.extend(f"{name!r} (in {label}): {b}" for b in bad)
            else:
                params[name] = param
    finally:
        for file in files.values():
            if file is not None:
                file.close()
    return params


def _assemble(
    source: str,
    cfg: DeltaConfig,
    headers: dict[str, tuple[Path, Header]],
    weight_map: dict[str, str] | None,
    total_size: int | None,
    problems: list[str],
    unread: set[str],
) -> RawDelta:
    found = _locate(headers, weight_map, total_size, unread, problems)
    layout = _layout(cfg, found, weight_map, unread, problems)
    params = _read_params(cfg, layout, headers, problems)
    if not problems:
        _check_totals(cfg, params, problems)
    if problems:
        raise _fail(source, problems)
    fingerprint = {n: s.samples for n, s in cfg.params.items() if s is not None and s.samples is not None}
    return RawDelta(
        source,
        params,
        base_model=cfg.base_model,
        base_revision=cfg.base_revision,
        fingerprint=fingerprint,
        provenance=cfg.provenance,
        origin={"path": source},
    )


def _check_totals(cfg: DeltaConfig, params: dict[str, RawParam], problems: list[str]) -> None:
    nnz = sum(p.nnz for p in params.values())
    numel = sum(p.numel for p in params.values())
    for key, actual in (("nnz", nnz), ("numel", numel)):
        if key in cfg.totals and cfg.totals[key] != actual:
            problems.append(
                f"{cfg.where}: total {key} is {preview(cfg.totals[key], 40)} but the parameters add up to {actual}"
            )
    density = nnz / numel if numel else 0.0
    if "density" in cfg.totals and not math.isclose(
        cfg.totals["density"], density, rel_tol=1e-6, abs_tol=1e-12
    ):
        problems.append(f"{cfg.where}: density is {cfg.totals['density']} but nnz/numel is {density}")
    if cfg.values_dtype in VALUE_DTYPE_NAMES:
        wrong = sorted(n for n, p in params.items() if p.values_dtype != cfg.values_dtype)
        if wrong:
            problems.append(
                f"{cfg.where}: values_dtype is {cfg.values_dtype!r} but {wrong[:5]} have other value dtypes; "
                "set it to 'mixed' or cast the values"
            )


def _present(path: Path) -> bool:
    """Whether anything is at ``path``, a dangling link included (it is reported as such, not as missing)."""
    return path.exists() or path.is_symlink()


def _load_folder(folder: Path, source: str) -> RawDelta:
    problems: list[str] = []
    if not _present(folder / CONFIG_FILE):
        raise _fail(
            source, [f"{CONFIG_FILE} is missing; a delta folder needs it (or load one .safetensors file)"]
        )
    config_path, bad = regular_file(folder / CONFIG_FILE, CONFIG_FILE, folder)
    obj = None if bad else _read_json(config_path, CONFIG_FILE, problems)
    if bad or problems:
        raise _fail(source, [bad] if bad else problems)
    _check_version(obj, CONFIG_FILE, source)
    cfg = parse_config(obj, CONFIG_FILE, problems)

    weight_map, total_size = None, None
    has_index, has_single = _present(folder / INDEX_FILE), _present(folder / SINGLE_FILE)
    if has_index and has_single:
        problems.append(f"both {SINGLE_FILE} and {INDEX_FILE} exist; remove the stale one (or {RESAVE})")
        files: list[str] = []
    elif has_index:
        index_path, bad = regular_file(folder / INDEX_FILE, INDEX_FILE, folder)
        if bad:
            problems.append(bad)
            files = []
        else:
            files, weight_map, total_size = _shard_names(
                _read_json(index_path, INDEX_FILE, problems), problems
            )
    elif has_single:
        files = [SINGLE_FILE]
    else:
        problems.append(f"no {SINGLE_FILE} and no {INDEX_FILE}: the tensor files are missing; {RESAVE}")
        files = []

    headers: dict[str, tuple[Path, Header]] = {}
    for label in files:
        if not _present(folder / label):
            problems.append(
                f"{label}: listed in {INDEX_FILE} but missing from the folder; re-download the delta"
            )
            continue
        path, bad = regular_file(folder / label, label, folder)
        if bad:
            problems.append(bad)
            continue
        header, bad = read_header(path, label)
        problems.extend(bad)
        if header is not None:
            _header_agrees(header, label, obj, problems)
            headers[label] = (path, header)
    unread = set(files) - set(headers)
    if has_index and weight_map is None:  # the index itself is reported: its parameters are not "missing" too
        unread.add(INDEX_FILE)
    return _assemble(source, cfg, headers, weight_map, total_size, problems, unread)


def _load_file(path: Path, source: str, label: str) -> RawDelta:
    header, problems = read_header(path, label)
    if header is None:
        raise _fail(source, problems)
    where = f"{label} header 'delta_config'"
    if "delta_config" not in header.metadata:
        raise _fail(
            source,
            [
                f"{label}: header metadata has no 'delta_config'; load the delta folder it belongs to, or {RESAVE}"
            ],
        )
    try:
        obj = parse_json(header.metadata["delta_config"])
    except (ValueError, RecursionError) as e:
        raise _fail(source, [f"{where}: not valid JSON ({str(e)[:200]}); {RESAVE}"]) from None
    _check_version(obj, where, source)
    _header_agrees(header, label, obj, problems)
    cfg = parse_config(obj, where, problems)
    return _assemble(source, cfg, {label: (path, header)}, None, None, problems, set())


def read_delta(path: str | os.PathLike[str]) -> RawDelta:
    """Read and check a delta without torch: :func:`load_delta`'s checks, numpy arrays out.

    Raises:
        DeltaFormatError, FileNotFoundError: as :func:`load_delta`.
    """
    source = os.fspath(path)
    p = Path(source)
    if p.is_dir():
        return _load_folder(p, source)
    if not _present(p):
        raise FileNotFoundError(f"no delta at {source}: expected a delta folder or a .safetensors file")
    # The path was named by the caller, so a link anywhere is fine; it must end at a regular file.
    real, bad = regular_file(p, p.name)
    if bad:
        raise _fail(source, [bad])
    return _load_file(real, source, p.name)


def load_delta(path: str | os.PathLike[str]) -> SparseDelta:
    """Load a delta saved by :func:`save_delta` (or written by hand following ``docs/format.md``).

    Args:
        path: a delta folder, or a single ``.safetensors`` file of one (its header carries its config).

    Returns:
        The :class:`~deltahub.SparseDelta`, with ``origin={"path": str(path)}``.

    Raises:
        DeltaFormatError: anything about the files breaks the format; lists every problem found.
        FileNotFoundError: nothing exists at ``path``.

    Example:
        >>> delta = load_delta("out/my-delta")
    """
    return to_sparse_delta(read_delta(path))


def to_sparse_delta(raw: RawDelta) -> SparseDelta:
    """The checked arrays as a :class:`~deltahub.SparseDelta` (no copies: the tensors share the arrays)."""
    import torch

    from .._dtypes import BASE_DTYPES
    from ..delta import ParamDelta, SparseDelta

    def tensor(array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        return t if t.numel() else torch.empty(0, dtype=t.dtype)  # numpy gives empty arrays stride 0

    params = {}
    for name, p in raw.params.items():
        values = tensor(p.values)
        if p.values_dtype == "bfloat16":
            values = values.view(torch.bfloat16)  # numpy held the raw bits
        params[name] = ParamDelta._trusted(tensor(p.positions), values, p.shape, BASE_DTYPES[p.dtype])
    return SparseDelta(
        params,
        base_model=raw.base_model,
        base_revision=raw.base_revision,
        fingerprint=raw.fingerprint,
        provenance=raw.provenance,
        origin=raw.origin,
    )
