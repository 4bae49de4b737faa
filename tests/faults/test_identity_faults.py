"""Identity and membership faults (issue 11), on real processes and private brokers.

Each test runs one scenario driver of ``tests/faults/identity_faults.py`` (shared with
``bench/faults.py``): `pytest -m faults tests/faults/test_identity_faults.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from distill_swarm.local_broker import LocalBroker
from tests.faults.identity_faults import (
    EXIT_NODE_ID_IN_USE,
    LATE,
    duplicate_node_id,
    forged_reports,
    late_joiner,
)
from tests.faults.process_faults import LESSONS, NODE

pytestmark = [pytest.mark.faults, pytest.mark.models, pytest.mark.broker]


def test_a_second_process_with_a_node_id_is_refused_and_reported(
    fault_broker: LocalBroker, tmp_path: Path
) -> None:
    result = duplicate_node_id(fault_broker, tmp_path)
    ev = result.evidence
    # The clone never took a lesson: it was refused the queue and exited with its own code.
    assert ev["clone_started"] == 0
    assert ev["clone_exit"] == EXIT_NODE_ID_IN_USE
    assert len(ev["clone_error"]) == 1 and "two machines run as 'pupil-1'" in ev["clone_error"][0]
    # The real node learned the whole curriculum, each lesson once.
    assert ev["pupil_started"] == LESSONS
    assert (result.lost, result.duplicated, result.reports_received) == (0, 0, LESSONS)
    assert result.trained_twice == 0
    # The operator is told: the master's log, its metric and `status`.
    assert ev["master_warned"]
    assert ev["duplicate_messages"] >= 1
    assert ev["status_state"] == "duplicate"
    assert (ev["master_exit"], ev["pupil_exit"]) == (0, 0)


def test_a_late_joiner_is_not_waited_for_and_status_names_what_it_missed(
    fault_broker: LocalBroker, tmp_path: Path
) -> None:
    result = late_joiner(fault_broker, tmp_path)
    ev = result.evidence
    assert ev["first_master_exit"] == 0
    # The restarted master finished instead of waiting for the newcomer until its timeout.
    assert ev["second_master_exit"] == 0, ev["second_master_log"][-3000:]
    assert ev["late_reports"] == 0 and ev["late_backlog"] == 0  # it never got a lesson
    assert ev["missed"][LATE] == ev["published"]  # every lesson, in publishing order
    assert ev["missed"][NODE] == []
    assert (result.lost, result.duplicated, result.reports_received) == (0, 0, LESSONS)
    assert result.trained_twice == 0
    assert (ev["pupil_exit"], ev["late_exit"]) == (0, 0)


def test_reports_that_lie_are_dead_lettered_in_the_default_mode(
    management_broker: LocalBroker, tmp_path: Path
) -> None:
    result = forged_reports(management_broker, tmp_path)
    ev = result.evidence
    # Every forgery is dead-lettered, with a reason that says what was wrong.
    assert set(ev["dead"]) == set(ev["forged"]), ev["dead"]
    reasons = ev["dead"]
    assert (
        "claims node 'pupil-1' but was published by broker user 'pupil-2'"
        in reasons["forged-other-node"]
    )
    for key in ("forged-unknown-lesson", "forged-dev-unknown-lesson"):
        assert "which this master never made" in reasons[key]
    for key in ("forged-split", "forged-dev-split"):
        assert "but the lesson's split is" in reasons[key]
    # What is stored: the real pupil's reports and the honest refusal, nothing forged.
    stored = {(lesson, node): (split, error) for lesson, node, split, error in ev["stored"]}
    assert {k for k in stored if k[1] == NODE} == {(lesson, NODE) for lesson in ev["published"]}
    assert all(stored[(lesson, NODE)][1] is None for lesson in ev["published"])
    assert [k for k in stored if k[1] == LATE] == [(ev["honest"]["honest-error"], LATE)]
    assert stored[(ev["honest"]["honest-error"], LATE)][1] is not None
    assert (result.lost, result.duplicated, result.reports_received) == (0, 0, LESSONS)
    assert result.trained_twice == 0
    assert (ev["master_exit"], ev["pupil_exit"]) == (0, 0)
