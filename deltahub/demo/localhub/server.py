"""A small Hugging Face Hub-compatible HTTP server for tests and the demo (standard library + PyYAML, which
deltahub already depends on).

It serves what the real `huggingface_hub` client (2.4) uses for model repos, verified against the client's source:
whoami-v2; create / delete repo; repo info (``/api/models/{id}[/revision/{rev}]``); tree and paths-info; refs;
commits; preupload; commit (NDJSON: header, file, lfsFile, deletedFile, deletedFolder; ``create_pr``,
``parentCommit``); branches, tags and pull requests (``refs/pr/N``); the LFS batch API (basic transfer + verify);
``/resolve`` downloads (GET/HEAD with ``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``/``X-Linked-Size`` for LFS,
``Range``); and ``/api/validate-yaml``. Revisions may be branches, tags, ``refs/pr/N`` (URL-encoded or not) or full
commit shas. Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound) and a JSON ``error``, so
the client raises RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError or HfHubHTTPError.
Storage and git semantics live in store.py.

Upload path. With `hf_xet` installed (it is a dependency), huggingface_hub 2.4 uploads every file that preupload
marks "lfs" through Xet storage, with no fallback (`_commit_api._upload_files`), and `upload_folder` takes the Xet
pipeline (`_upload_pipeline`). Xet is not implemented here. So:

* By default files are "lfs" as on the real Hub: when a ``filter=lfs`` rule of the revision's ``.gitattributes``
  matches (new repos get the Hub's default one, e.g. ``*.safetensors``) or when they are 10 MiB or more. Clients must
  then run with ``HF_HUB_DISABLE_XET=1`` (the ``hub_env`` fixture does it): they use the LFS batch API served here
  (PUT to a one-time upload URL, then verify) and downloads carry the sha256 as ETag, like real LFS files. The Xet
  token routes answer 400 saying so (hf_xet hides that body; the server log shows it).
* ``HubServer(..., lfs=False)`` (``--no-lfs``) answers "regular" for every file, so any client, Xet on or off, sends
  contents inline (base64) in the commit. Use it to run a demo against an unmodified client environment.

Auth: ``tokens`` maps a bearer token to a user, ``orgs`` an org to its members. An unknown token gets 401; a private
repo is a 404 RepoNotFound for anyone but its namespace's user / org members; writing needs a token of the
namespace (401 without a token, 403 with another one). Tokens are never stored, and logs hold only request lines
and error messages.

Keeping users apart: repo ids are checked once, URL-decoded, against the Hub's naming rules where the store builds
every disk path (``store.check_repo_id``), so an encoded ``..%2F`` cannot reach another namespace; LFS object ids must
be sha256 hex (``store.check_oid``) and name blobs of that repo only. Who may send a body is decided from the headers
before any body byte is read (a token where one is needed, a live upload ticket), and bodies are capped: 1 MiB
anonymous, ``max_body_size`` authenticated, exactly the declared size for an LFS upload; 413 otherwise.

Standalone: ``python -m deltahub.demo.localhub --port 8765 --root /tmp/hub --token hf_xxx:alice [--org acme:alice]``
(``--port 0`` picks a free port; the URL is the first line on stdout).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import secrets
import sys
import threading
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs

from .plumbing import (
    DEFAULT_MAX_BODY_SIZE,
    MAX_PENDING_UPLOADS,
    PUBLIC,
    TICKET,
    USER,
    RequestHandler,
)
from .store import (
    HubError,
    RepoStore,
    check_oid,
    check_repo_id,
    file_info,
    folder_info,
    list_tree,
    now,
    sibling_info,
    validate_card,
)

# Raw (still URL-encoded) paths. A revision is one encoded segment ("refs%2Fpr%2F1") or a literal refs/pr/N.
# The groups are URL-decoded before use, and a decoded repo id is checked once (store.check_repo_id, where every
# disk path is built): "alice/..%2Fbob%2Fsecret" matches REPO but is refused.
REPO = r"(?P<repo>[^/]+/[^/]+)"
REV = r"(?P<rev>refs/(?:pr|convert)/[^/]+|[^/]+)"
ROUTES = [
    (method, re.compile(pattern), handler, access)
    for method, pattern, handler, access in [
        ("GET", r"/api/whoami-v2", "whoami", USER),
        ("POST", r"/api/repos/create", "create_repo", USER),
        ("DELETE", r"/api/repos/delete", "delete_repo", USER),
        ("POST", r"/api/validate-yaml", "validate_yaml", PUBLIC),
        ("GET", rf"/api/models/{REPO}(?:/revision/{REV})?", "repo_info", PUBLIC),
        ("GET", rf"/api/models/{REPO}/tree/{REV}(?:/(?P<path>.*))?", "tree", PUBLIC),
        ("POST", rf"/api/models/{REPO}/paths-info/{REV}", "paths_info", PUBLIC),
        ("GET", rf"/api/models/{REPO}/refs", "list_refs", PUBLIC),
        ("GET", rf"/api/models/{REPO}/commits/{REV}", "list_commits", PUBLIC),
        ("POST", rf"/api/models/{REPO}/preupload/{REV}", "preupload", USER),
        ("POST", rf"/api/models/{REPO}/commit/{REV}", "commit", USER),
        ("POST", rf"/api/models/{REPO}/branch/(?P<name>[^/]+)", "create_branch", USER),
        ("DELETE", rf"/api/models/{REPO}/branch/(?P<name>[^/]+)", "delete_ref", USER),
        ("POST", rf"/api/models/{REPO}/tag/{REV}", "create_tag", USER),
        ("DELETE", rf"/api/models/{REPO}/tag/(?P<name>[^/]+)", "delete_ref", USER),
        ("POST", rf"/api/models/{REPO}/discussions", "create_pull_request", USER),
        ("GET", rf"/api/models/{REPO}/discussions/(?P<num>\d+)", "pull_request", PUBLIC),
        ("*", rf"/api/models/{REPO}/xet-[a-z]+-token/.*", "xet_unsupported", PUBLIC),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch", USER),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/verify", "lfs_verify", USER),
        ("PUT", r"/_lfs_upload/(?P<ticket>[0-9a-f]{32})", "lfs_put", TICKET),
        ("GET", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", "resolve", PUBLIC),  # HEAD is routed as GET
    ]
]
XET_UNSUPPORTED = (
    "The test Hub server does not implement Xet storage: set HF_HUB_DISABLE_XET=1 so LFS files go through the "
    "LFS batch API, or run the server with lfs=False (--no-lfs) so every file is committed inline."
)


class _Handler(RequestHandler):
    """The Hub API: one method per route of ROUTES."""

    routes = tuple(ROUTES)

    def _url(self, repo_id: str, suffix: str = "") -> str:
        return f"{self.hub.url}/{repo_id}{suffix}"

    # ---- auth -----------------------------------------------------------------------------------------------------
    def _can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (user == namespace or user in self.hub.orgs.get(namespace, ()))

    def _repo(self, repo_id: str, write: bool = False) -> dict:
        """Load a repo the caller may see (else 404, so private repos stay invisible) and check write rights."""
        user = self._user()
        repo = self.store.load(repo_id)
        namespace = repo_id.split("/")[0]
        if repo is None or (repo["private"] and not self._can_write(user, namespace)):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and user is None:
            raise HubError(401, "You must be authenticated to write to this repository")
        if write and not self._can_write(user, namespace):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _files(self, repo_id: str, rev: str) -> dict:
        data = self._repo(repo_id)
        return data["commits"][self.store.resolve(data, rev)]["files"]

    # ---- account and repos ----------------------------------------------------------------------------------------
    def whoami(self):
        user = self._user(required=True)
        orgs = [{"type": "org", "name": org} for org, members in self.hub.orgs.items() if user in members]
        auth = {"type": "access_token", "accessToken": {"displayName": "test token", "role": "write"}}
        self._send_json(
            200, {"type": "user", "id": user, "name": user, "fullname": user, "orgs": orgs, "auth": auth}
        )

    def create_repo(self):
        user, body = self._user(required=True), self._json_body()
        namespace, name = body.get("organization") or user, body.get("name") or ""
        if body.get("type", "model") != "model":
            raise HubError(400, "This test server only hosts model repos")
        repo_id = check_repo_id(f"{namespace}/{name}")
        if not self._can_write(user, namespace):
            raise HubError(
                403, f"You don't have the rights to create a model under the namespace {namespace!r}"
            )
        # Current clients send `visibility`; older ones sent `private`.
        private = body.get("visibility", "private" if body.get("private") else "public") != "public"
        with self.store.lock:
            if self.store.load(repo_id) is not None:  # create_repo(exist_ok=True) reads `url` from this 409
                raise HubError(409, "You already created this model repo", url=self._url(repo_id))
            self.store.create(repo_id, private, user)
        self._send_json(200, {"url": self._url(repo_id), "name": repo_id, "id": repo_id})

    def delete_repo(self):
        user, body = self._user(required=True), self._json_body()
        repo_id = check_repo_id(f"{body.get('organization') or user}/{body.get('name')}")
        with self.store.lock:
            self._repo(repo_id, write=True)
            self.store.delete(repo_id)
        self._send_json(200, {})

    def repo_info(self, repo, rev="main"):
        data = self._repo(repo)
        sha = self.store.resolve(data, rev)
        commit = data["commits"][sha]
        files = commit["files"]
        blobs = self._flag("blobs")  # files_metadata=True: sizes and LFS data in `siblings`
        siblings = [sibling_info(path, entry, blobs) for path, entry in sorted(files.items())]
        info = dict(id=repo, modelId=repo, author=repo.split("/")[0], sha=sha, private=data["private"])
        info.update(lastModified=commit["date"], createdAt=data["created_at"], siblings=siblings, tags=[])
        info.update(
            gated=False,
            disabled=False,
            downloads=0,
            likes=0,
            usedStorage=sum(e["size"] for e in files.values()),
        )
        card = self.store.card_data(repo, files)
        if card:
            info.update(
                cardData=card, tags=list(card.get("tags") or []), library_name=card.get("library_name")
            )
        self._send_json(200, info)

    # ---- listings ---------------------------------------------------------------------------------------------------
    def tree(self, repo, rev, path=""):
        entries = list_tree(self._files(repo, rev), path.strip("/"), recursive=self._flag("recursive"))
        self._send_json(200, entries)  # a single page: no Link header, so the client stops paginating

    def paths_info(self, repo, rev):
        files, out = self._files(repo, rev), []
        for path in parse_qs(self.body.decode()).get("paths", []):  # form data: paths=a&paths=b
            path = path.strip("/")
            if path in files:
                out.append(file_info(path, files[path]))
            elif any(p.startswith(f"{path}/") for p in files):
                out.append(folder_info(path))
        self._send_json(200, out)

    def list_refs(self, repo):
        refs = self._repo(repo)["refs"]

        def group(prefix: str, keep_prefix: bool = False) -> list[dict]:
            return [
                {"name": ref if keep_prefix else ref[len(prefix) :], "ref": ref, "targetCommit": sha}
                for ref, sha in sorted(refs.items())
                if ref.startswith(prefix)
            ]

        out = {"branches": group("refs/heads/"), "tags": group("refs/tags/"), "converts": []}
        if self._flag("include_prs"):
            out["pullRequests"] = group("refs/pr/", keep_prefix=True)
        self._send_json(200, out)

    def list_commits(self, repo, rev):
        data = self._repo(repo)
        sha, out = self.store.resolve(data, rev), []
        while sha is not None:  # newest first, a single page
            commit = data["commits"][sha]
            out.append(
                {
                    "id": sha,
                    "title": commit["title"],
                    "message": commit["message"],
                    "date": commit["date"],
                    "authors": [{"user": commit["author"]}],
                }
            )
            sha = commit["parent"]
        self._send_json(200, out)

    # ---- uploads and commits -------------------------------------------------------------------------------------
    def preupload(self, repo, rev):
        data = self._repo(repo, write=not self._flag("create_pr"))  # anyone logged in may open a pull request
        self._user(required=True)
        sha = self.store.resolve(data, rev)
        files, out = data["commits"][sha]["files"], []
        for item in self._json_body().get("files", []):
            path, size = item["path"], int(item.get("size", 0))
            mode = self.store.upload_mode(repo, files, path, size) if self.hub.lfs else "regular"
            entry = files.get(path)
            # `oid` lets the client skip unchanged files: it compares it to the content's sha256 (LFS) or git sha1.
            oid = None if entry is None else entry["sha256"] if mode == "lfs" else entry["git_oid"]
            out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send_json(200, {"files": out, "commitOid": sha})

    def commit(self, repo, rev):
        try:
            lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        except (ValueError, RecursionError):
            raise HubError(400, "The commit body must be NDJSON: one JSON object per line") from None
        if not all(
            isinstance(op, dict) and isinstance(op.get("key"), str) and isinstance(op.get("value"), dict)
            for op in lines
        ):
            raise HubError(400, "Each commit line must be an object {'key': str, 'value': object}")
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first NDJSON line must be the commit header")
        header, create_pr = lines[0]["value"], self._flag("create_pr")
        title, message = header.get("summary", ""), header.get("description", "")
        with self.store.lock:
            data = self._repo(repo, write=not create_pr)
            author = self._user(required=True)
            base = self.store.resolve(data, rev)
            if create_pr:  # a new refs/pr/N from the target revision, and the commit goes there
                num = self._open_pull_request(data, title, message, start=base)
                ref = f"refs/pr/{num}"
            else:
                ref = f"refs/heads/{rev}" if f"refs/heads/{rev}" in data["refs"] else rev
                if not ref.startswith(("refs/heads/", "refs/pr/")) or ref not in data["refs"]:
                    raise HubError(
                        400, f"Invalid rev id: {rev} is not a branch, commits must target a branch"
                    )
            if header.get("parentCommit") and header["parentCommit"] != base:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(data["commits"][base]["files"])
            for op in lines[1:]:
                self.store.apply(repo, files, op["key"], op["value"])
            sha = self.store.add_commit(data, ref, base, files, title, message, author)
            self.store.save(repo, data)
        pr_url = self._url(repo, f"/discussions/{num}") if create_pr else None
        commit_url = self._url(repo, f"/commit/{sha}")
        self._send_json(
            200, {"success": True, "commitOid": sha, "commitUrl": commit_url, "pullRequestUrl": pr_url}
        )

    def lfs_batch(self, repo):
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubError(400, "Only LFS uploads are served; downloads go through /resolve")
        self._repo(repo, write=True)
        objects = []
        for obj in body.get("objects") or []:
            oid = check_oid(obj.get("oid") if isinstance(obj, dict) else None)
            size = obj.get("size")
            if not (
                isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= self.hub.max_body_size
            ):
                raise HubError(
                    422, f"LFS object {oid}: size must be an integer in [0, {self.hub.max_body_size}]"
                )
            if self.store.blob_path(repo, oid).is_file():
                objects.append({"oid": oid, "size": size})  # already stored: no actions, the client skips it
                continue
            ticket = secrets.token_hex(16)  # a one-time "presigned" URL: the client PUTs there without auth
            with self.store.lock:
                if len(self.hub.pending_uploads) >= MAX_PENDING_UPLOADS:
                    raise HubError(429, "Too many unfinished LFS uploads; finish or retry them later")
                self.hub.pending_uploads[ticket] = (repo, oid, size)
            actions = {
                "upload": {"href": f"{self.hub.url}/_lfs_upload/{ticket}", "header": {}},
                "verify": {"href": self._url(repo, ".git/info/lfs/objects/verify"), "header": {}},
            }
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        self._send_json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def lfs_put(self, ticket):
        with self.store.lock:
            repo, oid, size = self.hub.pending_uploads.pop(ticket, (None, None, None))
        if repo is None:
            raise HubError(403, "Unknown or already used upload URL")
        if len(self.body) != size or hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match oid {oid} / size {size}")
        self.store.put_blob(repo, self.body)
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def lfs_verify(self, repo):
        self._repo(repo, write=True)
        body = self._json_body()
        blob = self.store.blob_path(repo, check_oid(body.get("oid")))
        if not blob.is_file() or blob.stat().st_size != body.get("size"):
            raise HubError(404, f"LFS object {body.get('oid')} not found")
        self._send_json(200, {"success": True})

    def xet_unsupported(self, repo):
        raise HubError(400, XET_UNSUPPORTED)

    # ---- refs and pull requests ------------------------------------------------------------------------------------
    def create_branch(self, repo, name):
        with self.store.lock:
            data = self._repo(repo, write=True)
            if name.startswith("refs/"):
                raise HubError(400, f"Invalid branch name: {name}")
            if f"refs/heads/{name}" in data["refs"]:
                raise HubError(409, f"Reference already exists: refs/heads/{name}")
            start = self._json_body().get("startingPoint") or "main"
            data["refs"][f"refs/heads/{name}"] = self.store.resolve(data, start)
            self.store.save(repo, data)
        self._send_json(200, {})

    def create_tag(self, repo, rev):
        tag = self._json_body().get("tag") or ""
        with self.store.lock:
            data = self._repo(repo, write=True)
            if not tag or tag.startswith("refs/"):
                raise HubError(400, f"Invalid tag name: {tag!r}")
            if f"refs/tags/{tag}" in data["refs"]:
                raise HubError(409, f"Reference already exists: refs/tags/{tag}")
            data["refs"][f"refs/tags/{tag}"] = self.store.resolve(data, rev)
            self.store.save(repo, data)
        self._send_json(200, {})

    def delete_ref(self, repo, name):
        kind = "heads" if "/branch/" in self.path else "tags"
        with self.store.lock:
            data = self._repo(repo, write=True)
            if kind == "heads" and name == "main":
                raise HubError(403, "Cannot delete the default branch")
            if data["refs"].pop(f"refs/{kind}/{name}", None) is None:
                raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            self.store.save(repo, data)
        self._send_json(200, {})

    def _open_pull_request(self, data: dict, title: str, description: str, start: str) -> int:
        """Record PR number N and point refs/pr/N at `start` (the caller holds the store lock and saves)."""
        num = len(data["discussions"]) + 1
        data["discussions"][str(num)] = {"title": title, "author": self._user(), "created_at": now()}
        data["refs"][f"refs/pr/{num}"] = start
        return num

    def create_pull_request(self, repo):
        """POST /discussions with pullRequest: used by upload_folder(create_pr=True) when Xet is enabled."""
        body = self._json_body()
        if not body.get("pullRequest"):
            raise HubError(400, "Only pull requests are supported by the test server")
        with self.store.lock:
            data = self._repo(repo)
            self._user(required=True)
            title, description, main = (
                body.get("title", ""),
                body.get("description") or "",
                data["refs"]["refs/heads/main"],
            )
            num = self._open_pull_request(data, title, description, start=main)
            self.store.save(repo, data)
        self._send_json(200, {"num": num, "url": self._url(repo, f"/discussions/{num}")})

    def pull_request(self, repo, num):
        item = self._repo(repo)["discussions"].get(num)
        if item is None:
            raise HubError(404, f"Discussion {num} not found")
        details = {
            "num": int(num),
            "title": item["title"],
            "status": "open",
            "isPullRequest": True,
            "events": [],
        }
        details.update(author={"name": item["author"]}, createdAt=item["created_at"], filesWithConflicts=[])
        details.update(repo={"name": repo, "type": "model"}, changes={"base": "refs/heads/main"})
        self._send_json(200, details)

    # ---- downloads and model cards ----------------------------------------------------------------------------------
    def resolve(self, repo, rev, path):
        data = self._repo(repo)
        sha = self.store.resolve(data, rev)
        entry = data["commits"][sha]["files"].get(path)
        if entry is None:  # X-Repo-Commit lets the client cache the file's absence for this commit
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        etag = entry["sha256"] if entry["lfs"] else entry["git_oid"]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
        headers["Accept-Ranges"] = "bytes"
        if entry["lfs"]:  # the Hub sends these on its CDN redirect; we serve the bytes ourselves
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(entry["size"])})
        content, status = self.store.read_blob(repo, entry["sha256"]), 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match and any(match.groups()):  # the client resumes interrupted downloads with a Range
            size, (start, end) = len(content), match.groups()
            start, end = (int(start), int(end or size - 1)) if start else (max(size - int(end), 0), size - 1)
            if start >= size:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            content, status = content[start : end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{start + len(content) - 1}/{size}"
        self._send(status, content, headers)

    def validate_yaml(self):
        errors, warnings = validate_card(self._json_body().get("content", ""))
        if errors:  # the client reads `errors` from the 400 and raises ValueError
            payload = {"error": "Invalid metadata in README.md", "errors": errors, "warnings": warnings}
            return self._send_json(400, payload)
        self._send_json(200, {"errors": [], "warnings": warnings})


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer


class HubServer:
    """A Hub-compatible server on 127.0.0.1 backed by ``root_dir``. Use as a context manager, or start() / stop().

    ``tokens``: {bearer token: user}; ``orgs``: {org: [member users]}; ``port=0`` picks a free port (see ``.url``);
    ``lfs=False`` makes every upload inline (see the module docstring); ``echo_log`` also prints the log to stderr;
    ``max_body_size`` caps an authenticated request's body (anonymous ones: ``ANONYMOUS_BODY_LIMIT``).
    """

    def __init__(
        self,
        root_dir,
        tokens=None,
        *,
        orgs=None,
        host="127.0.0.1",
        port=0,
        lfs=True,
        echo_log=False,
        max_body_size=DEFAULT_MAX_BODY_SIZE,
    ):
        self.store = RepoStore(root_dir)
        self.max_body_size = int(max_body_size)
        self.tokens: dict[str, str] = dict(tokens or {})
        self.orgs: dict[str, list[str]] = {org: list(members) for org, members in (orgs or {}).items()}
        self.lfs, self.echo_log = lfs, echo_log
        self.log_lines: list[str] = []  # request lines, error messages and tracebacks (never tokens)
        self.pending_uploads: dict[str, tuple[str, str, int]] = {}  # LFS upload ticket -> (repo, oid, size)
        self._address = (host, port)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def log(self, line: str) -> None:
        self.log_lines.append(line)
        if self.echo_log:
            print(line, file=sys.stderr, flush=True)

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        (self.store.root / "repos").mkdir(parents=True, exist_ok=True)
        self._httpd = _HTTPServer(self._address, _Handler)
        self._httpd.hub = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="A Hugging Face Hub-compatible server for tests and demos.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=int, default=0, help="0 picks a free port; the URL is printed on stdout"
    )
    parser.add_argument("--root", required=True, help="folder holding the repos (kept across restarts)")
    parser.add_argument("--token", action="append", default=[], metavar="TOKEN:USER")
    parser.add_argument("--org", action="append", default=[], metavar="ORG:USER[,USER...]")
    parser.add_argument(
        "--no-lfs", action="store_true", help="commit every file inline (works with Xet enabled)"
    )
    parser.add_argument(
        "--max-body-size",
        type=int,
        default=DEFAULT_MAX_BODY_SIZE,
        metavar="BYTES",
        help="largest request body an authenticated client may send (default: 1 GiB)",
    )
    args = parser.parse_args(argv)
    tokens = dict(item.rsplit(":", 1) for item in args.token)
    orgs = {org: members.split(",") for org, members in (item.split(":", 1) for item in args.org)}
    server = HubServer(
        args.root,
        tokens,
        orgs=orgs,
        host=args.host,
        port=args.port,
        lfs=not args.no_lfs,
        echo_log=True,
        max_body_size=args.max_body_size,
    )
    server.start()
    print(server.url, flush=True)  # first stdout line, for callers that passed --port 0
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
