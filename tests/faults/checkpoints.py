"""What a pupil's adapter checkpoints say it trained on: the fault table's "trained twice" column.

Evidence from the files a restarted node would load, not from logs: a checkpoint's ``version``
counts every training of its adapter (one per lesson learned), and its replay buffer names the
lesson of every pair it holds. Training a lesson again bumps the version without adding a new
lesson id (it adds the same id a second time).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pupil_node.node import CHECKPOINT_NAME, PROMPT_CHECKPOINT_NAME
from shared.adapter import AdapterTrainer
from shared.checkpoint import load_latest

CHECKPOINTS = (CHECKPOINT_NAME, PROMPT_CHECKPOINT_NAME)


def adapters(state_dir: Path) -> list[AdapterTrainer]:
    """The node's adapters as a restart would load them (a damaged file falls back to .prev)."""
    loaded = (load_latest(state_dir / name) for name in CHECKPOINTS)
    return [trainer for trainer in loaded if trainer is not None]


def extra_trainings(trainer: AdapterTrainer) -> int:
    """Trainings of ``trainer`` beyond one per distinct lesson.

    ``version`` minus the distinct lessons in the replay buffer, while the buffer still holds a
    pair of every training (the fault scenarios train far fewer lessons than its capacity);
    once it has dropped old pairs, only the lessons it holds more than once are counted.
    """
    lesson_ids = trainer.replay.export()[2]
    distinct = len(set(lesson_ids))
    if len(lesson_ids) >= trainer.version:
        return trainer.version - distinct
    return len(lesson_ids) - distinct


def trained_twice(state_dirs: Iterable[Path]) -> int:
    """Trainings beyond the first of any lesson, summed over nodes (their state directories).

    Per node, the larger count of its two adapters: a lesson trained twice is trained twice in
    both, and counting it once per node keeps the figure in lessons.
    """
    return sum(
        max((extra_trainings(trainer) for trainer in adapters(state_dir)), default=0)
        for state_dir in state_dirs
    )
