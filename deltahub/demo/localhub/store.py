"""Storage and git-like semantics of the test Hub (server.py serves them over HTTP).

Layout: ``root/repos/<namespace>/<name>/repo.json`` holds one repo's refs, commits and pull requests;
``.../blobs/<sha256>`` holds each file content once. A commit is an immutable snapshot: ``files`` maps each path to
``{sha256, size, lfs, git_oid}`` (``git_oid`` is what git would store: the blob's sha1, or the LFS pointer's sha1),
plus ``parent``, ``title``, ``message``, ``author`` and ``date``. Refs (``refs/heads/main``, ``refs/tags/v1``,
``refs/pr/1``) map to commit shas.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
from datetime import datetime, timezone
from pathlib import Path

import yaml

from ...hub_ids import is_repo_id

LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub refuses regular (non-LFS) files of 10 MiB or more
# The (abridged) .gitattributes the Hub puts in the initial commit of a new model repo.
DEFAULT_GITATTRIBUTES = """\
*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.gguf filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.msgpack filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.npz filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pkl filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.tar filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
*tfevents* filter=lfs diff=lfs merge=lfs -text
"""
SHA40 = re.compile(r"[0-9a-f]{40}")
OID = re.compile(r"[0-9a-f]{64}")  # an LFS object id: the content's sha256, which also names its blob file


class HubError(Exception):
    """An error answered like the Hub does: JSON ``{"error": ...}`` plus ``X-Error-Code`` for the client's mapping."""

    def __init__(self, status: int, message: str, code: str | None = None, headers=None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = (
            status,
            message,
            code,
            headers or {},
            extra,
        )


def now() -> str:
    return (
        datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    )  # the format parse_datetime reads


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def front_matter(text: str) -> str | None:
    """The README's YAML front matter as text, or None when there is none (same rule as the Hub)."""
    match = re.match(r"^\s*---[\r\n]+([\S\s]*?)[\r\n]+---(\r\n|\n|$)", text)
    return match.group(1) if match else None


def validate_card(content: str) -> tuple[list[dict], list[dict]]:
    """(errors, warnings) for a README, like POST /api/validate-yaml: YAML must parse to a mapping and
    `base_model` / `library_name`, when present, must be strings or lists of strings."""
    text = front_matter(content)
    if text is None or not text.strip():
        return [], [{"message": "empty or missing yaml metadata in repo card"}]
    try:
        meta = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return [{"message": f"Invalid YAML in the metadata: {err}"}], []
    if not isinstance(meta, dict):
        return [{"message": "The metadata must be a YAML mapping"}], []
    errors = []
    for key in ("base_model", "library_name"):
        value = meta.get(key)
        if value is not None and not (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            errors.append({"message": f'"{key}" must be a string or an array of strings'})
    return errors, []


def file_entry(sha256: str, data: bytes | None = None, lfs_size: int | None = None) -> dict:
    """A regular file (git blob of `data`) or, with `lfs_size`, an LFS file (git stores only its pointer)."""
    if lfs_size is not None:
        return {
            "sha256": sha256,
            "size": lfs_size,
            "lfs": True,
            "git_oid": git_oid(lfs_pointer(sha256, lfs_size)),
        }
    return {"sha256": sha256, "size": len(data), "lfs": False, "git_oid": git_oid(data)}


def file_info(path: str, entry: dict) -> dict:
    """A file as /tree and /paths-info list it."""
    info = {"type": "file", "path": path, "size": entry["size"], "oid": entry["git_oid"]}
    if entry["lfs"]:  # `oid` is the pointer's; the content's sha256 is in `lfs`
        pointer_size = len(lfs_pointer(entry["sha256"], entry["size"]))
        info["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}
    return info


def folder_info(path: str) -> dict:
    return {"type": "directory", "path": path, "size": 0, "oid": hashlib.sha1(path.encode()).hexdigest()}


def sibling_info(path: str, entry: dict, blobs: bool) -> dict:
    """A file as repo info lists it (`siblings`); sizes and LFS data only with ?blobs=true (files_metadata)."""
    if not blobs:
        return {"rfilename": path}
    info = {"rfilename": path, "size": entry["size"], "blobId": entry["git_oid"]}
    if entry["lfs"]:
        pointer_size = len(lfs_pointer(entry["sha256"], entry["size"]))
        info["lfs"] = {"size": entry["size"], "sha256": entry["sha256"], "pointerSize": pointer_size}
    return info


def list_tree(files: dict, path: str, recursive: bool) -> list[dict]:
    """Entries under `path` (folders included): direct children, or everything below when `recursive`."""
    prefix = f"{path}/" if path else ""
    entries: dict[str, dict] = {}
    for file_path, entry in sorted(files.items()):
        if not file_path.startswith(prefix):
            continue
        parts = file_path[len(prefix) :].split("/")
        depth = len(parts) if recursive else 1
        for i in range(1, min(depth, len(parts) - 1) + 1):  # the folders on the way
            folder = prefix + "/".join(parts[:i])
            entries.setdefault(folder, folder_info(folder))
        if len(parts) <= depth:
            entries[file_path] = file_info(file_path, entry)
    if path and not entries:
        raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
    return list(entries.values())


def check_repo_id(repo_id: object) -> str:
    """``repo_id`` (already URL-decoded) when it follows the Hub's rules, else 400. Every disk path of a repo is
    built from an id that passed here, so an id can never name another user's folder ("alice/../bob/x")."""
    if not is_repo_id(repo_id):
        raise HubError(400, f"Invalid repo id: {str(repo_id)[:200]!r}")
    return repo_id  # type: ignore[return-value]


def check_oid(oid: object) -> str:
    """An LFS object id must be 64 lowercase hex digits (a sha256): it becomes a file name under blobs/."""
    if not isinstance(oid, str) or not OID.fullmatch(oid):
        raise HubError(422, f"Invalid LFS object id {str(oid)[:80]!r}: expected a sha256 (64 hex digits)")
    return oid


def check_path(path) -> str:
    if (
        not isinstance(path, str)
        or not path
        or path.startswith("/")
        or ".." in path.split("/")
        or "//" in path
    ):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


class RepoStore:
    """Repos on disk. One (re-entrant) lock serialises every read-modify-write of a repo.json; blobs are immutable."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.lock = threading.RLock()

    def _dir(self, repo_id: str) -> Path:
        return self.root / "repos" / check_repo_id(repo_id)

    def load(self, repo_id: str) -> dict | None:
        path = self._dir(repo_id) / "repo.json"
        with self.lock:
            return json.loads(path.read_text()) if path.is_file() else None

    def save(self, repo_id: str, repo: dict) -> None:
        path = self._dir(repo_id) / "repo.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(repo, indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file

    def delete(self, repo_id: str) -> None:
        shutil.rmtree(self._dir(repo_id))

    def blob_path(self, repo_id: str, sha256: str) -> Path:
        return self._dir(repo_id) / "blobs" / check_oid(sha256)

    def put_blob(self, repo_id: str, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.blob_path(repo_id, sha256)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{sha256}.{secrets.token_hex(4)}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return sha256

    def read_blob(self, repo_id: str, sha256: str) -> bytes:
        return self.blob_path(repo_id, sha256).read_bytes()

    def create(self, repo_id: str, private: bool, author: str) -> dict:
        repo = {"private": private, "created_at": now(), "refs": {}, "commits": {}, "discussions": {}}
        self._dir(repo_id).mkdir(parents=True)
        # Like the Hub, a new repo starts with an "initial commit" holding the default .gitattributes.
        data = DEFAULT_GITATTRIBUTES.encode()
        files = {".gitattributes": file_entry(self.put_blob(repo_id, data), data)}
        self.add_commit(repo, "refs/heads/main", None, files, "initial commit", "", author)
        self.save(repo_id, repo)
        return repo

    @staticmethod
    def add_commit(
        repo: dict, ref: str, parent: str | None, files: dict, title: str, message: str, author
    ) -> str:
        commit = {"parent": parent, "files": files, "title": title, "message": message, "author": author}
        commit["date"] = now()
        sha = hashlib.sha1(json.dumps(commit, sort_keys=True).encode()).hexdigest()
        repo["commits"][sha] = commit
        repo["refs"][ref] = sha
        return sha

    @staticmethod
    def resolve(repo: dict, revision: str) -> str:
        """Branch, tag, full ref (refs/pr/1) or full commit sha -> commit sha."""
        for ref in (f"refs/heads/{revision}", f"refs/tags/{revision}", revision):
            if ref in repo["refs"]:
                return repo["refs"][ref]
        if SHA40.fullmatch(revision) and revision in repo["commits"]:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def card_data(self, repo_id: str, files: dict) -> dict | None:
        """The README's front matter, which the Hub exposes as cardData / tags / library_name."""
        entry = files.get("README.md")
        try:
            text = self.read_blob(repo_id, entry["sha256"]).decode() if entry else ""
            card = yaml.safe_load(front_matter(text) or "")
        except (yaml.YAMLError, UnicodeDecodeError):
            return None
        return card if isinstance(card, dict) else None

    def upload_mode(self, repo_id: str, files: dict, path: str, size: int) -> str:
        """ "lfs" for files the revision's .gitattributes sends to LFS, or of 10 MiB and more; else "regular"."""
        entry = files.get(".gitattributes")
        text = self.read_blob(repo_id, entry["sha256"]).decode() if entry else ""
        rules = [line.split()[0] for line in text.splitlines() if "filter=lfs" in line.split()[1:]]
        name = path.rsplit("/", 1)[-1]
        lfs = any(fnmatch.fnmatch(path if "/" in rule else name, rule.lstrip("/")) for rule in rules)
        return "lfs" if lfs or size >= LFS_SIZE_THRESHOLD else "regular"

    def apply(self, repo_id: str, files: dict, key: str, value: dict) -> None:
        """Apply one NDJSON commit operation to the `files` snapshot being built."""
        path = check_path(value.get("path"))
        if key == "file":
            content = value.get("content")
            if not isinstance(content, str):
                raise HubError(400, f"File {path}: 'content' must be a string")
            try:
                content = (
                    base64.b64decode(content, validate=True)
                    if value.get("encoding") == "base64"
                    else content.encode()
                )
            except ValueError:
                raise HubError(400, f"File {path}: 'content' is not valid base64") from None
            files[path] = file_entry(self.put_blob(repo_id, content), content)
        elif key == "lfsFile":  # the content came earlier through the LFS batch API
            oid = check_oid(value.get("oid"))
            blob = self.blob_path(repo_id, oid)
            if not blob.is_file():
                raise HubError(422, f"LFS object {oid} for {path} was not uploaded to this repo")
            files[path] = file_entry(oid, lfs_size=blob.stat().st_size)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            doomed = [p for p in files if p.startswith(path.rstrip("/") + "/")]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                del files[p]
        else:
            raise HubError(400, f"Unsupported commit operation: {key}")
