"""A pupil's state directory under real processes: one node and one process per directory, and
state that stays within its retention bounds on a long run.

`pytest -m faults tests/faults/test_state_faults.py` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from distill_swarm.local_broker import LocalBroker
from shared.cli_support import ExitCode
from tests.faults.process_faults import LESSONS
from tests.faults.state_faults import (
    LONG_RUN_LESSONS,
    LONG_RUN_RETENTION,
    NODES,
    long_run_bounded_state,
    two_pupils_one_directory,
)

pytestmark = [pytest.mark.faults, pytest.mark.models, pytest.mark.broker]


def test_two_pupils_from_one_directory_keep_separate_state(
    fault_broker: LocalBroker, tmp_path: Path
) -> None:
    result = two_pupils_one_directory(fault_broker, tmp_path)
    ev = result.evidence
    # Each node got its own default state dir, owned by it; the old shared one was never made.
    assert ev["per_node_dirs"] and not ev["old_default_used"], ev["state_dirs"]
    assert ev["owners"] == {n: n for n in NODES}
    # So each node learned and reported every lesson itself: none "already done" by the other.
    assert ev["already_done"] == {n: 0 for n in NODES}
    assert (result.reports_received, result.lost, result.duplicated) == (LESSONS * 2, 0, 0)
    assert ev["trained_twice"] == 0
    for node in NODES:
        version, lessons = ev["adapters"][node]
        assert (version, lessons) == (len(ev["train_lessons"]), ev["train_lessons"]), node
    # A second process on b's directory refused to start, with one error line and its own code.
    assert ev["second_exit"] == ExitCode.STATE_IN_USE, ev["second_log"][-2000:]
    errors = [line for line in ev["second_log"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "in use by another pupil process" in errors[0], errors
    # Node a on b's (now free) directory: refused as bad input, naming the owner.
    assert ev["wrong_owner_exit"] == ExitCode.BAD_INPUT, ev["wrong_owner_log"][-2000:]
    assert "error: state dir" in ev["wrong_owner_log"]
    assert "belongs to node 'b', not 'a'" in ev["wrong_owner_log"]
    assert ev["pupil_exits"] == {n: 0 for n in NODES} and ev["master_exit"] == 0


def test_a_long_run_keeps_state_within_its_retention_bounds(
    fault_broker: LocalBroker, tmp_path: Path
) -> None:
    result = long_run_bounded_state(fault_broker, tmp_path)
    ev = result.evidence
    assert (result.reports_received, result.lost, result.duplicated) == (LONG_RUN_LESSONS, 0, 0)
    # The redelivered newest lesson was only acked: not trained again, no second report.
    assert ev["trained_twice"] == 0
    assert ev["adapter_version"] == LONG_RUN_LESSONS
    # The journal holds the newest ids only, without report bodies once confirmed...
    assert ev["journal_rows"] == LONG_RUN_RETENTION["journal_max_lessons"]
    assert (ev["journal_report_bytes"], ev["journal_unconfirmed"]) == (0, 0)
    # ...and still counts every lesson the node did (what hello and heartbeat tell the master).
    assert ev["journal_lessons_done"] == LONG_RUN_LESSONS
    # The memory keeps the newest texts, and vectors only for the searchable newest.
    assert ev["memory_rows"] == LONG_RUN_RETENTION["memory_max_lessons"]
    assert ev["memory_vectors"] == LONG_RUN_RETENTION["retrieval_max_lessons"]
    assert ev["pupil_exit"] == 0
