"""A deliberately hostile Hub-compatible server for tests: it serves one valid delta, and a ``mode`` makes it lie in
the ways a malicious or broken Hub could (path-like ETags and commit shas, sizes that do not match, errors that
echo the caller's token, invalid JSON, a stall). Standard library only; loopback only.

``HostileHub(delta_folder).start()``; set ``hub.mode`` before each request sequence; ``hub.url``. Every request
line and its Authorization header are recorded in ``hub.seen`` so tests can check what the client sent.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

GOOD_SHA = "0123456789abcdef0123456789abcdef01234567"

# mode -> what the server does (see _Handler)
MODES = {
    "honest": "serves the delta correctly",
    "sha-traversal": "repo info and X-Repo-Commit name the commit '../../escaped'",
    "sha-folder": "the commit is '..', naming the cache's repo folder itself",
    "sha-not-hex": "the commit is 40 characters but not hex",
    "etag-traversal": "every file's ETag is '../../../../escaped-etag'",
    "repo-commit-traversal": "honest repo info, but downloads say X-Repo-Commit: ../../escaped",
    "lying-size": "downloads announce a size (X-Linked-Size) other than the bytes sent",
    "error-403-echo": "403 whose body and X-Error-Message echo the Authorization header",
    "error-500-echo": "500 (on every request) whose body echoes the Authorization header",
    "invalid-json": "repo info is not JSON",
    "stall": "accepts the connection and never answers",
    "stall-downloads": "answers repo info and listings, then never answers a download",
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args):  # quiet
        pass

    def do_GET(self):
        hub = self.server.hub
        hub.seen.append((self.command, self.path, self.headers.get("Authorization")))
        mode = hub.mode
        if mode == "stall" or (mode == "stall-downloads" and "/resolve/" in self.path):
            hub.stalled.wait(timeout=600)  # until the test is over; the client must give up first
            self.close_connection = True
            return
        auth = self.headers.get("Authorization", "")
        if mode in ("error-403-echo", "error-500-echo"):
            status = 403 if mode == "error-403-echo" else 500
            body = f"Forbidden. You sent: {auth}\nTraceback (most recent call last):\n  secret stuff {auth}"
            return self._send(
                status,
                json.dumps({"error": body}).encode(),
                {"Content-Type": "application/json", "X-Error-Message": f"denied for {auth}"},
            )
        path = unquote(urlsplit(self.path).path)
        sha = {"sha-traversal": "../../escaped", "sha-folder": "..", "sha-not-hex": "z" * 40}.get(
            mode, GOOD_SHA
        )
        if re.fullmatch(r"/api/models/[^/]+/[^/]+(/revision/.+)?", path):
            if mode == "invalid-json":
                return self._send(200, b"{not json at all", {"Content-Type": "application/json"})
            info = {
                "id": "x/y",
                "sha": sha,
                "siblings": [{"rfilename": n} for n in hub.files],
                "private": False,
            }
            return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
        if re.fullmatch(r"/api/models/[^/]+/[^/]+/tree/.+", path):
            entries = [
                {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for name, data in hub.files.items()
            ]
            return self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"})
        match = re.fullmatch(r"/[^/]+/[^/]+/resolve/[^/]+/(.+)", path)
        if match and match.group(1) in hub.files:
            data = hub.files[match.group(1)]
            etag = hashlib.sha1(data).hexdigest()
            commit = "../../escaped" if mode == "repo-commit-traversal" else sha
            headers = {
                "X-Repo-Commit": commit,
                "ETag": f'"{etag}"',
                "Content-Type": "application/octet-stream",
            }
            if mode == "etag-traversal":
                headers["ETag"] = '"../../../../escaped-etag"'
            if mode == "lying-size":
                headers["X-Linked-Size"] = str(len(data) + 1000)
                headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            return self._send(200, data, headers)
        if match:
            return self._send(
                404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}
            )
        return self._send(404, b'{"error": "not found"}', {"X-Error-Code": "RepoNotFound"})

    do_HEAD = do_GET

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: HostileHub


class HostileHub:
    def __init__(self, delta_folder: Path):
        self.files = {p.name: p.read_bytes() for p in sorted(Path(delta_folder).iterdir()) if p.is_file()}
        self.mode = "honest"
        self.seen: list[tuple[str, str, str | None]] = []
        self.stalled = threading.Event()
        self._httpd: _Server | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HostileHub:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stalled.set()
        time.sleep(0.05)
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HostileHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
