"""Running a multi-process worker script as a test: a clean environment, a timeout, its output on failure."""

from __future__ import annotations

import os
import subprocess
import sys

# what a test runner launched by torchrun/Lightning may carry and a fresh launch must not inherit
_LAUNCHER_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_", "PL_", "RANK", "GROUP_RANK",
                       "LOCAL_WORLD_SIZE", "TORCHELASTIC")


def clean_environment() -> dict[str, str]:
    """``os.environ`` without the distributed launchers' variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_VARIABLES)}


def run_worker(worker: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """``python worker args...`` from the worker's folder; a non-zero exit or a hang (the timeout) fails the
    test with the worker's output."""
    proc = subprocess.run([sys.executable, worker, *args], cwd=os.path.dirname(worker), env=clean_environment(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
