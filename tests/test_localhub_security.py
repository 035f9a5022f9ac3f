"""The loopback Hub keeps users apart: ids and LFS object ids cannot name other folders, other users' repos stay
out of reach, and bodies are refused (unread) before authentication or past their cap.

Raw HTTP (http.client / sockets) where the real client would refuse to send the request itself."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
from urllib.parse import urlsplit

import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from deltahub.demo.localhub import HubServer

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


def request(
    url: str, method: str, path: str, *, token: str | None = None, body: bytes | None = None, headers=None
):
    """One request on a fresh connection: (status, headers, parsed JSON body or raw bytes)."""
    split = urlsplit(url)
    conn = http.client.HTTPConnection(split.hostname, split.port, timeout=10)
    all_headers = dict(headers or {})
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=all_headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    with contextlib.suppress(ValueError):
        data = json.loads(data)
    return response.status, dict(response.getheaders()), data


def ndjson(*ops) -> bytes:
    return b"\n".join(json.dumps(op).encode() for op in ops)


EVIL = {"key": "file", "value": {"path": "secret.txt", "content": "owned"}}


def commit(url: str, repo_id: str, token: str, summary: str, *ops) -> tuple[int, dict]:
    """POST a commit of ``ops`` (after its header) to ``repo_id``'s main: (status, JSON answer)."""
    header = {"key": "header", "value": {"summary": summary}}
    status, _, body = request(
        url, "POST", f"/api/models/{repo_id}/commit/main", token=token, body=ndjson(header, *ops)
    )
    return status, body


@pytest.fixture
def bob_secret(hub_env):
    """Bob's private repo holding secret.txt; returns its name (the part after 'bob/')."""
    bob = HfApi(endpoint=hub_env.url, token=hub_env.other_token)
    repo_id = hub_env.new_repo_id("secret", namespace=hub_env.other_user)
    bob.create_repo(repo_id, private=True)
    bob.upload_file(path_or_fileobj=b"bob's secret", path_in_repo="secret.txt", repo_id=repo_id)
    return repo_id.split("/", 1)[1]


TRAVERSALS = [
    "{alice}/..%2F{bob}%2F{name}",  # the issue's: decoded, it is alice/../bob/<name>
    "{alice}/%2E%2E%2F{bob}%2F{name}",
    "{alice}/..%252F{bob}",  # double-encoded: decoded once it is still not a repo id
    "{alice}/..",
    "..%2F{bob}/{name}",
    "%2E%2E/{bob}",
]


@pytest.mark.parametrize("template", TRAVERSALS)
def test_traversal_in_repo_ids_is_refused_on_every_route(hub_env, bob_secret, template):
    bad = template.format(alice=hub_env.user, bob=hub_env.other_user, name=bob_secret)
    token = hub_env.token  # alice, who may write her own namespace
    for method, path in [
        ("GET", f"/api/models/{bad}"),
        ("GET", f"/api/models/{bad}/tree/main"),
        ("GET", f"/{bad}/resolve/main/secret.txt"),
        ("GET", f"/api/models/{bad}/refs"),
        ("GET", f"/api/models/{bad}/commits/main"),
    ]:
        status, _, body = request(hub_env.url, method, path, token=token)
        assert status == 400 and "Invalid repo id" in body["error"], (path, status, body)
    status, body = commit(hub_env.url, bad, token, "pwn", EVIL)
    assert status == 400 and "Invalid repo id" in body["error"]
    status, _, body = request(hub_env.url, "POST", f"/api/models/{bad}/branch/x", token=token, body=b"{}")
    assert status == 400
    # Bob's file is untouched and still his alone.
    bob = HfApi(endpoint=hub_env.url, token=hub_env.other_token)
    repo_id = f"{hub_env.other_user}/{bob_secret}"
    assert bob.list_repo_files(repo_id) == [".gitattributes", "secret.txt"]
    assert len(bob.list_repo_commits(repo_id)) == 2


