"""Benchmark: one real master and hundreds of pupil nodes on one machine, on a private broker.

For each node count: start a private RabbitMQ node, the real master in its own process
(bench/scale_master.py: MasterService, its SQLite store, the fast backend), and the nodes spread
over a few worker processes (bench/scale_pupils.py: each node has its own consumer connection and
queue and its own confirming publisher, and acks a lesson only after its report is confirmed).
The master waits for every node's hello, publishes the lessons, and the run ends when the store
holds a report for every (lesson, node) pair or the timeout passes. Then it prints:

- whether every report arrived exactly once (the store's distinct pairs and its ``deliveries``);
- lessons/s (fan-out deliveries to pupils) and reports/s (stored by the master), both over the
  time from the first lesson's creation to the last report stored (resp. delivered);
- end-to-end latency, lesson created (just before its publish) -> report stored, p50/p99;
- the master's ingestion lag, report created by the pupil -> stored, p50/p99, and the reports
  queue's largest depth (sampled every 0.5 s with a passive queue.declare);
- the CPU of the master, the broker and the workers, in % of one core (user + sys, /proc).

    .venv/bin/python bench/scale.py                         # 200 nodes x 10 lessons
    .venv/bin/python bench/scale.py --nodes 1000 --mode loop --workers 2   # event-loop nodes
    .venv/bin/python bench/scale.py --nodes 200 1000 --mode loop  # one run per count, fresh broker
    .venv/bin/python bench/scale.py --mode real --nodes 20  # the real PupilService + PupilNode

The broker and the master run on the first half of the CPUs, the nodes on the rest (``--no-pin``
shares them all). ``--master-prefetch 1`` shows the master before docs/scale.md's fix;
``--profile`` samples the master with py-spy.

Figures, not a test: docs/scale.md holds measured tables and what broke first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import pika
import pika.exceptions as pex

from distill_swarm.local_broker import LocalBroker
from shared.topology import Topology

BENCH = Path(__file__).resolve().parent
SAMPLE_INTERVAL_S = 0.5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
# After SIGTERM, how long a worker may take to stop its nodes and write its ledger.
STOP_TIMEOUT_S = 120.0


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


class Sampler:
    """A thread that samples CPU, memory, queue depths and the store until stopped."""

    def __init__(
        self, run: Run, broker_session: int, topology: Topology, url: str, store: Path
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


# -- the processes of one run ----------------------------------------------------------------


@dataclass
class Run:
    """The master and worker processes of one run; ``close`` ends whatever is still running."""

    workdir: Path
    master: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        """Start ``python bench/<args>``, its output in ``<workdir>/<name>.log``."""
        with (self.workdir / f"{name}.log").open("wb") as log:
            return subprocess.Popen(
                [sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, cwd=BENCH.parent
            )

    def close(self) -> None:
        """SIGTERM every live process, then SIGKILL what has not exited in time."""
        processes = [*self.workers, *([self.master] if self.master else [])]
        for proc in processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Config:
    """One run's parameters."""

    nodes: int
    lessons: int
    workers: int
    mode: str
    master_prefetch: int | None
    heartbeat_interval_s: float
    timeout_s: float
    profile: bool = False
    worker_cpus: tuple[int, ...] = ()


