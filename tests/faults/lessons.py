"""Lessons made without a master, for scenarios where the test itself plays the master.

A pupil checks a lesson's embedding *space* (model name and dimension), not where the vector came
from, so a random unit vector named after the pupil's embedding model is a lesson it learns from.
That saves loading a master model in scenarios about the pupil alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shared.backends.embedded import MINILM_DIM, MINILM_NAME
from shared.broker import Publisher
from shared.messages import Embedding, Lesson, Split, encode
from shared.topology import Topology

GOALS = [
    json.loads(line)["goal_text"]
    for line in (Path(__file__).resolve().parents[1] / "e2e" / "prompts.jsonl")
    .read_text()
    .splitlines()
    if line.strip()
]


def synthetic_lesson(n: int, split: Split = "train") -> Lesson:
    """Lesson number ``n``: a goal from the e2e prompt set and a random unit reference vector."""
    vector = np.random.default_rng(n).normal(size=MINILM_DIM)
    goal = GOALS[n % len(GOALS)]
    return Lesson(
        lesson_id=f"s{n:03d}-synthetic-lesson",
        task="summarisation",
        prompt=goal,
        goal_text=goal,
        master_model="fault-driver",
        master_answer="A short, plain answer.",
        reference=Embedding.from_array(MINILM_NAME, vector / np.linalg.norm(vector)),
        split=split,
    )


def publish_lesson(publisher: Publisher, topology: Topology, lesson: Lesson) -> None:
    """Publish ``lesson`` on the lessons fanout, as the master does (confirmed)."""
    publisher.publish(topology.lessons_exchange, "", encode(lesson), lesson.lesson_id)
