"""Jobs in the master's SQLite store: every submitted job, its answer, and agreement samples.

A job's row moves through states, each move one conditional UPDATE, so two threads racing (a
pupil's result against the deadline, or a late pupil against the master) cannot both win:

    offloaded --(pupil answers)--------------------------> done
    offloaded --(deadline passes / pupil fails)--> master --(master answers)--> done | failed
    master (critical kind) ------------------------------> done | failed

The first answer stored is the one the submitter gets; whatever arrives later is only counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from master.store import Store
from shared.jobs import Fallback
from shared.messages import Job, JobResult

JOB_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    params TEXT NOT NULL,            -- JSON object
    submitted_at TEXT NOT NULL,
    deadline TEXT NOT NULL,
    state TEXT NOT NULL,             -- offloaded, master, done, failed
    reply_to TEXT,
    correlation_id TEXT,
    answered_by TEXT,                -- a node id or 'master'
    model TEXT,
    fallback TEXT,                   -- why the master answered a job it would have offloaded
    fallback_code TEXT,              -- the same as a shared.jobs.Fallback code
    output TEXT,
    error TEXT,
    elapsed_s REAL,                  -- submission to answer
    finished_at TEXT,
    result TEXT                      -- the JobResult sent to the submitter, as JSON
);
CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs (submitted_at);
CREATE TABLE IF NOT EXISTS job_samples (
    job_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    node_id TEXT NOT NULL,
    pupil_output TEXT NOT NULL,
    master_output TEXT NOT NULL,
    agreement REAL NOT NULL,         -- cos(E(pupil output), E(master output))
    sampled_at TEXT NOT NULL
);
"""

OPEN_STATES = ("offloaded", "master")

# A store from before fallback codes: add the column, and give the rows that have a fallback text
# the code that text was written for (each began with the code's words then).
_ADD_FALLBACK_CODE = """
ALTER TABLE jobs ADD COLUMN fallback_code TEXT;
UPDATE jobs SET fallback_code = CASE
    WHEN fallback = 'critical' THEN 'critical'
    WHEN fallback LIKE 'deadline:%' THEN 'deadline'
    WHEN fallback LIKE 'unroutable:%' THEN 'unroutable'
    ELSE 'pupil_failed' END
WHERE fallback IS NOT NULL;
"""


@dataclass(frozen=True)
class JobRow:
    """One job as stored."""

    job_id: str
    kind: str
    text: str
    params: dict[str, str]
    submitted_at: datetime
    deadline: datetime
    state: str
    reply_to: str | None
    correlation_id: str | None
    answered_by: str | None
    fallback: str | None
    fallback_code: Fallback | None
    output: str | None
    error: str | None
    elapsed_s: float | None
    agreement: float | None
    result: JobResult | None

    @property
    def open(self) -> bool:
        """True while nobody has answered the job yet."""
        return self.state in OPEN_STATES


