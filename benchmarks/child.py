"""Measuring one command as a child process: wall time and peak RSS, shared by the benchmarks.

The launcher is a tiny interpreter of its own (``python -S``): a child's ru_maxrss includes the memory of the
process it was forked from (Linux records the old image's high-water mark at exec), so forking the commands
from a benchmark that holds torch would add ~0.35 GB to every figure (``cp`` would "use" 0.35 GB).
"""

from __future__ import annotations

import json
import subprocess
import sys

_LAUNCHER = """
import json, os, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = proc.stderr.read()
_, status, usage = os.wait4(proc.pid, 0)
sys.stderr.buffer.write(err[-3000:])
print(json.dumps({"wall": time.perf_counter() - t0, "rss": usage.ru_maxrss * 1024, "code": os.waitstatus_to_exitcode(status)}))
"""


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """``(wall seconds, peak RSS bytes)`` of ``cmd``; raises SystemExit with its stderr when it fails."""
    done = subprocess.run(
        [sys.executable, "-S", "-c", _LAUNCHER, *cmd], capture_output=True, text=True, env=env
    )
    if done.returncode != 0 or json.loads(done.stdout)["code"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    return result["wall"], result["rss"]
