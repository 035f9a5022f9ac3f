"""``merge.yaml``: one :class:`MergeConfig` type that ``deltahub merge --config`` reads, :func:`deltahub.merge`
records, the merged folder carries (``merge.yaml``, next to the weights) and its model card quotes. An
example is :data:`EXAMPLE` (also shown by ``deltahub merge --help``).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import MergeConfigError, PathNotFoundError

CONFIG_NAME = "merge.yaml"
EXAMPLE = """\
base: meta-llama/Llama-3.2-1B@main
deltas:
  - {path: org/math-delta, revision: v1, weight: 1.0}
  - {path: ./code-delta, weight: 0.5}
method: ties
options: {density: 0.3}
dtype: bfloat16
"""


@dataclass(frozen=True)
class DeltaEntry:
    """One delta of a merge: a folder, file or Hub id, its weight and (for a Hub id) its revision."""

    path: str
    weight: float = 1.0
    revision: str | None = None

    @property
    def ref(self) -> str:
        """What :func:`deltahub.merge` takes: ``path`` or ``path@revision``."""
        return self.path + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class MergeConfig:
    """A reproducible merge. ``MergeConfig.from_yaml(path)``, ``.to_yaml()``, and ``.merge_kwargs()`` for
    :func:`deltahub.merge` (``merge(**config.merge_kwargs())``)."""

    base: str | None  # None: the base the deltas record
    deltas: tuple[DeltaEntry, ...]
    method: str = "sum"
    options: Mapping[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    max_shard_size: str | int = "5GB"
    out: str | None = None

    KEYS = ("base", "deltas", "method", "options", "dtype", "max_shard_size", "out")
    DELTA_KEYS = ("path", "weight", "revision")

    # ---- reading -----------------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> MergeConfig:
        """Read and check a ``merge.yaml``; :class:`~deltahub.errors.MergeConfigError` lists every problem."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise PathNotFoundError(f"no merge config at {os.fspath(path)!r}: give the path of a merge.yaml")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise MergeConfigError(f"cannot read the merge config {path}: {err}") from err
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: object, *, source: str = "merge config") -> MergeConfig:
        if not isinstance(data, dict):
            raise MergeConfigError(f"{source} must be a YAML mapping with keys {list(cls.KEYS)}")
        problems = []
        unknown = sorted(set(data) - set(cls.KEYS))
        if unknown:
            problems.append(f"unknown keys {unknown}; valid: {list(cls.KEYS)}")
        if data.get("base") is not None and not isinstance(data.get("base"), str):
            problems.append(
                "'base' must be a model folder or Hub id like 'org/name@revision' (or left out: the base the "
                "deltas record)"
            )
        entries = data.get("deltas")
        if not isinstance(entries, list) or not entries:
            problems.append("'deltas' must be a non-empty list of {path, weight, revision} entries")
            entries = []
        deltas = []
        for i, entry in enumerate(entries):
            if isinstance(entry, str):
                entry = {"path": entry}
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                problems.append(f"deltas[{i}] must be a path string or a mapping with a 'path'")
                continue
            bad = sorted(set(entry) - set(cls.DELTA_KEYS))
            if bad:
                problems.append(f"deltas[{i}] has unknown keys {bad}; valid: {list(cls.DELTA_KEYS)}")
            weight = entry.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
                problems.append(f"deltas[{i}].weight must be a finite number; got {weight!r}")
                weight = 1.0
            revision = entry.get("revision")
            deltas.append(DeltaEntry(entry["path"], float(weight), str(revision) if revision else None))
        options = data.get("options") or {}
        if not isinstance(options, dict):
            problems.append("'options' must be a mapping like {density: 0.5}")
            options = {}
        if problems:
            raise MergeConfigError(
                f"invalid merge config {source}:\n" + "\n".join(f"  - {p}" for p in problems)
            )
        kwargs: dict[str, Any] = {"base": data.get("base"), "deltas": tuple(deltas), "options": dict(options)}
        for key in ("method", "dtype", "max_shard_size", "out"):
            if data.get(key) is not None:
                kwargs[key] = (
                    data[key] if key == "max_shard_size" and isinstance(data[key], int) else str(data[key])
                )
        return cls(**kwargs)

    # ---- using and writing ---------------------------------------------------------------------------------

    def replace(self, **changes: Any) -> MergeConfig:
        """A copy with some fields changed (command-line flags override a file's values)."""
        return replace(self, **changes)

    def merge_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`deltahub.merge`."""
        kwargs: dict[str, Any] = {
            "base": self.base,
            "deltas": [d.ref for d in self.deltas],
            "weights": [d.weight for d in self.deltas],
            "method": self.method,
            "method_options": dict(self.options),
            "dtype": self.dtype,
            "max_shard_size": self.max_shard_size,
        }
        if self.out is not None:
            kwargs["out"] = self.out
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {**({"base": self.base} if self.base is not None else {}), "deltas": []}
        for d in self.deltas:
            entry: dict[str, Any] = {"path": d.path, "weight": d.weight}
            if d.revision:
                entry["revision"] = d.revision
            out["deltas"].append(entry)
        out["method"] = self.method
        if self.options:
            out["options"] = dict(self.options)
        for f in fields(self):
            if f.name in ("dtype", "out") and getattr(self, f.name) is not None:
                out[f.name] = getattr(self, f.name)
        if self.max_shard_size != "5GB":
            out["max_shard_size"] = self.max_shard_size
        return out

    def to_yaml(self) -> str:
        """The config as YAML that :meth:`from_yaml` reads back to an equal config (strings quoted as JSON,
        which is valid YAML, so an id like ``org/yes`` or ``1e3`` is never read back as a bool or number)."""
        lines = [*([f"base: {_scalar(self.base)}"] if self.base is not None else []), "deltas:"]
        for d in self.deltas:
            lines += [f"  - path: {_scalar(d.path)}", f"    weight: {d.weight!r}"]
            if d.revision:
                lines.append(f"    revision: {_scalar(d.revision)}")
        lines.append(f"method: {_scalar(self.method)}")
        if self.options:
            lines.append("options:")
            lines += [f"  {k}: {_scalar(v)}" for k, v in self.options.items()]
        if self.dtype is not None:
            lines.append(f"dtype: {_scalar(self.dtype)}")
        if self.max_shard_size != "5GB":
            lines.append(f"max_shard_size: {_scalar(self.max_shard_size)}")
        if self.out is not None:
            lines.append(f"out: {_scalar(self.out)}")
        return "\n".join(lines) + "\n"


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n"}


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text  # a plain word (a method, a dtype) reads back as itself
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid YAML scalar
