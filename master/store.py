"""The master's SQLite store: lessons, reports, nodes and an embedding cache.

Every write is idempotent: a report is keyed by (lesson_id, node_id), so a redelivered report is
counted once; a lesson is keyed by its deterministic id, so a restarted master finds what it has
already answered and published. Each thread gets its own connection (sqlite3 objects must not
cross threads); WAL mode lets the CLI read while the service writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from shared.config import DUPLICATE_WINDOW_S
from shared.messages import Lesson, NodeInfo, Report

SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    model TEXT NOT NULL,
    text_sha256 TEXT NOT NULL,
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (model, text_sha256)
);
CREATE TABLE IF NOT EXISTS lessons (
    lesson_id TEXT PRIMARY KEY,
    prompt_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    split TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at TEXT NOT NULL,
    published_at TEXT,
    -- cos between two master answers to this prompt under the master's decoding settings
    ceiling REAL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reports (
    lesson_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    split TEXT NOT NULL,
    similarity_before REAL,
    similarity_adapted REAL,
    similarity_guided REAL,
    final_loss REAL,
    trained INTEGER NOT NULL,
    error TEXT,
    adapter_version INTEGER NOT NULL,
    body TEXT NOT NULL,
    received_at TEXT NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 1,  -- >1: the report came again (at-least-once)
    PRIMARY KEY (lesson_id, node_id)
);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    info TEXT NOT NULL,
    state TEXT NOT NULL,
    first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL
);
-- Every process start of a node (a random instance id in its hello and heartbeats): two that
-- spoke at overlapping times are two machines with one node id (a cloned SD card).
CREATE TABLE IF NOT EXISTS node_instances (
    node_id TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL,
    PRIMARY KEY (node_id, instance_id)
);
CREATE TABLE IF NOT EXISTS judgements (
    lesson_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    method TEXT NOT NULL,          -- plain or a guided method name
    judge_model TEXT NOT NULL,
    score INTEGER,                 -- 1..10; NULL: the judge's output held no score we could parse
    raw TEXT NOT NULL,             -- what the judge said, kept so a NULL can be audited
    judged_at TEXT NOT NULL,
    PRIMARY KEY (lesson_id, node_id, method, judge_model)
);
"""


def _now() -> str:
    return datetime.now(UTC).isoformat()


def text_hash(text: str) -> str:
    """The cache key of a text: sha256 of its UTF-8 bytes."""
    return hashlib.sha256(text.encode()).hexdigest()


class WriteBatch:
    """The writes of many messages in one transaction, committed once, before their acks.

    Why: one commit (and fsync) per report capped the master's ingestion; one per batch of up to
    64 does not (docs/performance.md). Other threads wait for the write lock meanwhile (a batch
    takes milliseconds). Use from one thread only (:meth:`Store.write_batch`): ``with
    batch.message(): ...`` around each message's writes, then :meth:`commit` before acking them.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._kept = 0  # messages whose writes wait in the open transaction

    @contextmanager
    def message(self) -> Iterator[None]:
        """One message's writes: all kept, or none if the block raises."""
        db = self._store._begin_batch()
        db.execute("SAVEPOINT message")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK TO message")
            db.execute("RELEASE message")
            if self._kept == 0:
                self._store._end_batch("ROLLBACK")  # nothing to keep: free the write lock now
            raise
        db.execute("RELEASE message")
        self._kept += 1

    def commit(self) -> None:
        """Commit every message's writes since the last commit (nothing if none)."""
        self._kept = 0
        self._store._end_batch("COMMIT")


@dataclass(frozen=True)
class NodeStatus:
    """One row of `distill-swarm status`."""

    node_id: str
    state: str
    last_seen: str
    pupil_model: str
    lessons_done: int
    errors: int
    latest_loss: float | None
    eval_lessons: int
    mean_before: float | None
    mean_adapted: float | None
    mean_guided: float | None
    job_kinds: tuple[str, ...] = ()  # the job kinds the node said it does (its pupil.jobs)
    # Lessons published before the master first heard from the node, with no report from it: its
    # queue did not exist yet, so it never got them (ids, in publishing order).
    missed: tuple[str, ...] = ()
    lora_version: int = 0  # the LoRA version the node serves, from its latest hello or heartbeat
    # The lesson stream, from the node's latest hello or heartbeat (None: per-node queues): the
    # highest offset it has done, the head it last saw, and the offsets retention dropped before
    # it got them (docs/stream.md).
    stream_offset: int | None = None
    stream_head: int | None = None
    stream_lost: tuple[int, int] | None = None

    @property
    def stream_lag(self) -> int | None:
        """Offsets between the node's and the head: an upper bound of lessons still to do."""
        if self.stream_head is None:
            return None
        return max(0, self.stream_head - (-1 if self.stream_offset is None else self.stream_offset))


