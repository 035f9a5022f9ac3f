"""Shared pytest fixtures.

Hub fixtures (the server is deltahub/demo/localhub, which `deltahub demo` also starts): tests talk to a loopback
Hub-compatible server through the real `huggingface_hub` client over HTTP.

* ``_isolated_deltahub_cache`` (autouse): ``DELTAHUB_CACHE`` points at a temp folder shared by the session.
* ``_isolated_hf_cache`` (autouse): every HF cache, token and state file points at a fresh temp folder, telemetry is
  off, and no real token leaks in. No test touches ~/.cache/huggingface.
* ``hub_server`` (session): one `HubServer` on 127.0.0.1, repos in a temp folder. Users: ``HUB_USER`` (token
  ``HUB_TOKEN``, member of org ``HUB_ORG``) and ``HUB_OTHER_USER`` (token ``HUB_OTHER_TOKEN``).
* ``hub_env``: points the client at that server and returns a `HubEnv` (url, tokens, an `HfApi`, `new_repo_id()`).

Why constants are patched: huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE,
HF_HUB_DISABLE_XET, HF_HUB_DISABLE_TELEMETRY... once, at import, into `huggingface_hub.constants`, and reads those
module attributes at call time. So setting the env vars inside a test does nothing for this process; the fixtures
patch the constants (for this process) AND set the env vars (for subprocesses, e.g. a CLI run). Tests may still pass
``endpoint=`` / ``HfApi(endpoint=...)`` explicitly; with ``hub_env`` code that omits it reaches the same server, as it
would with HF_ENDPOINT set in a user's shell.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants

from deltahub.demo.localhub import HubServer

HUB_USER, HUB_TOKEN = "alice", "hf_test_alice_0123456789"
HUB_OTHER_USER, HUB_OTHER_TOKEN = "bob", "hf_test_bob_0123456789"
HUB_ORG = "deltahub-org"


def pytest_configure(config):
    # Triton's interpreter runs the GPU kernels on CPU tensors, but only if TRITON_INTERPRET is set before triton
    # is first imported (transformers imports it with its models, at collection). Where there is a GPU, the
    # cuda tier runs the compiled kernels instead and the interpreter stays off.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Run Triton kernels on CPU tensors through Triton's interpreter; skip where it cannot (triton missing, or
    a GPU machine, where the cuda tier runs the compiled kernels)."""
    from training import sddmm

    problem = sddmm.triton_unavailable()
    if problem is None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        problem = sddmm.interpreter_problem()
    if problem:
        pytest.skip(f"the Triton kernel {problem}")


@pytest.fixture(autouse=True)
def _isolated_hf_cache(tmp_path_factory, monkeypatch):
    """Point every Hugging Face cache / token / state path at a per-test temp folder; disable telemetry."""
    home = tmp_path_factory.mktemp("hf_home")  # not inside tmp_path, which stays the test's own
    paths = {
        "HF_HOME": home,
        "HF_HUB_CACHE": home / "hub",
        "HUGGINGFACE_HUB_CACHE": home / "hub",
        "HF_ASSETS_CACHE": home / "assets",
        "HUGGINGFACE_ASSETS_CACHE": home / "assets",
        "HF_XET_CACHE": home / "xet",
        "HF_TOKEN_PATH": home / "token",
        "HF_STORED_TOKENS_PATH": home / "stored_tokens",
        "AGENT_HARNESSES_PATH": home / ".agent_harnesses.json",
        "CHECK_FOR_UPDATE_DONE_PATH": home / ".check_for_update_done",
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": home / ".check_for_skill_update_done",
    }
    for name, path in paths.items():
        monkeypatch.setattr(constants, name, str(path))
        if name.startswith("HF_") and name != "HF_STORED_TOKENS_PATH":
            monkeypatch.setenv(name, str(path))
    for module, name in [("huggingface_hub.utils._cache_manager", "HF_HUB_CACHE")]:  # imported by value there
        monkeypatch.setattr(f"{module}.{name}", str(paths[name]))
    # Telemetry off also stops the user-agent code from fetching {ENDPOINT}/api/agent-harnesses (a 3 s timeout
    # per process without internet) the first time it builds headers.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_UPDATE_CHECK", "1")
    for name in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_OIDC_RESOURCE",
        "TRANSFORMERS_CACHE",
        "XDG_CACHE_HOME",
    ):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture(scope="session")
def _deltahub_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("deltahub_cache")


@pytest.fixture(autouse=True)
def _isolated_deltahub_cache(_deltahub_cache, monkeypatch):
    """deltahub's own cache (the compiled kernel, the demo's converted model) in a temp folder for the session,
    never the user's ~/.cache/deltahub; one per session, so the kernel compiles once."""
    monkeypatch.setenv("DELTAHUB_CACHE", str(_deltahub_cache))
    return _deltahub_cache


@pytest.fixture(autouse=True)
def _progress_bars_back_on():
    """`--quiet` turns huggingface_hub's and transformers' bars off process-wide (as a CLI run should); an
    in-process CLI test must not leave them off for the tests after it."""
    yield
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    enable_progress_bars()
    hf_logging.enable_progress_bar()


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory):
    """One loopback Hub for the whole session. Tests share it: use `hub_env.new_repo_id()` for unique repos."""
    root = tmp_path_factory.mktemp("hub_server")
    server = HubServer(
        root, {HUB_TOKEN: HUB_USER, HUB_OTHER_TOKEN: HUB_OTHER_USER}, orgs={HUB_ORG: [HUB_USER]}
    )
    with server:
        yield server


@dataclass
class HubEnv:
    server: HubServer
    url: str
    user: str
    token: str
    other_user: str
    other_token: str
    org: str
    api: HfApi  # HfApi(endpoint=url, token=token)
    root: Path  # the server's storage folder

    def new_repo_id(self, name: str = "repo", namespace: str | None = None) -> str:
        """A repo id nobody used yet in this session (the server is shared by all tests)."""
        return f"{namespace or self.user}/{name}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def hub_env(hub_server, monkeypatch) -> HubEnv:
    """Point huggingface_hub at the loopback Hub, logged in as HUB_USER (HF_TOKEN), with Xet disabled.

    Xet is disabled because the server does not implement Xet storage: with hf_xet installed, the client would send
    every LFS file (e.g. *.safetensors, see the repo's default .gitattributes) through Xet, with no fallback. Without
    Xet it uses the LFS batch API the server implements. Pass ``token=False`` for anonymous calls.
    """
    url = hub_server.url
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return HubEnv(
        server=hub_server,
        url=url,
        user=HUB_USER,
        token=HUB_TOKEN,
        other_user=HUB_OTHER_USER,
        other_token=HUB_OTHER_TOKEN,
        org=HUB_ORG,
        api=HfApi(endpoint=url, token=HUB_TOKEN),
        root=hub_server.store.root,
    )
