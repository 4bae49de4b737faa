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

Figures, not a test: docs/scale.md holds measured tables and what broke first. This file runs
the processes; bench/scale_probes.py samples them, bench/scale_figures.py computes and prints the
figures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from scale_figures import PROFILE_RATE_HZ, analyse, describe, log_problems, profile_summary, table
from scale_probes import SAMPLE_INTERVAL_S, Sampler

from distill_swarm.local_broker import LocalBroker
from distill_swarm.processes import stop_processes
from shared.topology import Topology

BENCH = Path(__file__).resolve().parent
# After SIGTERM, how long a worker may take to stop its nodes and write its ledger.
STOP_TIMEOUT_S = 120.0


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
        stop_processes([*self.workers, *([self.master] if self.master else [])], STOP_TIMEOUT_S)


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
    stop_processes([profiler], sig=signal.SIGINT)


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
    print(table(results))
    (workdir / "scale.json").write_text(json.dumps(results, indent=2))
    print(f"figures and logs in {workdir}", file=sys.stderr)
    complete = all(f["outcome"] == "complete" for f in results)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