class Store:
    """SQLite-backed store shared by the master's threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._db().executescript(SCHEMA)  # executescript manages its own transaction

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        if getattr(self._local, "deferred", False):
            # Inside a deferred batch: a savepoint keeps this write atomic on its own.
            db.execute("SAVEPOINT write")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK TO write")
                db.execute("RELEASE write")
                raise
            db.execute("RELEASE write")
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def write_batch(self) -> WriteBatch:
        """This thread's batch of writes: one transaction for the writes of many messages."""
        batch = getattr(self._local, "batch", None)
        if batch is None:
            batch = self._local.batch = WriteBatch(self)
        return batch

    def connection(self) -> sqlite3.Connection:
        """This thread's connection, for a sibling store of the same file (master/job_store)."""
        return self._db()

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE ... COMMIT) on this thread's connection."""
        return self._tx()

    def _begin_batch(self) -> sqlite3.Connection:
        db = self._db()
        if not getattr(self._local, "deferred", False):
            db.execute("BEGIN IMMEDIATE")
            self._local.deferred = True
        return db

    def _end_batch(self, outcome: str) -> None:
        """COMMIT or ROLLBACK the open batch, if any."""
        if not getattr(self._local, "deferred", False):
            return
        self._local.deferred = False
        db = self._db()
        try:
            db.execute(outcome)
        except sqlite3.Error:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- embedding cache -------------------------------------------------------------------

    def cached_embedding(self, model: str, text: str) -> np.ndarray | None:
        """The cached embedding of ``text`` by ``model``, if any."""
        row = (
            self._db()
            .execute(
                "SELECT dim, vector FROM embeddings WHERE model=? AND text_sha256=?",
                (model, text_hash(text)),
            )
            .fetchone()
        )
        if row is None:
            return None
        return np.frombuffer(row["vector"], dtype=np.float32).reshape(row["dim"]).copy()

    def cache_embedding(self, model: str, text: str, vector: np.ndarray) -> None:
        """Remember an embedding (float32)."""
        flat = np.asarray(vector, dtype=np.float32).reshape(-1)
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?)",
                (model, text_hash(text), flat.shape[0], flat.tobytes()),
            )

    # -- lessons ---------------------------------------------------------------------------

    def get_lesson(self, lesson_id: str) -> tuple[Lesson, bool] | None:
        """The stored lesson and whether it was published, or None."""
        row = (
            self._db()
            .execute("SELECT body, published_at FROM lessons WHERE lesson_id=?", (lesson_id,))
            .fetchone()
        )
        if row is None:
            return None
        return Lesson.model_validate_json(row["body"]), row["published_at"] is not None

    def save_lesson(
        self, lesson: Lesson, prompt_id: str, seq: int, ceiling: float | None = None
    ) -> None:
        """Store a lesson before it is published (idempotent), with its ceiling if measured."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO lessons VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",
                (
                    lesson.lesson_id,
                    prompt_id,
                    seq,
                    lesson.split,
                    lesson.model_dump_json(),
                    _now(),
                    ceiling,
                ),
            )

    def lesson_split(self, lesson_id: str) -> str | None:
        """The split (train or eval) of a lesson this master made, or None if it never did."""
        row = (
            self._db()
            .execute("SELECT split FROM lessons WHERE lesson_id=?", (lesson_id,))
            .fetchone()
        )
        return None if row is None else str(row["split"])

    def lesson_ceilings(self) -> dict[str, float]:
        """lesson_id -> the master's self-agreement, for lessons where it was measured."""
        rows = self._db().execute(
            "SELECT lesson_id, ceiling FROM lessons WHERE ceiling IS NOT NULL"
        )
        return {r["lesson_id"]: r["ceiling"] for r in rows}

    def set_meta(self, key: str, value: str) -> None:
        """Remember a run-level fact, e.g. the master's decoding settings."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def meta(self) -> dict[str, str]:
        """Every run-level fact recorded with :meth:`set_meta`."""
        return {r["key"]: r["value"] for r in self._db().execute("SELECT key, value FROM meta")}

    def mark_published(self, lesson_id: str, started_at: str | None = None) -> None:
        """Record that the broker confirmed the lesson.

        ``started_at`` (ISO UTC, default now) is when the publish began: a node the master heard
        from before then had its queue bound, so it got the lesson (:meth:`receivable_pairs`).
        """
        with self._tx() as db:
            db.execute(
                "UPDATE lessons SET published_at=? WHERE lesson_id=? AND published_at IS NULL",
                (started_at or _now(), lesson_id),
            )

    def published_lesson_ids(self) -> list[str]:
        """Ids of every published lesson, in publishing order."""
        rows = self._db().execute(
            "SELECT lesson_id FROM lessons WHERE published_at IS NOT NULL ORDER BY published_at"
        )
        return [r["lesson_id"] for r in rows]

    # -- reports ---------------------------------------------------------------------------

    def add_report(self, report: Report) -> bool:
        """Store a report; False if this node already reported this lesson (a redelivery)."""
        final_loss = report.losses[-1] if report.losses else None
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO reports VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1) "
                "ON CONFLICT (lesson_id, node_id) DO UPDATE SET deliveries = deliveries + 1 "
                "RETURNING deliveries",
                (
                    report.lesson_id,
                    report.node_id,
                    report.split,
                    report.similarity_before,
                    report.similarity_adapted,
                    report.similarity_guided,
                    final_loss,
                    int(report.trained),
                    report.error,
                    report.adapter_version,
                    report.model_dump_json(),
                    _now(),
                ),
            )
            (deliveries,) = cursor.fetchone()
            return bool(deliveries == 1)

    def reports(self, node_id: str | None = None) -> list[Report]:
        """Every stored report (optionally of one node), oldest first."""
        sql = "SELECT body FROM reports"
        args: tuple[str, ...] = ()
        if node_id is not None:
            sql += " WHERE node_id=?"
            args = (node_id,)
        rows = self._db().execute(sql + " ORDER BY received_at, rowid", args)
        return [Report.model_validate_json(r["body"]) for r in rows]

    def delivery_counts(self) -> dict[tuple[str, str], int]:
        """How often each (lesson, node) report arrived; more than 1 means it was redelivered."""
        rows = self._db().execute("SELECT lesson_id, node_id, deliveries FROM reports")
        return {(r["lesson_id"], r["node_id"]): r["deliveries"] for r in rows}

    def report_count(self) -> int:
        """How many distinct (lesson, node) reports are stored."""
        return int(self._db().execute("SELECT COUNT(*) FROM reports").fetchone()[0])

    def reported_pairs(self, lesson_ids: list[str], node_ids: list[str]) -> int:
        """How many (lesson, node) pairs among the given ones have a stored report."""
        if not lesson_ids or not node_ids:
            return 0
        db = self._db()
        db.execute("CREATE TEMP TABLE IF NOT EXISTS wanted (lesson_id TEXT PRIMARY KEY)")
        db.execute("DELETE FROM wanted")
        db.executemany("INSERT OR IGNORE INTO wanted VALUES (?)", [(i,) for i in lesson_ids])
        marks = ",".join("?" * len(node_ids))
        sql = (
            f"SELECT COUNT(*) FROM reports JOIN wanted USING (lesson_id) WHERE node_id IN ({marks})"
        )
        return int(db.execute(sql, node_ids).fetchone()[0])

    def receivable_pairs(self, lesson_ids: list[str], node_ids: list[str]) -> tuple[int, int]:
        """(pairs the node could have received, how many of those have a report), among the
        given lessons and nodes.

        A node could have received a lesson if the master heard from it before publishing it:
        a pupil binds its queue before its first hello, so its queue was there. A node first
        heard from later may have had no queue yet, and a fanout keeps nothing for a queue that
        does not exist (until lessons move to a stream, DESIGN.md).
        """
        if not lesson_ids or not node_ids:
            return 0, 0
        db = self._db()
        db.execute("CREATE TEMP TABLE IF NOT EXISTS wanted (lesson_id TEXT PRIMARY KEY)")
        db.execute("DELETE FROM wanted")
        db.executemany("INSERT OR IGNORE INTO wanted VALUES (?)", [(i,) for i in lesson_ids])
        marks = ",".join("?" * len(node_ids))
        row = db.execute(
            "SELECT COUNT(*), COUNT(r.lesson_id) FROM wanted JOIN lessons l USING (lesson_id) "
            "JOIN nodes n ON n.first_seen < l.published_at "
            "LEFT JOIN reports r ON r.lesson_id = l.lesson_id AND r.node_id = n.node_id "
            f"WHERE n.node_id IN ({marks})",
            node_ids,
        ).fetchone()
        return int(row[0]), int(row[1])

    def missed_lessons(self, node_id: str) -> list[str]:
        """Lessons published before the master first heard from ``node_id`` and never reported
        by it, in publishing order (see :meth:`receivable_pairs`)."""
        rows = self._db().execute(
            "SELECT l.lesson_id FROM lessons l JOIN nodes n ON n.node_id = ? "
            "WHERE l.published_at IS NOT NULL AND l.published_at <= n.first_seen "
            "AND NOT EXISTS (SELECT 1 FROM reports r "
            "WHERE r.lesson_id = l.lesson_id AND r.node_id = n.node_id) "
            "ORDER BY l.published_at, l.seq",
            (node_id,),
        )
        return [r["lesson_id"] for r in rows]

    # -- nodes -----------------------------------------------------------------------------

    def touch_node(self, info: NodeInfo, state: str) -> None:
        """Record a hello/heartbeat/goodbye from a node."""
        now = _now()
        with self._tx() as db:
            db.execute(
                "INSERT INTO nodes VALUES (?, ?, ?, ?, ?) ON CONFLICT(node_id) DO UPDATE SET "
                "info=excluded.info, state=excluded.state, last_seen=excluded.last_seen",
                (info.node_id, info.model_dump_json(), state, now, now),
            )

    def record_instance(self, node_id: str, instance_id: str) -> str | None:
        """Note that ``instance_id`` of ``node_id`` spoke now; returns another instance of the
        node that spoke after this one first did (two processes at once), or None.

        A restart never matches: the old process is silent before the new one says hello, and
        the control queue hands the master their messages in the order they were sent.
        """
        now = _now()
        with self._tx() as db:
            (first_seen,) = db.execute(
                "INSERT INTO node_instances VALUES (?, ?, ?, ?) "
                "ON CONFLICT (node_id, instance_id) DO UPDATE SET last_seen = excluded.last_seen "
                "RETURNING first_seen",
                (node_id, instance_id, now, now),
            ).fetchone()
            row = db.execute(
                "SELECT instance_id FROM node_instances WHERE node_id = ? AND instance_id != ? "
                "AND last_seen > ? ORDER BY last_seen DESC LIMIT 1",
                (node_id, instance_id, first_seen),
            ).fetchone()
        return None if row is None else str(row["instance_id"])

    def duplicate_instances(self, node_id: str, window_s: float = DUPLICATE_WINDOW_S) -> int:
        """How many instances of ``node_id`` spoke in the last ``window_s`` seconds at times
        that overlap another's: 0 when at most one process speaks for the node."""
        since = (datetime.now(UTC) - timedelta(seconds=window_s)).isoformat()
        row = (
            self._db()
            .execute(
                "SELECT COUNT(DISTINCT a.instance_id) FROM node_instances a "
                "JOIN node_instances b ON b.node_id = a.node_id AND b.instance_id != a.instance_id "
                "AND a.last_seen > b.first_seen AND b.last_seen > a.first_seen "
                "WHERE a.node_id = ? AND a.last_seen >= ? AND b.last_seen >= ?",
                (node_id, since, since),
            )
            .fetchone()
        )
        return int(row[0])

    def latest_reports(self, node_id: str) -> list[Report]:
        """The node's latest successful train report (with losses) and latest eval report."""
        out = []
        for condition in ("split='train' AND trained=1 AND final_loss IS NOT NULL", "split='eval'"):
            row = (
                self._db()
                .execute(
                    f"SELECT body FROM reports WHERE node_id=? AND error IS NULL AND {condition} "
                    "ORDER BY received_at DESC, rowid DESC LIMIT 1",
                    (node_id,),
                )
                .fetchone()
            )
            if row is not None:
                out.append(Report.model_validate_json(row["body"]))
        return out

    def node_info(self, node_id: str) -> NodeInfo | None:
        """What the node said about itself last, or None if it never spoke."""
        row = self._db().execute("SELECT info FROM nodes WHERE node_id=?", (node_id,)).fetchone()
        return None if row is None else NodeInfo.model_validate_json(row["info"])

    def nodes_seen_since(self, since_iso: str) -> list[str]:
        """Ids of nodes that said anything at or after ``since_iso`` and did not say goodbye."""
        rows = self._db().execute(
            "SELECT node_id FROM nodes WHERE last_seen >= ? AND state != 'offline' "
            "ORDER BY node_id",
            (since_iso,),
        )
        return [r["node_id"] for r in rows]

    def node_status(self, duplicate_window_s: float = DUPLICATE_WINDOW_S) -> list[NodeStatus]:
        """Per-node summary: eval-only similarity means, so training fit never flatters them.

        The state is ``duplicate`` while two processes speak for the node id (within
        ``duplicate_window_s``, see :meth:`duplicate_instances`), whatever they said last.
        """
        db = self._db()
        out = []
        for node in db.execute("SELECT * FROM nodes ORDER BY node_id").fetchall():
            info = NodeInfo.model_validate_json(node["info"])
            agg = db.execute(
                "SELECT COUNT(*) AS done, SUM(error IS NOT NULL) AS errors, "
                "SUM(split='eval' AND error IS NULL) AS evals, "
                "AVG(CASE WHEN split='eval' THEN similarity_before END) AS before, "
                "AVG(CASE WHEN split='eval' THEN similarity_adapted END) AS adapted, "
                "AVG(CASE WHEN split='eval' THEN similarity_guided END) AS guided "
                "FROM reports WHERE node_id=?",
                (node["node_id"],),
            ).fetchone()
            loss = db.execute(
                "SELECT final_loss FROM reports WHERE node_id=? AND trained=1 "
                "ORDER BY adapter_version DESC LIMIT 1",
                (node["node_id"],),
            ).fetchone()
            duplicate = self.duplicate_instances(node["node_id"], duplicate_window_s) > 1
            out.append(
                NodeStatus(
                    node_id=node["node_id"],
                    state="duplicate" if duplicate else node["state"],
                    last_seen=node["last_seen"],
                    pupil_model=info.pupil_model,
                    lessons_done=int(agg["done"] or 0),
                    errors=int(agg["errors"] or 0),
                    latest_loss=None if loss is None else loss["final_loss"],
                    eval_lessons=int(agg["evals"] or 0),
                    mean_before=agg["before"],
                    mean_adapted=agg["adapted"],
                    mean_guided=agg["guided"],
                    job_kinds=tuple(info.job_kinds),
                    lora_version=info.lora_version,
                    # A stream reader gets every retained lesson, whenever it joined.
                    missed=()
                    if info.stream_head is not None or info.stream_offset is not None
                    else tuple(self.missed_lessons(node["node_id"])),
                    stream_offset=info.stream_offset,
                    stream_head=info.stream_head,
                    stream_lost=None
                    if info.stream_lost_first is None or info.stream_lost_last is None
                    else (info.stream_lost_first, info.stream_lost_last),
                )
            )
        return out

    # -- judgements (distill-swarm eval --judge) -----------------------------------------------

    def add_judgement(
        self,
        lesson_id: str,
        node_id: str,
        method: str,
        judge_model: str,
        score: int | None,
        raw: str,
    ) -> None:
        """Record one judge verdict (``score`` None: unparseable); a repeat replaces it."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?, ?, ?)",
                (lesson_id, node_id, method, judge_model, score, raw, _now()),
            )

    def judgements(self, judge_model: str) -> dict[tuple[str, str, str], int | None]:
        """(lesson_id, node_id, method) -> score (None: unparseable) for one judge model."""
        rows = self._db().execute(
            "SELECT lesson_id, node_id, method, score FROM judgements WHERE judge_model=?",
            (judge_model,),
        )
        return {(r["lesson_id"], r["node_id"], r["method"]): r["score"] for r in rows}
