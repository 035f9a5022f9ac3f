"""Starting real multi-process runs from tests: two processes on this machine, one thread each."""

from __future__ import annotations

import os
import subprocess
import sys

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def two_processes(command: list, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``command`` (a launcher's argv, e.g. ``[*TORCHRUN, script, ...]``) to completion, capturing output.
    One OpenMP thread per process: two ranks on a shared 2-core machine must not oversubscribe it."""
    return subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