@pytest.mark.parametrize("name", ["../{bob}/{name}", "..%2F{bob}%2F{name}", "x/../../{bob}/{name}", ".."])
def test_delete_and_create_with_a_traversing_name_are_refused(hub_env, bob_secret, name):
    name = name.format(bob=hub_env.other_user, name=bob_secret)
    body = json.dumps({"organization": hub_env.user, "name": name}).encode()
    status, _, answer = request(hub_env.url, "DELETE", "/api/repos/delete", token=hub_env.token, body=body)
    assert status == 400 and "Invalid repo id" in answer["error"]
    status, _, answer = request(hub_env.url, "POST", "/api/repos/create", token=hub_env.token, body=body)
    assert status == 400
    bob = HfApi(endpoint=hub_env.url, token=hub_env.other_token)
    assert bob.repo_exists(f"{hub_env.other_user}/{bob_secret}")


def test_cross_user_read_write_and_delete_are_refused(hub_env, bob_secret):
    alice = hub_env.api
    bob_private = f"{hub_env.other_user}/{bob_secret}"
    with pytest.raises(RepositoryNotFoundError):
        alice.model_info(bob_private)
    status, _, _ = request(hub_env.url, "GET", f"/{bob_private}/resolve/main/secret.txt", token=hub_env.token)
    assert status == 404
    status, _ = commit(hub_env.url, bob_private, hub_env.token, "pwn", EVIL)
    assert status == 404  # private: alice cannot even learn that it exists
    body = json.dumps({"organization": hub_env.other_user, "name": bob_secret}).encode()
    status, _, _ = request(hub_env.url, "DELETE", "/api/repos/delete", token=hub_env.token, body=body)
    assert status == 404

    bob = HfApi(endpoint=hub_env.url, token=hub_env.other_token)
    bob_public = hub_env.new_repo_id("public", namespace=hub_env.other_user)
    bob.create_repo(bob_public)
    with pytest.raises(HfHubHTTPError) as exc:
        alice.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=bob_public)
    assert exc.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as exc:
        alice.delete_repo(bob_public)
    assert exc.value.response.status_code == 403
    assert bob.repo_exists(bob_public) and bob.list_repo_files(bob_private) == [
        ".gitattributes",
        "secret.txt",
    ]


@pytest.mark.parametrize(
    "oid", ["../../../../etc/hostname", "/etc/hostname", "A" * 64, "0" * 63, "0" * 64 + "/x", "", None, 7]
)
def test_lfs_object_ids_must_be_sha256(hub_env, oid):
    repo_id = hub_env.new_repo_id("public")
    hub_env.api.create_repo(repo_id)
    link = {"key": "lfsFile", "value": {"path": "host.txt", "oid": oid, "algo": "sha256"}}
    status, body = commit(hub_env.url, repo_id, hub_env.token, "link a host file", link)
    assert status == 422 and "Invalid LFS object id" in body["error"]
    status, _, _ = request(hub_env.url, "GET", f"/{repo_id}/resolve/main/host.txt")
    assert status == 404
    # verify would otherwise say whether any file exists and its size; batch would hand out an upload ticket
    verify = json.dumps({"oid": oid, "size": 10}).encode()
    status, _, body = request(
        hub_env.url, "POST", f"/{repo_id}.git/info/lfs/objects/verify", token=hub_env.token, body=verify
    )
    assert status == 422
    batch = json.dumps({"operation": "upload", "objects": [{"oid": oid, "size": 1}]}).encode()
    status, _, body = request(
        hub_env.url, "POST", f"/{repo_id}.git/info/lfs/objects/batch", token=hub_env.token, body=batch
    )
    assert status == 422


def test_a_valid_oid_only_names_a_blob_of_the_same_repo(hub_env, tmp_path):
    """Bob's LFS blob (a real sha256) cannot be linked into alice's repo by its oid."""
    import hashlib

    bob = HfApi(endpoint=hub_env.url, token=hub_env.other_token)
    bob_repo = hub_env.new_repo_id("lfs", namespace=hub_env.other_user)
    bob.create_repo(bob_repo, private=True)
    data = b"bob's weights" * 10
    (tmp_path / "w.safetensors").write_bytes(data)
    bob.upload_file(
        path_or_fileobj=tmp_path / "w.safetensors", path_in_repo="w.safetensors", repo_id=bob_repo
    )
    oid = hashlib.sha256(data).hexdigest()
    alice_repo = hub_env.new_repo_id("steal")
    hub_env.api.create_repo(alice_repo)
    link = {"key": "lfsFile", "value": {"path": "w.safetensors", "oid": oid, "algo": "sha256"}}
    status, body = commit(hub_env.url, alice_repo, hub_env.token, "steal", link)
    assert status == 422 and "was not uploaded to this repo" in body["error"]


