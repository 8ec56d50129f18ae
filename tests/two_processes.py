"""Running a test file as two torch.distributed processes on the CPU (gloo)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest


def run_two_processes(script: str, *args: str, timeout: float = 180) -> None:
    """``torchrun --nproc_per_node 2 script *args``; fails the test if it fails or hangs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *args]
    # own session, so a hang kills the launcher and both workers, not the launcher alone
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout:g} s:\n" + stdout[-2000:] + stderr[-2000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