class JobStore:
    """The jobs tables of a master :class:`Store` (same file, same per-thread connections)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        db = store.connection()
        db.executescript(JOB_SCHEMA)
        columns = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
        if "fallback_code" not in columns:
            db.executescript(_ADD_FALLBACK_CODE)

    def add(self, job: Job, state: str, reply_to: str | None, correlation_id: str | None) -> bool:
        """Store a newly submitted job; False if this job id is known already (a redelivery)."""
        with self._store.transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO jobs (job_id, kind, text, params, submitted_at, deadline, "
                "state, reply_to, correlation_id, fallback, fallback_code) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.job_id,
                    job.job_kind,
                    job.text,
                    json.dumps(job.params),
                    _now(),
                    job.deadline.isoformat(),
                    state,
                    reply_to,
                    correlation_id,
                    Fallback.CRITICAL.value if state == "master" else None,
                    Fallback.CRITICAL.value if state == "master" else None,
                ),
            )
            return cursor.rowcount == 1

    def to_master(self, job_id: str, code: Fallback, fallback: str) -> bool:
        """Move an offloaded job to the master with the reason; False if it is not offloaded."""
        with self._store.transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET state='master', fallback=?, fallback_code=? "
                "WHERE job_id=? AND state='offloaded'",
                (fallback, code.value, job_id),
            )
            return cursor.rowcount == 1

    def finish(self, result: JobResult) -> bool:
        """Store the answer (or error) if the job is still open; False if another came first."""
        state = "failed" if result.error is not None else "done"
        with self._store.transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET state=?, answered_by=?, model=?, output=?, error=?, elapsed_s=?, "
                "finished_at=?, result=?, fallback=?, "
                # A pupil's answer that wins after all carries no fallback, nor its code.
                "fallback_code = CASE WHEN ? IS NULL THEN NULL ELSE fallback_code END "
                "WHERE job_id=? AND state IN ('offloaded', 'master')",
                (
                    state,
                    result.answered_by,
                    result.model,
                    result.output,
                    result.error,
                    result.elapsed_s,
                    _now(),
                    result.model_dump_json(),
                    result.fallback,
                    result.fallback,
                    result.job_id,
                ),
            )
            return cursor.rowcount == 1

    def get(self, job_id: str) -> JobRow | None:
        """One job, or None."""
        rows = self._select("WHERE j.job_id=?", (job_id,))
        return rows[0] if rows else None

    def open_jobs(self) -> list[JobRow]:
        """Jobs nobody has answered yet, oldest first (what a restarted master picks up)."""
        return self._select("WHERE j.state IN ('offloaded', 'master') ORDER BY j.submitted_at")

    def recent(self, limit: int = 20, kind: str | None = None) -> list[JobRow]:
        """The latest ``limit`` jobs, newest first, optionally of one kind."""
        where = "WHERE j.kind=? " if kind else ""
        params: tuple[object, ...] = (kind, limit) if kind else (limit,)
        return self._select(where + "ORDER BY j.submitted_at DESC, j.rowid DESC LIMIT ?", params)

    def add_sample(
        self, job_id: str, kind: str, node_id: str, pupil: str, master: str, agreement: float
    ) -> None:
        """Record the master's own answer to an offloaded job and how well the two agree."""
        with self._store.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO job_samples VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, kind, node_id, pupil, master, agreement, _now()),
            )

    def agreement(self) -> list[tuple[str, str, int, float]]:
        """(kind, node, samples, mean agreement) for every kind and node sampled."""
        rows = (
            self._store.connection()
            .execute(
                "SELECT kind, node_id, COUNT(*) AS n, AVG(agreement) AS mean FROM job_samples "
                "GROUP BY kind, node_id ORDER BY kind, node_id"
            )
            .fetchall()
        )
        return [(r["kind"], r["node_id"], int(r["n"]), float(r["mean"])) for r in rows]

    def _select(self, tail: str, params: tuple[object, ...] = ()) -> list[JobRow]:
        rows = (
            self._store.connection()
            .execute(
                "SELECT j.*, s.agreement FROM jobs j LEFT JOIN job_samples s USING (job_id) "
                + tail,
                params,
            )
            .fetchall()
        )
        return [
            JobRow(
                job_id=r["job_id"],
                kind=r["kind"],
                text=r["text"],
                params=json.loads(r["params"]),
                submitted_at=datetime.fromisoformat(r["submitted_at"]),
                deadline=datetime.fromisoformat(r["deadline"]),
                state=r["state"],
                reply_to=r["reply_to"],
                correlation_id=r["correlation_id"],
                answered_by=r["answered_by"],
                fallback=r["fallback"],
                fallback_code=None if r["fallback_code"] is None else Fallback(r["fallback_code"]),
                output=r["output"],
                error=r["error"],
                elapsed_s=r["elapsed_s"],
                agreement=r["agreement"],
                result=None if r["result"] is None else JobResult.model_validate_json(r["result"]),
            )
            for r in rows
        ]


def _now() -> str:
    return datetime.now(UTC).isoformat()