def run_once(cfg: Config, workdir: Path) -> dict[str, Any]:
    """Run one swarm on a private broker; return its figures (see :func:`analyse`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    namespace = f"scale{uuid.uuid4().hex[:8]}"
    topology = Topology(namespace)
    store = workdir / "master.sqlite3"
    run = Run(workdir)
    with LocalBroker() as broker:
        assert broker._process is not None  # started by __enter__
        broker_session = broker._process.pid  # start_new_session: its pid is the session id
        master_args = [
            str(BENCH / "scale_master.py"),
            f"--url={broker.url}",
            f"--namespace={namespace}",
            f"--store={store}",
            f"--nodes={cfg.nodes}",
            f"--lessons={cfg.lessons}",
        ]
        if cfg.master_prefetch is not None:
            master_args.append(f"--prefetch={cfg.master_prefetch}")
        sampler = Sampler(run, broker_session, topology, broker.url, store)
        started = time.time()
        try:
            run.master = run.spawn("master", master_args)
            sampler.start()
            # Hellos are soft state, published non-mandatory: sent before the master declared its
            # control queue, they are dropped and only the next heartbeat (30 s later) counts.
            wait_for_master(run, sampler)
            per_worker = -(-cfg.nodes // cfg.workers)
            for w in range(cfg.workers):
                first, count = w * per_worker, min(per_worker, cfg.nodes - w * per_worker)
                if count <= 0:
                    break
                worker_args = [
                    str(BENCH / "scale_pupils.py"),
                    f"--url={broker.url}",
                    f"--namespace={namespace}",
                    f"--mode={cfg.mode}",
                    f"--first={first}",
                    f"--count={count}",
                    f"--heartbeat-interval-s={cfg.heartbeat_interval_s}",
                    f"--state-dir={workdir / 'state'}",
                    f"--results={workdir / f'worker{w}.json'}",
                ]
                if cfg.worker_cpus:
                    worker_args.append(f"--cpus={','.join(map(str, cfg.worker_cpus))}")
                run.workers.append(run.spawn(f"worker{w}", worker_args))
            profiler = start_profiler(run, workdir) if cfg.profile else None
            outcome = wait_for_reports(cfg, run, sampler)
            sampler.stop()
            if profiler is not None:
                stop_profiler(profiler)
            for proc in run.workers:
                proc.send_signal(signal.SIGTERM)
            ledgers = collect_ledgers(workdir, len(run.workers))
        finally:
            sampler.stop()
            run.close()
        broker_log = (broker._dir / "server.log").read_text(errors="replace")
    figures = analyse(cfg, store, sampler.samples, ledgers, started)
    figures["outcome"] = outcome
    if cfg.profile:
        figures["master_profile"] = profile_summary(workdir / "master-profile.txt")
    figures["samples"] = [asdict(sample) for sample in sampler.samples]
    figures["broker_alarms"] = [
        line for line in broker_log.splitlines() if "alarm" in line.lower()
    ][:5]
    figures["log_problems"] = log_problems(workdir)
    return figures


def start_profiler(run: Run, workdir: Path) -> subprocess.Popen[bytes]:
    """Sample the master's stacks with py-spy (idle frames too) until :func:`stop_profiler`."""
    assert run.master is not None
    py_spy = Path(sys.executable).with_name("py-spy")
    args = [str(py_spy), "record", "--idle", "--threads", "--nonblocking", "--format", "raw"]
    args += ["--rate", str(PROFILE_RATE_HZ)]
    args += ["--pid", str(run.master.pid), "--output", str(workdir / "master-profile.txt")]
    with (workdir / "py-spy.log").open("wb") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)


def stop_profiler(profiler: subprocess.Popen[bytes]) -> None:
    """Stop py-spy; it writes its samples on SIGINT."""
    profiler.send_signal(signal.SIGINT)
    try:
        profiler.wait(timeout=30)
    except subprocess.TimeoutExpired:
        profiler.kill()
        profiler.wait()


PROFILE_RATE_HZ = 200
# Where the master's report worker thread spends its busy time, by a frame its stack contains.
PROFILE_BUCKETS = (
    ("store.add_report (SQLite)", "Store.add_report"),
    ("decode (pydantic)", "decode (shared/messages.py"),
    ("metrics.record_report", "MasterMetrics.record_report"),
    ("logging", "Logger.info"),
    ("handle, other", "MasterService.handle"),
    ("scheduling the ack", "Consumer._schedule"),
)


def profile_summary(path: Path) -> dict[str, float]:
    """CPU seconds of the master's report worker thread in each of PROFILE_BUCKETS.

    The jobs consumer has a worker thread of the same shape, so the report worker is found as
    the thread (py-spy's ``--threads`` frame) whose stacks run ``MasterService.handle``. Idle
    samples (waiting for a delivery) are left out: compare the total with the run's duration.
    """
    if not path.exists():
        return {}
    stacks: dict[str, list[tuple[str, int]]] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread = stack.split(";", 2)[1] if stack.count(";") >= 2 else ""
        if count.isdigit() and "Consumer._work_loop" in stack:
            stacks.setdefault(thread, []).append((stack, int(count)))
    workers = [t for t, s in stacks.items() if any("MasterService.handle" in x for x, _ in s)]
    if not workers:
        return {}
    counts = dict.fromkeys([b for b, _ in PROFILE_BUCKETS], 0)
    for stack, n in stacks[workers[0]]:
        bucket = next((b for b, marker in PROFILE_BUCKETS if marker in stack), None)
        if bucket is not None:
            counts[bucket] += n
    return {b: round(c / PROFILE_RATE_HZ, 2) for b, c in counts.items()}


