"""A loopback Hugging Face Hub-compatible server: the test suite's Hub, and the one `deltahub demo` starts.

``HubServer(root, {token: user}).start()`` serves ``.url``; ``python -m deltahub.demo.localhub --port 0 --root DIR
--token T:user`` runs it standalone (the URL is the first line on stdout). See ``server.py`` for what it serves.
"""

from .server import HubServer, main

__all__ = ["HubServer", "main"]
