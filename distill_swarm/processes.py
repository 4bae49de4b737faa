"""Stopping child processes: the demo, the tests and the benchmarks all stop theirs this way."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterable
from typing import Any

STOP_TIMEOUT_S = 30.0


def stop_processes(
    processes: Iterable[subprocess.Popen[Any]],
    timeout_s: float = STOP_TIMEOUT_S,
    sig: signal.Signals | None = signal.SIGTERM,
) -> None:
    """Send ``sig`` to every process still running, then wait; kill what outlasts ``timeout_s``.

    The processes stop side by side, so ``timeout_s`` bounds the whole wait, not each process.
    ``sig=None`` waits only: the processes were asked to stop another way (``rabbitmqctl stop``).
    ``signal.SIGKILL`` ends them at once. Every process has exited when this returns.
    """
    processes = list(processes)
    if sig is not None:
        for proc in processes:
            if proc.poll() is None:
                proc.send_signal(sig)
    deadline = time.monotonic() + timeout_s
    for proc in processes:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