def wait_for_master(run: Run, sampler: Sampler, timeout_s: float = 120.0) -> None:
    """Wait until the master has declared its queues (its control queue exists)."""
    deadline = time.monotonic() + timeout_s
    while (sample := sampler.latest()) is None or sample.control_depth is None:
        if run.master is not None and run.master.poll() is not None:
            raise RuntimeError(f"the master exited with code {run.master.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the master declared no queues within {timeout_s:.0f}s")
        time.sleep(0.1)


def wait_for_reports(cfg: Config, run: Run, sampler: Sampler) -> str:
    """Wait until every report is stored; 'complete', 'timeout' or what died."""
    want = cfg.nodes * cfg.lessons
    deadline = time.monotonic() + cfg.timeout_s
    step = max(1, want // 10)
    next_progress = step
    while time.monotonic() < deadline:
        time.sleep(SAMPLE_INTERVAL_S)
        sample = sampler.latest()
        stored = 0 if sample is None else sample.stored
        if stored >= want:
            return "complete"
        if run.master is not None and run.master.poll() is not None:
            return f"master exited with code {run.master.returncode}"
        dead = [i for i, w in enumerate(run.workers) if w.poll() is not None]
        if dead:
            return f"worker(s) {dead} exited"
        if stored >= next_progress:
            print(f"  {stored}/{want} reports stored", file=sys.stderr, flush=True)
            next_progress = (stored // step + 1) * step
    return "timeout"


def collect_ledgers(workdir: Path, workers: int) -> list[dict[str, Any]]:
    """Each worker's ledger, waiting for workers still writing theirs."""
    out = []
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for w in range(workers):
        path = workdir / f"worker{w}.json"
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if path.exists():
            out.append(json.loads(path.read_text()))
    return out


def log_problems(workdir: Path) -> dict[str, list[str]]:
    """Distinct WARNING/ERROR messages per log (timestamps cut), at most five each."""
    out: dict[str, list[str]] = {}
    for log in sorted(workdir.glob("*.log")):
        seen: dict[str, None] = {}
        for line in log.read_text(errors="replace").splitlines():
            if " WARNING " in line or " ERROR " in line or "Traceback" in line:
                text = line.split(" ", 2)[-1][:200]
                seen.setdefault(text)
        if seen:
            out[log.stem] = [*list(seen)[:5], f"({len(seen)} distinct)"]
    return out


# -- analysis -------------------------------------------------------------------------------


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return float(statistics.quantiles(values, n=1000, method="inclusive")[round(q * 10) - 1])


def cpu_percent(samples: list[Sample], attr: str, t0: float, t1: float) -> float | None:
    """CPU of a process over [t0, t1] as % of one core, from the samples around that window."""
    points = [(s.t, getattr(s, attr)) for s in samples if getattr(s, attr) is not None]
    before = [p for p in points if p[0] <= t0] or points[:1]
    after = [p for p in points if p[0] >= t1] or points[-1:]
    if not before or not after or after[0][0] <= before[-1][0]:
        return None
    (ta, ca), (tb, cb) = before[-1], after[0]
    return 100.0 * (cb - ca) / (tb - ta)


def peak_cpu_percent(samples: list[Sample], attr: str, window_s: float = 2.0) -> float | None:
    """The highest CPU % of one core over any ``window_s`` stretch of samples."""
    points = [(s.t, getattr(s, attr)) for s in samples if getattr(s, attr) is not None]
    best = None
    j = 0
    for i in range(len(points)):
        while j < len(points) and points[j][0] - points[i][0] < window_s:
            j += 1
        if j < len(points):
            rate = 100.0 * (points[j][1] - points[i][1]) / (points[j][0] - points[i][0])
            best = rate if best is None else max(best, rate)
    return best


def analyse(
    cfg: Config,
    store: Path,
    samples: list[Sample],
    ledgers: list[dict[str, Any]],
    started: float,
) -> dict[str, Any]:
    """Every figure of one run from the master's store, the samples and the workers' ledgers."""
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
        lessons = {
            lesson_id: _epoch(json.loads(body)["created_at"])
            for lesson_id, body in db.execute("SELECT lesson_id, body FROM lessons")
        }
        published = [
            _epoch(p)
            for (p,) in db.execute("SELECT published_at FROM lessons WHERE published_at NOT NULL")
        ]
        rows = db.execute("SELECT lesson_id, node_id, deliveries, received_at, body FROM reports")
        reports = [
            (lesson_id, node, deliveries, _epoch(at), _epoch(json.loads(body)["created_at"]))
            for lesson_id, node, deliveries, at, body in rows
        ]
    nodes = {n: led for ledger in ledgers for n, led in ledger["nodes"].items()}
    received = [t for led in nodes.values() for t in led["received"].values()]
    confirmed = [t for led in nodes.values() for t in led["confirmed"].values()]
    t0 = min(lessons.values()) if lessons else started
    stored_at = [r[3] for r in reports]
    t_end = max(stored_at) if stored_at else t0
    e2e = [r[3] - lessons[r[0]] for r in reports if r[0] in lessons]
    lag = [r[3] - r[4] for r in reports]
    depths = [s.reports_depth for s in samples if s.reports_depth is not None]
    connected = [ledger["connected"] for ledger in ledgers]
    ms = 1000.0
    return {
        "config": asdict(cfg),
        "expected_reports": cfg.nodes * cfg.lessons,
        "lessons_published": len(published),
        "nodes_started": len(nodes),
        "start_failures": sum(len(ledger["start_failures"]) for ledger in ledgers),
        "reports_stored": len(reports),
        "duplicate_deliveries": sum(r[2] - 1 for r in reports),
        "lesson_redeliveries": sum(led["redelivered"] for led in nodes.values()),
        "lessons_received": len(received),
        "reports_confirmed": len(confirmed),
        "setup_s": t0 - started,
        "nodes_connected_s": (max(connected) - started) if connected else None,
        "run_s": t_end - t0,
        "lessons_per_s": len(received) / (max(received) - t0) if received else None,
        "reports_sent_per_s": len(confirmed) / (max(confirmed) - t0) if confirmed else None,
        "reports_per_s": len(reports) / (t_end - t0) if t_end > t0 else None,
        "e2e_p50_ms": _scaled(percentile(e2e, 50), ms),
        "e2e_p99_ms": _scaled(percentile(e2e, 99), ms),
        "e2e_max_ms": _scaled(max(e2e, default=None), ms),
        "lag_p50_ms": _scaled(percentile(lag, 50), ms),
        "lag_p99_ms": _scaled(percentile(lag, 99), ms),
        "lag_max_ms": _scaled(max(lag, default=None), ms),
        "reports_depth_max": max(depths, default=None),
        "reports_depth_end": depths[-1] if depths else None,
        "master_cpu_pct": cpu_percent(samples, "master_cpu_s", t0, t_end),
        "master_cpu_peak_pct": peak_cpu_percent(samples, "master_cpu_s"),
        "broker_cpu_pct": cpu_percent(samples, "broker_cpu_s", t0, t_end),
        "workers_cpu_pct": cpu_percent(samples, "workers_cpu_s", t0, t_end),
        "broker_rss_max_mb": max((s.broker_rss_mb for s in samples), default=None),
    }


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


# -- output ---------------------------------------------------------------------------------

COLUMNS = (
    ("nodes", "nodes", "{:.0f}"),
    ("stored/expected", None, ""),
    ("dup", "duplicate_deliveries", "{:.0f}"),
    ("lessons/s", "lessons_per_s", "{:.0f}"),
    ("reports/s", "reports_per_s", "{:.0f}"),
    ("e2e p50 ms", "e2e_p50_ms", "{:.0f}"),
    ("e2e p99 ms", "e2e_p99_ms", "{:.0f}"),
    ("lag p99 ms", "lag_p99_ms", "{:.0f}"),
    ("max queue", "reports_depth_max", "{:.0f}"),
    ("master CPU %", "master_cpu_pct", "{:.0f}"),
    ("broker CPU %", "broker_cpu_pct", "{:.0f}"),
    ("setup s", "setup_s", "{:.0f}"),
)


def cells(figures: dict[str, Any]) -> list[str]:
    """One table row."""
    out = []
    for _, key, fmt in COLUMNS:
        if key is None:
            out.append(f"{figures['reports_stored']}/{figures['expected_reports']}")
        elif key == "nodes":
            out.append(str(figures["config"]["nodes"]))
        else:
            value = figures.get(key)
            out.append("-" if value is None else fmt.format(value))
    return out


def format_table(rows: list[list[str]]) -> str:
    """A plain-text table, numbers right-aligned."""
    header = [c[0] for c in COLUMNS]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))

    return "\n".join([line(header), "-" * len(line(header)), *(line(r) for r in rows)])