def raw_headers_only(url: str, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict, float]:
    """Send a request's line and headers but none of the body it announces; return the answer's status, headers
    and how long it took. A server that waited for the body would time out here."""
    split = urlsplit(url)
    start = time.perf_counter()
    with socket.create_connection((split.hostname, split.port), timeout=5) as sock:
        lines = [
            f"{method} {path} HTTP/1.1",
            f"Host: {split.hostname}",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sock.sendall(b"x" * 1000)  # a little of the body, not all of it
        response = http.client.HTTPResponse(sock)
        response.begin()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, time.perf_counter() - start


BIG = str(400_000_000)


@pytest.mark.parametrize(
    "method, path, headers, status",
    [
        ("POST", "/api/repos/create", {"Content-Length": BIG}, 401),  # anonymous on a route that needs a user
        ("POST", "/api/repos/create", {"Content-Length": BIG, "Authorization": "Bearer hf_wrong"}, 401),
        ("POST", "/api/validate-yaml", {"Content-Length": BIG}, 413),  # anonymous allowed, but small
        ("POST", "/api/models/alice/x/paths-info/main", {"Content-Length": BIG}, 413),
        ("PUT", "/_lfs_upload/" + "0" * 32, {"Content-Length": BIG}, 403),  # no such ticket
        ("POST", "/api/models/alice/x/commit/main", {"Transfer-Encoding": "chunked"}, 401),
        ("POST", "/api/nowhere", {"Content-Length": BIG}, 404),
    ],
)
def test_large_bodies_are_refused_before_they_are_read(hub_env, method, path, headers, status):
    got, answer_headers, seconds = raw_headers_only(hub_env.url, method, path, headers)
    assert got == status
    assert answer_headers["connection"] == "close"  # the unread body must not be parsed as a next request
    assert seconds < 3


def test_body_caps_for_authenticated_and_chunked_requests(tmp_path):
    with HubServer(tmp_path / "hub", {"tok": "carol"}, max_body_size=4096) as server:
        api = HfApi(endpoint=server.url, token="tok")
        api.create_repo("carol/r")
        got, _, _ = raw_headers_only(
            server.url,
            "POST",
            "/api/models/carol/r/commit/main",
            {"Content-Length": "5000", "Authorization": "Bearer tok"},
        )
        assert got == 413
        # A chunked body is counted as it arrives and cut off at the cap.
        split = urlsplit(server.url)
        with socket.create_connection((split.hostname, split.port), timeout=5) as sock:
            sock.sendall(
                b"POST /api/validate-yaml HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"".join(b"%x\r\n%s\r\n" % (60000, b"a" * 60000) for _ in range(20))
            )
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.status == 413
        # Within the caps everything still works, and a wrong-sized LFS upload is refused unread.
        assert api.upload_file(path_or_fileobj=b"small", path_in_repo="s.txt", repo_id="carol/r")

        def batch(size: int):
            objects = [{"oid": "a" * 64, "size": size}]
            body = json.dumps({"operation": "upload", "objects": objects}).encode()
            return request(server.url, "POST", "/carol/r.git/info/lfs/objects/batch", token="tok", body=body)

        status, _, body = batch(10)
        assert status == 200
        href = body["objects"][0]["actions"]["upload"]["href"]
        got, _, _ = raw_headers_only(server.url, "PUT", urlsplit(href).path, {"Content-Length": "11"})
        assert got == 413
        status, _, body = batch(5000)
        assert status == 422 and "size must be an integer" in body["error"]


@pytest.mark.parametrize(
    "body", [b"not json", b"[1, 2]", b"\n".join([b'{"key": "header", "value": {}}', b'"x"']), b'{"key": 1}']
)
def test_malformed_commit_bodies_are_400_not_500(hub_env, body):
    repo_id = hub_env.new_repo_id()
    hub_env.api.create_repo(repo_id)
    status, _, answer = request(
        hub_env.url, "POST", f"/api/models/{repo_id}/commit/main", token=hub_env.token, body=body
    )
    assert status == 400, answer
