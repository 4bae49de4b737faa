"""The figures of one bench/scale.py run, from the master's store, the samples and the
workers' ledgers, and how they are printed."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import format_table, percentile
from scale_probes import Sample

if TYPE_CHECKING:
    from scale import Config

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


def table(results: list[dict[str, Any]]) -> str:
    """The runs' figures as one plain-text table, a row per run."""
    return format_table([c[0] for c in COLUMNS], [cells(f) for f in results])


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
