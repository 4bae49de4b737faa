"""A pupil whose state disk fills up: on a real, small tmpfs, with the embedded models.

The promise (docs/decisions.md, "A full disk loses nothing and trains nothing twice"): a lesson is
reported as trained only once the checkpoint holding it is on disk; a write the disk refuses rolls
the adapters back to their files and requeues the lesson (never dead-letters it); and a lesson
trained into a checkpoint but never journalled is not trained again when it comes back later.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from pupil_node.disk import StateWriteFailed
from pupil_node.node import CHECKPOINT_NAME, JOURNAL_NAME, PROMPT_CHECKPOINT_NAME, PupilNode
from shared.backends import Embedder, TextGenerator
from shared.checkpoint import load_checkpoint
from shared.config import PupilConfig
from shared.metrics import PupilMetrics
from tests.integration.test_pupil_node import lesson_body, models, report_of
from tests.support.tmpfs import fill, require_tmpfs, small_tmpfs

pytestmark = pytest.mark.models

__all__ = ["models"]  # the module-scoped fixture, shared with test_pupil_node

# A 16-unit adapter's checkpoint is about 175 KB at 384 dims: a few fit in a 2 MB tmpfs.
HIDDEN_DIM = 16
# Less than one checkpoint, more than the SQLite pages a few lessons append.
LEAVE_BYTES = 64 * 1024


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs to keep a node's state in."""
    require_tmpfs()
    with small_tmpfs(tmp_path / "state", "2m") as path:
        yield path


def make_node(
    state: Path, models: tuple[TextGenerator, Embedder], min_free_bytes: int = 0
) -> PupilNode:
    config = PupilConfig.model_validate(
        {
            "state_dir": state,
            "generator": {"max_tokens": 8, "temperature": 0.8},
            "adapter": {"steps_per_lesson": 3, "batch_size": 4, "hidden_dim": HIDDEN_DIM},
            "guidance": {"method": "plain", "eval_methods": []},
            "min_free_bytes": min_free_bytes,
        }
    )
    return PupilNode("a", config, *models)


def versions_on_disk(state: Path) -> tuple[int, int]:
    return tuple(  # type: ignore[return-value]
        load_checkpoint(state / name).version for name in (CHECKPOINT_NAME, PROMPT_CHECKPOINT_NAME)
    )


def test_a_checkpoint_the_disk_refuses_is_rolled_back_and_the_lesson_requeued(
    state: Path, models: tuple[TextGenerator, Embedder]
) -> None:
    node = make_node(state, models)
    node.process(lesson_body(models[1], "l1", "train"))
    filler = fill(state, LEAVE_BYTES)
    second = lesson_body(models[1], "l2", "train")
    # Twice: before the fix, the retry found the lesson "in the adapter already" (in memory
    # only) and reported it as trained while the checkpoint stayed at version 1.
    for _ in range(2):
        with pytest.raises(StateWriteFailed, match="No space left on device"):
            node.process(second)
        assert (node.trainer.version, node.prompt_trainer.version) == (1, 1)
        assert versions_on_disk(state) == (1, 1)
        assert node.journal.entry("l2") is None
    # The lesson consumer's prober waits for room for both checkpoints before it tries again.
    with pytest.raises(StateWriteFailed):
        node.probe_state_disk()
    filler.unlink()
    node.probe_state_disk()
    report = report_of(node.process(second).report)
    assert report.trained and report.losses and report.adapter_version == 2
    node.close()

    restarted = make_node(state, models)
    try:
        for trainer in (restarted.trainer, restarted.prompt_trainer):
            assert trainer.version == 2
            assert sorted(trainer.replay.export()[2]) == ["l1", "l2"]  # each once
    finally:
        restarted.close()


def test_a_lesson_checkpointed_but_not_journalled_is_never_trained_again(
    state: Path, tmp_path: Path, models: tuple[TextGenerator, Embedder]
) -> None:
    # The journal on a disk of its own that fills up while the checkpoints' disk has room: the
    # checkpoint is written, the journal entry is not.
    with small_tmpfs(tmp_path / "journal", "256k") as journal_disk:
        (state / JOURNAL_NAME).symlink_to(journal_disk / JOURNAL_NAME)
        node = make_node(state, models)
        try:
            node.process(lesson_body(models[1], "l0", "train"))
            filler = fill(journal_disk)
            failures: list[Exception] = []
            for lesson_id in ("l1", "l2"):
                with pytest.raises(Exception) as caught:
                    node.process(lesson_body(models[1], lesson_id, "train"))
                failures.append(caught.value)
            assert versions_on_disk(state) == (3, 3)  # both are in the checkpoints
            filler.unlink()
            # l1 comes back after l2 was trained (a dead letter moved back, a requeue behind a
            # prefetched lesson): the checkpoint's last lesson is l2, not l1.
            reports = [
                node.process(lesson_body(models[1], lesson_id, "train"))
                for lesson_id in ("l1", "l2", "l1")
            ]
            for trainer in (node.trainer, node.prompt_trainer):
                lessons = Counter(trainer.replay.export()[2])
                assert (trainer.version, lessons) == (3, Counter(["l0", "l1", "l2"]))
            assert versions_on_disk(state) == (3, 3)
            assert [r.replayed for r in reports] == [False, False, True]
            assert all(report_of(r.report).trained for r in reports)
            # The full journal disk was an outage of the state disk: the consumer holds such a
            # lesson and retries it; it never dead-letters it.
            assert all(isinstance(f, StateWriteFailed) for f in failures), failures
        finally:
            node.close()


def test_below_min_free_bytes_the_node_takes_no_lesson_and_its_gauge_says_why(
    state: Path, models: tuple[TextGenerator, Embedder]
) -> None:
    node = make_node(state, models, min_free_bytes=512 * 1024)
    metrics = PupilMetrics()
    metrics.watch_free_space(node.state_free_bytes)
    try:
        node.process(lesson_body(models[1], "l1", "train"))
        filler = fill(state, 256 * 1024)
        free = metrics.registry.get_sample_value("distill_swarm_state_free_bytes")
        assert free is not None and 256 * 1024 <= free < 512 * 1024
        with pytest.raises(StateWriteFailed, match="min_free_bytes"):
            node.process(lesson_body(models[1], "l2", "train"))
        assert (node.trainer.version, node.journal.entry("l2")) == (1, None)
        filler.unlink()
        assert report_of(node.process(lesson_body(models[1], "l2", "train")).report).trained
        free_after = metrics.registry.get_sample_value("distill_swarm_state_free_bytes")
        assert free_after is not None and free_after > 512 * 1024
    finally:
        node.close()
