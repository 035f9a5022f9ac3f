"""Loading untrusted deltas in a sandbox: one warm worker process forks a child per case, and the child loads the
case under a CPU-time cap, a wall-clock cap and an address-space cap, then reports what happened and what it
cost. A crash, a hang, a traceback or an allocation in proportion to a file's claims shows up as a failed case
instead of taking the test run (or the machine) down with it.

``Sandbox().load(path)`` returns an :class:`Outcome`. Run as a script, this module is the worker: it reads one
path per line on stdin and writes one JSON line per case on stdout.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CPU_LIMIT_S = 1.0  # CPU seconds one load may use (CPU, not wall: the CI machine is shared and noisy)
WALL_LIMIT_S = 10.0  # a load blocked on I/O (a FIFO) uses no CPU: this catches it
MEMORY_LIMIT = 100 * 2**20  # resident bytes one load may add
# The address-space cap is a backstop that turns a runaway allocation into a quick MemoryError in the child
# instead of swapping the machine; it sits above the resident limit because mapping a file or starting a
# thread reserves address space it never touches.
ADDRESS_SLACK = 512 * 2**20


@dataclass
class Outcome:
    kind: str  # "ok", "format_error", "exception", "cpu_timeout", "wall_timeout", "crashed"
    problems: list[str]
    message: str
    exc_type: str
    cpu_s: float
    rss_growth: int  # bytes of resident memory the load added (peak minus the level at fork)
    params: list[str]

    def describe(self) -> str:
        return (
            f"{self.kind} ({self.exc_type}) in {self.cpu_s:.2f} CPU s, +{self.rss_growth / 2**20:.1f} MB: "
            f"{self.message[:2000]}"
        )


class Sandbox:
    """A worker process (started once, torch imported once) that loads each case in a fresh fork."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        self._proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        ready = self._proc.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"fuzz sandbox worker did not start: {ready!r}")

    def load(self, path: Path) -> Outcome:
        self._proc.stdin.write(os.fspath(path) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError("fuzz sandbox worker died")
        return Outcome(**json.loads(line))

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


# ---- the worker ------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


SELFTEST = "!selftest:"  # a "path" that makes the child misbehave on purpose, to test the sandbox itself


def _misbehave(how: str) -> None:
    if how.startswith("block:"):  # what reading a FIFO the old way did: open() waits for a writer forever
        signal.setitimer(signal.ITIMER_REAL, 1.0)  # the wall limit, shortened so the self-test is quick
        with open(how[len("block:") :], "rb") as f:
            f.read()
    elif how == "spin":
        while True:
            pass
    elif how == "allocate":  # what a size check after the allocation did
        import torch

        torch.ones(2**30, dtype=torch.uint8)
    elif how == "grow":  # within the address-space cap, above the resident limit
        import torch

        torch.ones(MEMORY_LIMIT + 2**26, dtype=torch.uint8)
    elif how == "crash":
        os.kill(os.getpid(), signal.SIGKILL)


class _CpuTimeout(BaseException):
    pass


class _WallTimeout(BaseException):
    pass


def _child(path: str, out) -> None:
    import warnings

    import torch

    from deltahub import DeltaFormatError, ParamDelta
    from deltahub.format import load_delta

    start_rss = _rss_bytes()
    resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + MEMORY_LIMIT + ADDRESS_SLACK,) * 2)

    def on_cpu(*_):
        raise _CpuTimeout

    def on_wall(*_):
        raise _WallTimeout

    signal.signal(signal.SIGPROF, on_cpu)
    signal.signal(signal.SIGALRM, on_wall)
    t0 = time.process_time()
    signal.setitimer(signal.ITIMER_PROF, CPU_LIMIT_S)
    signal.setitimer(signal.ITIMER_REAL, WALL_LIMIT_S)
    result = {"kind": "ok", "problems": [], "message": "", "exc_type": "", "params": []}
    try:
        if path.startswith(SELFTEST):
            _misbehave(path[len(SELFTEST) :])
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                delta = load_delta(path)
            # A delta that loads must be valid: rebuild every parameter through the validating constructor.
            for p in delta.values():
                ParamDelta(p.indices, p.values, p.shape, p.dtype)
                assert torch.isfinite(p.values.float()).all()
            result["params"] = list(delta)
    except DeltaFormatError as err:
        result.update(
            kind="format_error", problems=err.problems, message=str(err), exc_type="DeltaFormatError"
        )
    except _CpuTimeout:
        result.update(kind="cpu_timeout", message=f"more than {CPU_LIMIT_S} CPU seconds", exc_type="timeout")
    except _WallTimeout:
        result.update(kind="wall_timeout", message="blocked past the wall-clock limit", exc_type="timeout")
    except BaseException as err:  # anything else is a finding, MemoryError included
        import traceback

        result.update(kind="exception", message=traceback.format_exc(), exc_type=type(err).__name__)
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.setitimer(signal.ITIMER_REAL, 0)
    result["cpu_s"] = time.process_time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    result["rss_growth"] = max(0, peak - start_rss)
    out.write(json.dumps(result) + "\n")
    out.flush()


def _worker() -> None:
    import torch

    torch.set_num_threads(1)  # before any fork: a child must not inherit a half-started thread pool
    import deltahub.format  # noqa: F401  (imported once here, inherited by every fork)

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        path = line.rstrip("\n")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            with os.fdopen(write, "w") as out:
                try:
                    _child(path, out)
                finally:
                    out.flush()
                    os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            report = f.read()
        _, status = os.waitpid(pid, 0)
        if not report:
            report = (
                json.dumps(
                    {
                        "kind": "crashed",
                        "problems": [],
                        "message": f"child exited with status {status} without a report",
                        "exc_type": "crash",
                        "cpu_s": 0.0,
                        "rss_growth": 0,
                        "params": [],
                    }
                )
                + "\n"
            )
        sys.stdout.write(report)
        sys.stdout.flush()


if __name__ == "__main__":
    _worker()