def describe(figures: dict[str, Any]) -> str:
    """What the table leaves out: exactly-once checks, CPU, memory, warnings."""
    f = figures
    once = (
        f["reports_stored"] == f["expected_reports"]
        and f["duplicate_deliveries"] == 0
        and f["lesson_redeliveries"] == 0
    )
    lines = [
        f"{f['config']['nodes']} nodes x {f['config']['lessons']} lessons ({f['config']['mode']}): "
        f"{f['outcome']}; every report exactly once: {'yes' if once else 'NO'} "
        f"(stored {f['reports_stored']}/{f['expected_reports']}, duplicate deliveries "
        f"{f['duplicate_deliveries']}, lesson redeliveries {f['lesson_redeliveries']}, "
        f"nodes started {f['nodes_started']}, start failures {f['start_failures']})",
        f"  run {f['run_s']:.1f}s after {f['setup_s']:.1f}s of set-up; reports sent "
        f"{_fmt(f['reports_sent_per_s'])}/s vs stored {_fmt(f['reports_per_s'])}/s; "
        f"lag p50/p99/max {_fmt(f['lag_p50_ms'])}/{_fmt(f['lag_p99_ms'])}/"
        f"{_fmt(f['lag_max_ms'])} ms; reports queue max {f['reports_depth_max']}, "
        f"at the end {f['reports_depth_end']}",
        f"  CPU (% of one core): master {_fmt(f['master_cpu_pct'])} (peak "
        f"{_fmt(f['master_cpu_peak_pct'])}), broker {_fmt(f['broker_cpu_pct'])}, workers "
        f"{_fmt(f['workers_cpu_pct'])}; broker RSS max {_fmt(f['broker_rss_max_mb'])} MB",
    ]
    if f.get("master_profile"):
        busy = sum(f["master_profile"].values())
        shares = ", ".join(f"{k} {v:.2f}" for k, v in f["master_profile"].items())
        lines.append(
            f"  master's report worker thread (py-spy): busy {busy:.2f}s of the {f['run_s']:.1f}s "
            f"run; {shares} (s)"
        )
    for alarm in f["broker_alarms"]:
        lines.append(f"  broker: {alarm}")
    for name, problems in f["log_problems"].items():
        lines.append(f"  {name}: " + " | ".join(problems))
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


