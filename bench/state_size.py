"""Benchmark: how big a pupil's state grows with the lessons it has done.

Drives the node's own journal and lesson memory (``pupil_node.journal``, ``pupil_node.memory``)
through ``--lessons`` lessons the way the lesson flow does (journal the report, note its confirm,
remember train lessons), with reports and texts of realistic size, then prints the bytes on disk
per lesson and in all, and the RAM the searchable goal vectors take.

    .venv/bin/python bench/state_size.py [--lessons 100000] [--dim 384] [--workdir DIR]

Run it with ``PYTHONPATH=<a checkout of an older commit>`` to measure that commit's code: the
retention settings are passed only to code that has them. Nothing here is timed; the figures are
in docs/decisions.md (section 25).
"""

from __future__ import annotations

import argparse
import inspect
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run by path: bench/ only; an older checkout may come first
    sys.path.append(str(ROOT))

from pupil_node.journal import Journal  # noqa: E402
from pupil_node.memory import LessonMemory  # noqa: E402
from shared.messages import Report, Timings, encode  # noqa: E402

WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "this",
    "be",
    "by",
    "are",
    "answer",
    "model",
    "pupil",
    "master",
    "lesson",
    "summary",
    "capital",
    "river",
    "energy",
    "network",
    "question",
    "because",
    "therefore",
    "however",
    "example",
]


def text(rng: random.Random, chars: int) -> str:
    """Words up to about ``chars`` characters."""
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


def report_body(rng: random.Random, n: int, split: str, answer_chars: int) -> bytes:
    """An encoded report as a node with the default settings sends: eval lessons carry the
    answers of the two default guided methods."""
    guided = {"best_of_k": 0.71, "retrieval": 0.74} if split == "eval" else {}
    report = Report(
        lesson_id=f"{n:064x}",
        node_id="pi-7",
        split=split,  # type: ignore[arg-type]
        pupil_model="phi4-mini",
        pupil_answer=text(rng, answer_chars),
        similarity_before=0.62,
        similarity_adapted=0.70,
        similarity_guided=0.74 if split == "eval" else 0.62,
        guided=guided,
        guided_answers={m: text(rng, answer_chars) for m in guided},
        losses=[0.01 * i for i in range(8)] if split == "train" else [],
        timings=Timings(generate_ms=4000.0, embed_ms=50.0, train_ms=30.0, guide_ms=0.0),
        adapter_version=n,
        trained=split == "train",
    )
    return encode(report)


def open_state(workdir: Path, dim: int) -> tuple[Journal, LessonMemory]:
    """The node's journal and memory, with the default retention where the code has it."""
    if "max_lessons" in inspect.signature(Journal).parameters:
        from shared.config import RetentionConfig

        retention = RetentionConfig()
        journal = Journal(workdir / "journal.sqlite3", retention.journal_max_lessons)
        memory = LessonMemory(
            workdir / "memory.sqlite3",
            dim,
            retention.memory_max_lessons,
            retention.retrieval_max_lessons,
        )
    else:
        journal = Journal(workdir / "journal.sqlite3")
        memory = LessonMemory(workdir / "memory.sqlite3", dim)
    # Sizes do not depend on fsync; 100k lessons with one fsync per commit take many minutes.
    for db in (journal._db, memory._db):
        db.execute("PRAGMA synchronous=OFF")
    return journal, memory


def disk_bytes(workdir: Path) -> dict[str, int]:
    """Bytes per SQLite database, its -wal and -shm files included."""
    sizes: dict[str, int] = {}
    for name in ("journal.sqlite3", "memory.sqlite3"):
        sizes[name] = sum(p.stat().st_size for p in workdir.glob(name + "*") if p.is_file())
    return sizes


def main() -> int:
    """Run the lessons through the node's state; print sizes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--lessons", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384, help="embedding dims (mxbai: 1024)")
    parser.add_argument("--eval-fraction", type=float, default=0.25)
    parser.add_argument("--goal-chars", type=int, default=200)
    # 96 tokens (the default max_tokens) of English is about 400 characters.
    parser.add_argument("--answer-chars", type=int, default=400)
    parser.add_argument("--master-answer-chars", type=int, default=400)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="distill-swarm-state-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    vectors = np.random.default_rng(0)
    journal, memory = open_state(workdir, args.dim)
    marks = {int(args.lessons * f) for f in (0.01, 0.1, 0.5, 1.0)}
    print("lessons  journal (bytes)  memory (bytes)  bytes/lesson  searchable  vector RAM (MB)")
    for n in range(1, args.lessons + 1):
        split = "eval" if rng.random() < args.eval_fraction else "train"
        lesson_id = f"{n:064x}"
        journal.record(lesson_id, report_body(rng, n, split, args.answer_chars))
        journal.mark_reported(lesson_id)
        if split == "train":
            memory.add(
                lesson_id,
                text(rng, args.goal_chars),
                text(rng, args.master_answer_chars),
                vectors.normal(size=args.dim).astype(np.float32),
            )
        if n in marks:
            journal._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            memory._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            sizes = disk_bytes(workdir)
            total = sum(sizes.values())
            ram_mb = len(memory) * args.dim * 4 / 1e6
            print(
                f"{n:7d}  {sizes['journal.sqlite3']:15,d}  {sizes['memory.sqlite3']:14,d}  "
                f"{total / n:12,.0f}  {len(memory):10d}  {ram_mb:15.1f}",
                flush=True,
            )
    journal.close()
    memory.close()
    print(f"state in {workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
