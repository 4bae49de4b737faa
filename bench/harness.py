"""What the cost benchmarks share: synthetic lessons, a throwaway broker namespace, tables.

Used by ``bench/throughput.py``, ``bench/overhead.py``, ``bench/adapter_cost.py`` and
``bench/memory.py``; never by the tests. Run a bench by path (``.venv/bin/python bench/X.py``):
``bench/`` is then on ``sys.path`` and this module imports as ``harness``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from fast_backend import HashingEmbedder

from shared.backends.templates import render_prompt
from shared.broker import Publisher, connect
from shared.config import BrokerConfig
from shared.messages import Embedding, Lesson, encode
from shared.namespace import delete_namespace
from shared.topology import Topology

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/%2F"
MASTER_MODEL = "bench:echo"
# Words the synthetic goals and answers are drawn from: enough of them that the hashing embedder
# gives every lesson its own direction, few enough that lessons share words (similarities vary).
_VOCABULARY_TEXT = (
    "the a of to and in is it that for on with as at by from this be are was an or model "
    "answer question river bread yeast comet orbit train station french summary score ten "
    "seven continents light heat water energy network queue broker message lesson adapter "
    "vector embed cosine master pupil node edge swarm distill learn teach reason tip fast "
    "slow"
)
VOCABULARY = _VOCABULARY_TEXT.split()
GOAL_WORDS = 24
ANSWER_WORDS = 60


def bench_namespace(kind: str) -> str:
    """A namespace no other run uses: ``bench-<kind>-<pid>``."""
    return f"bench-{kind}-{os.getpid()}"


def broker_config(namespace: str, url: str = AMQP_URL, prefetch: int = 1) -> BrokerConfig:
    """Broker settings for one bench run (fail fast if no broker answers)."""
    return BrokerConfig(
        url=url, namespace=namespace, prefetch=prefetch, connect_attempts=3, max_backoff_s=1.0
    )


@contextlib.contextmanager
def throwaway_topology(config: BrokerConfig, node_ids: Sequence[str] = ()) -> Iterator[Topology]:
    """Declare the master's side and ``node_ids``' queues; delete the whole namespace afterwards."""
    topology = Topology(config.namespace, config.quorum_queues)
    connection = connect(config)
    try:
        channel = connection.channel()
        topology.declare_all(channel, tuple(node_ids))
    finally:
        connection.close()
    try:
        yield topology
    finally:
        delete_namespace(config, node_ids)


def make_lessons(
    count: int, dim: int, *, eval_every: int = 0, seed: int = 0, tag: str = "bench"
) -> list[Lesson]:
    """``count`` distinct lessons embedded by the fast backend (``dim`` dims).

    Every ``eval_every``-th lesson (0: none) is an eval lesson. Prompts are rendered with the
    master's real template, so bodies have a realistic size (about 9 kB at 384 dims).
    """
    rng = np.random.default_rng(seed)
    embedder = HashingEmbedder(dim)
    lessons = []
    for index in range(count):
        goal = " ".join(rng.choice(VOCABULARY, GOAL_WORDS))
        answer = " ".join(rng.choice(VOCABULARY, ANSWER_WORDS))
        split: Literal["train", "eval"] = (
            "eval" if eval_every and index % eval_every == eval_every - 1 else "train"
        )
        lessons.append(
            Lesson(
                lesson_id=hashlib.sha256(f"{tag}-{seed}-{index}".encode()).hexdigest()[:32],
                task="bench",
                prompt=render_prompt("master.j2", goal),
                goal_text=goal,
                master_model=MASTER_MODEL,
                master_answer=answer,
                reference=Embedding.from_array(embedder.model_name, embedder.embed([answer])[0]),
                split=split,
            )
        )
    return lessons


def queue_lessons(config: BrokerConfig, topology: Topology, lessons: list[Lesson]) -> None:
    """Publish every lesson to the lessons fanout, confirmed; queues bound to it get them all."""
    publisher = Publisher(config)
    try:
        for lesson in lessons:
            publisher.publish(topology.lessons_exchange, "", encode(lesson), lesson.lesson_id)
    finally:
        publisher.close()


# Of no values there is no figure: None, which every table here prints as "-" and JSON writes as
# null. NaN would print as "nan" and make the JSON file invalid.


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation; None for no values."""
    return float(np.percentile(values, q)) if len(values) else None


def median(values: Sequence[float]) -> float | None:
    """The median; None for no values."""
    return float(statistics.median(values)) if len(values) else None


def format_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    table = [tuple(columns), *(tuple(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]

    def line(row: tuple[str, ...]) -> str:
        first, *rest = row
        cells = [first.ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(rest, widths[1:], strict=True)
        ]
        return "  ".join(cells).rstrip()

    header = line(table[0])
    return "\n".join([header, "-" * len(header), *(line(row) for row in table[1:])])


def proc_status_kib(pid: int | str, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (e.g. ``VmHWM``, peak resident set), in KiB."""
    for entry in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = entry.partition(":")
        if name == field:
            return int(value.split()[0])
    raise KeyError(f"/proc/{pid}/status has no {field}")