# -- main -----------------------------------------------------------------------------------


def pin_cpus() -> tuple[int, ...]:
    """Split the CPUs: this process (so the broker and the master it starts) gets the first half,
    the workers the rest; returns the workers' CPUs, or () on a machine with one CPU.

    Thousands of simulated-node threads would otherwise take the master's CPU: the scheduler
    shares CPU per thread, so the master's two busy threads get a sliver of it however the
    workers are niced, and its queue grows while it sits runnable (docs/scale.md). In a real
    swarm every pupil has a machine of its own; here the swarm gets its own CPUs instead.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return ()
    half = len(cpus) // 2
    os.sched_setaffinity(0, set(cpus[:half]))
    return tuple(cpus[half:])


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    """Run each node count; print the table; write the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, nargs="+", default=[200])
    parser.add_argument("--lessons", type=int, default=10)
    parser.add_argument("--workers", type=int, default=4, help="pupil worker processes")
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="let the workers share every CPU with the master and the broker (default: split)",
    )
    parser.add_argument("--mode", choices=("sim", "loop", "real"), default="sim")
    parser.add_argument(
        "--master-prefetch", type=int, help="master.prefetch (default: the project's default)"
    )
    parser.add_argument("--heartbeat-interval-s", type=float, default=30.0)
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per run, after set-up")
    parser.add_argument("--workdir", type=Path, help="logs, stores, JSON (default: temp)")
    parser.add_argument(
        "--profile", action="store_true", help="sample the master with py-spy (must be installed)"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _raise_interrupt)  # clean up as on Ctrl-C
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="distill-swarm-scale-"))
    worker_cpus = pin_cpus() if args.pin else ()
    results = []
    for nodes in args.nodes:
        cfg = Config(
            nodes=nodes,
            lessons=args.lessons,
            workers=min(args.workers, nodes),
            mode=args.mode,
            master_prefetch=args.master_prefetch,
            heartbeat_interval_s=args.heartbeat_interval_s,
            timeout_s=args.timeout_s,
            profile=args.profile,
            worker_cpus=worker_cpus,
        )
        print(f"running {nodes} nodes x {args.lessons} lessons ...", file=sys.stderr, flush=True)
        try:
            figures = run_once(cfg, workdir / f"n{nodes}")
        except KeyboardInterrupt:
            print("interrupted: broker and workers stopped", file=sys.stderr)
            return 130
        results.append(figures)
        print(describe(figures), file=sys.stderr, flush=True)
    print(format_table([cells(f) for f in results]))
    (workdir / "scale.json").write_text(json.dumps(results, indent=2))
    print(f"figures and logs in {workdir}", file=sys.stderr)
    complete = all(f["outcome"] == "complete" for f in results)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
