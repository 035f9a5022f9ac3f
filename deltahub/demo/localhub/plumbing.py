"""HTTP plumbing of the loopback Hub: routing, who may send a body, how large, reading it, answering.

Kept apart from the Hub API (server.py) because this is where a stranger's request is first met: the decision to
read a body is taken from the request line and headers alone, so an anonymous 400 MB POST costs its headers, not
400 MB of memory, and a refused body is never parsed as the next request on the connection.
"""

from __future__ import annotations

import json
import traceback
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, unquote, urlsplit

from .store import HubError

# Who may call a route, decided from the headers alone, before any body byte is read:
# PUBLIC: anyone (a token, when sent, must be valid); USER: a valid token; TICKET: the one-time upload URL is the
# credential (its size was declared in the LFS batch call, so the body must be exactly that long).
PUBLIC, USER, TICKET = "public", "user", "ticket"
# Bodies are held in memory, so their size is capped before they are read: anonymous requests (paths-info forms,
# validate-yaml) need little; an authenticated commit carries inline files (all of them with lfs=False).
ANONYMOUS_BODY_LIMIT = 1 << 20
DEFAULT_MAX_BODY_SIZE = 1 << 30
MAX_PENDING_UPLOADS = 4096  # LFS upload tickets handed out and not used yet


class RequestHandler(BaseHTTPRequestHandler):
    """Dispatches to ``routes`` ``(method, compiled path pattern, handler name, access)``: the subclass's methods."""

    routes: tuple = ()
    protocol_version = "HTTP/1.1"  # keep-alive: the client pools its connections

    # ---- plumbing -------------------------------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format, *args):
        # Also called before _dispatch (e.g. a malformed request line). Logs the request line, never headers.
        self.server.hub.log(f"{self.address_string()} {format % args}")

    def _dispatch(self):
        self.hub = self.server.hub  # the HubServer
        self.store = self.hub.store
        self.body, self._body_pending, self.user = b"", self._has_body(), None
        split = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        method = "GET" if self.command == "HEAD" else self.command
        try:
            handler, access, args = self._route(method, split.path)
            # Everything that decides whether the body is wanted comes from the headers: a stranger's 400 MB
            # POST is refused after reading its request line and headers, not its body.
            self.user = self._authenticate(access)
            self.body = self._read_body(self._body_limit(access, args))
            return getattr(self, handler)(**args)
        except HubError as err:
            self.hub.log(f"  -> {err.status} {err.code or ''} {err.message}")
            self._send_json(err.status, {"error": err.message, **err.extra}, err.code, err.headers)
        except Exception as err:  # a server bug: answer 500 (the client retries those) and log the traceback
            self.hub.log(traceback.format_exc())
            self._send_json(500, {"error": f"test hub server bug: {err!r}"})

    def _route(self, method: str, path: str) -> tuple[str, str, dict[str, str]]:
        for route_method, pattern, handler, access in self.routes:
            match = pattern.fullmatch(path)
            if match and route_method in (method, "*"):
                args = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                return handler, access, args
        raise HubError(404, f"Not found: {self.command} {path}")

    def _has_body(self) -> bool:
        chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
        return chunked or self.headers.get("Content-Length", "0").strip() not in ("", "0")

    def _body_limit(self, access: str, args: dict[str, str]) -> int:
        if access == TICKET:
            with self.store.lock:
                upload = self.hub.pending_uploads.get(args["ticket"])
            if upload is None:
                raise HubError(403, "Unknown or already used upload URL")
            return upload[2]
        return self.hub.max_body_size if self.user is not None else ANONYMOUS_BODY_LIMIT

    def _read_body(self, limit: int) -> bytes:
        """The request body, refused with 413 (before reading it, when its length is declared) past ``limit``."""
        too_large = HubError(413, f"Request body larger than the {limit} bytes this request may send")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # httpx streams file objects so
            chunks, total = [], 0
            while True:
                line = self.rfile.readline(1024)
                try:
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                except ValueError:
                    raise HubError(400, "Malformed chunked body") from None
                if size == 0:
                    break
                total += size
                if total > limit:
                    raise too_large
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
            while self.rfile.readline(1024).strip():  # optional trailers, then the empty line
                pass
            self._body_pending = False
            return b"".join(chunks)
        raw = self.headers.get("Content-Length") or "0"
        if not raw.strip().isdigit():
            raise HubError(400, f"Invalid Content-Length: {raw[:40]!r}")
        length = int(raw)
        if length > limit:
            raise too_large
        body = self.rfile.read(length) if length else b""
        self._body_pending = False
        return body

    def _json_body(self) -> dict:
        try:
            body = json.loads(self.body or b"{}")
        except (ValueError, RecursionError):
            raise HubError(400, "Invalid JSON body") from None
        if not isinstance(body, dict):
            raise HubError(400, "The JSON body must be an object")
        return body

    def _flag(self, name: str) -> bool:
        return self.query.get(name, "").lower() in ("1", "true")

    def _send(self, status: int, body: bytes, headers: dict):
        if self._body_pending:  # refused unread: its bytes would be parsed as the next request on this socket
            headers = {**headers, "Connection": "close"}
            self.close_connection = True
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload, error_code: str | None = None, headers=None):
        headers = {"Content-Type": "application/json", **(headers or {})}
        if error_code:
            headers["X-Error-Code"] = error_code
        if status >= 400:
            # One printable line: messages quote request values, which must not split the header.
            headers["X-Error-Message"] = "".join(c if c.isprintable() else "?" for c in payload["error"])[
                :1000
            ]
        self._send(status, json.dumps(payload).encode(), headers)

    # ---- auth -----------------------------------------------------------------------------------------------------
    def _authenticate(self, access: str) -> str | None:
        """The caller's user from the Authorization header: 401 for an unknown token, and for none on a USER route."""
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if not token:
            if access == USER:
                raise HubError(401, "You must be authenticated to access this resource")
            return None
        user = self.hub.tokens.get(token) if scheme.lower() == "bearer" else None
        if (
            user is None
        ):  # this exact message keeps the client from mapping the 401 to RepositoryNotFoundError
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _user(self, required: bool = False) -> str | None:
        if required and self.user is None:
            raise HubError(401, "You must be authenticated to access this resource")
        return self.user
