"""A full state disk on a real tmpfs, through real processes (tests/faults/disk_faults.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill_swarm.local_broker import LocalBroker
from tests.faults.disk_faults import LESSONS, PROBES_WHILE_FULL, TRAIN_IDS, state_disk_full
from tests.support.tmpfs import require_tmpfs

pytestmark = [pytest.mark.faults, pytest.mark.models, pytest.mark.broker]


def test_a_full_state_disk_loses_no_trained_work_and_trains_nothing_twice(
    fault_broker: LocalBroker, tmp_path: Path
) -> None:
    require_tmpfs()
    result = state_disk_full(fault_broker, tmp_path)
    ev = result.evidence
    # While no checkpoint could be written, no lesson was reported (as trained or at all): the
    # failed write was rolled back, the lesson held (not requeued, not dead-lettered) while the
    # disk was probed, and tried once more when it had room.
    assert ev["reported_while_full"] == [], ev["log"][-3000:]
    assert ev["rollbacks"] == 1, ev["log"][-3000:]
    assert (ev["paused"], ev["resumed"]) == (1, 1), ev["log"][-3000:]
    assert ev["probes_while_full"] >= PROBES_WHILE_FULL
    assert ev["attempts_of_first_held"] == 2, ev["log"][-3000:]
    assert (ev["requeues"], ev["dead_lettered"], ev["dead_letters_moved_back"]) == (0, 0, 0)
    # Once the space was back, every lesson was reported once; after a restart the checkpoints
    # hold every train lesson once, and every lesson sent again was only acked.
    assert (result.lost, result.duplicated) == (0, 0)
    assert result.reports_received == len(LESSONS)
    assert ev["reported_but_missing"] == []
    assert result.trained_twice == 0
    assert ev["adapter_versions"] == [len(TRAIN_IDS)] * 2
    assert ev["adapter_lessons"] == [TRAIN_IDS] * 2
    assert (ev["acked_after_restart"], ev["started_after_restart"]) == (len(LESSONS), 0)
    assert ev["pupil_exits"] == (0, 0)
