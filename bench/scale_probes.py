"""What bench/scale.py measures while a run goes on: CPU and memory from /proc, queue depths,
and the master's store, sampled every SAMPLE_INTERVAL_S on a thread of its own."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pika
import pika.exceptions as pex

from shared.topology import Topology

SAMPLE_INTERVAL_S = 0.5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


# -- /proc ----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (after the command name), or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds the process has used, or None if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def session_pids(session: int) -> list[int]:
    """Every live process of a session (the broker's scripts, beam.smp, epmd's helpers...)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[3]) == session:
                out.append(int(entry.name))
    return out


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (0 if it is gone)."""
    fields = _stat_fields(pid)
    return 0.0 if fields is None else int(fields[21]) * PAGE_BYTES / 1e6


# -- probes ---------------------------------------------------------------------------------


class QueueProbe:
    """Reads queue depths with passive declares on a connection of its own."""

    def __init__(self, url: str) -> None:
        self._connection = pika.BlockingConnection(pika.URLParameters(url))
        self._channel = self._connection.channel()

    def depth(self, queue: str) -> int | None:
        """Messages ready in ``queue``; None if it does not exist (yet)."""
        try:
            result = self._channel.queue_declare(queue, passive=True)
        except pex.ChannelClosedByBroker:
            self._channel = self._connection.channel()
            return None
        return int(result.method.message_count)

    def close(self) -> None:
        """Close the connection."""
        with contextlib.suppress(Exception):
            self._connection.close()


def stored_reports(store: Path) -> int:
    """How many distinct reports the master's store holds (0 before it exists)."""
    if not store.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
            return int(db.execute("SELECT COUNT(*) FROM reports").fetchone()[0])
    except sqlite3.Error:
        return 0


@dataclass
class Sample:
    """One look at the run, every SAMPLE_INTERVAL_S."""

    t: float
    master_cpu_s: float | None
    broker_cpu_s: float
    broker_rss_mb: float
    workers_cpu_s: float
    reports_depth: int | None
    control_depth: int | None
    stored: int


class Processes(Protocol):
    """The processes of a run, read afresh at each sample (they start while sampling runs)."""

    master: subprocess.Popen[bytes] | None
    workers: list[subprocess.Popen[bytes]]


class Sampler:
    """A thread that samples CPU, memory, queue depths and the store until stopped."""

    def __init__(
        self, run: Processes, broker_session: int, topology: Topology, url: str, store: Path
    ) -> None:
        self.samples: list[Sample] = []
        self._run = run
        self._session = broker_session
        self._topology = topology
        self._url = url
        self._store = store
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def start(self) -> None:
        """Start sampling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (after one last sample); a no-op if it never started."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def latest(self) -> Sample | None:
        """The newest sample."""
        return self.samples[-1] if self.samples else None

    def _loop(self) -> None:
        probe = QueueProbe(self._url)
        try:
            while True:
                self.samples.append(self._sample(probe))
                if self._stop.wait(SAMPLE_INTERVAL_S):
                    self.samples.append(self._sample(probe))
                    return
        finally:
            probe.close()

    def _sample(self, probe: QueueProbe) -> Sample:
        broker = session_pids(self._session)
        master = self._run.master
        return Sample(
            t=time.time(),
            master_cpu_s=None if master is None else cpu_s(master.pid),
            broker_cpu_s=sum(cpu_s(p) or 0.0 for p in broker),
            broker_rss_mb=sum(rss_mb(p) for p in broker),
            workers_cpu_s=sum(cpu_s(w.pid) or 0.0 for w in self._run.workers),
            reports_depth=probe.depth(self._topology.reports_queue),
            control_depth=probe.depth(self._topology.control_queue),
            stored=stored_reports(self._store),
        )
