"""Faults on the real broker and real OS processes: what a user of the swarm would notice.

Each test runs one scenario driver (shared with ``bench/faults.py``) and asserts on what it saw:
the wire tap (every lesson and report publish), the master's store, the pupil's log, journal and
checkpoints. About 4 minutes on 2 cores: `pytest -m faults tests/faults`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distill_swarm.local_broker import LocalBroker
from tests.faults.broker_faults import broker_restarted, slower_than_consumer_timeout
from tests.faults.dns_faults import broker_name_unresolvable, can_isolate_hosts
from tests.faults.garbage import CATEGORIES
from tests.faults.input_faults import bad_input, corrupt_checkpoint
from tests.faults.model_faults import JOBS_WHILE_DOWN, jobs_while_model_down, model_server_outage
from tests.faults.process_faults import (
    LESSONS,
    master_killed_mid_run,
    pupil_killed_mid_lesson,
    pupil_offline_backlog,
)

pytestmark = [pytest.mark.faults, pytest.mark.models, pytest.mark.broker]


def test_a_pupil_killed_mid_lesson_redoes_it_once(
    fault_broker: LocalBroker, tmp_path: Path
) -> None:
    result = pupil_killed_mid_lesson(fault_broker, tmp_path)
    ev = result.evidence
    assert (result.lost, result.duplicated, result.reports_received) == (0, 0, LESSONS)
    # Started before the kill, started again after the restart, and never a third time.
    assert ev["started_count"] == 2, ev["killed_lesson"]
    assert ev["checkpoint_version_at_kill"] is not None  # the file on disk loaded after the kill
    # The master counted every report once, the killed lesson's included.
    assert len(ev["delivery_counts"]) == LESSONS
    assert set(ev["delivery_counts"].values()) == {1}
    # The adapter checkpoint loads and holds each train lesson exactly once.
    assert ev["adapter_version"] == ev["prompt_adapter_version"] == len(ev["train_lessons"])
    assert result.trained_twice == 0  # from the pupil's checkpoints
    assert ev["adapter_lessons"] == ev["train_lessons"]
    assert (ev["master_exit"], ev["pupil_exit"]) == (0, 0)


def test_a_broker_restart_is_survived_without_loss(
    fault_broker: LocalBroker, tmp_path: Path
) -> None:
    result = broker_restarted(fault_broker, tmp_path)
    ev = result.evidence
    assert (result.lost, result.reports_received) == (0, LESSONS)
    assert ev["stored_reports"] == LESSONS  # a duplicate on the wire is stored once
    assert result.trained_twice == 0  # from the pupil's checkpoints
    # Both services noticed, reconnected by themselves and kept working: nobody restarted them.
    assert ev["pupil_survived"] and (ev["master_exit"], ev["pupil_exit"]) == (0, 0)
    for log in (ev["master_log"], ev["pupil_log"]):
        _, _, after = log.partition("lost the broker connection")
        assert "consuming" in after, log[-2000:]
    # The restart came mid-run: the master ingested reports after it.
    assert "master.service: report" in ev["master_log"].partition("lost the broker")[2]


def test_a_restarted_master_resumes_without_republishing(
    fault_broker: LocalBroker, tmp_path: Path
) -> None:
    result = master_killed_mid_run(fault_broker, tmp_path)
    ev = result.evidence
    assert 2 <= len(ev["published_at_kill"]) < LESSONS  # killed mid-run
    assert (result.lost, result.reports_received) == (0, LESSONS)
    assert len(ev["published_after"]) == LESSONS
    assert result.trained_twice == 0  # from the pupil's checkpoints
    # Lessons marked published before the kill went out once; only a lesson saved but not yet
    # marked published may go out again (the pupil's journal then absorbs it).
    publishes = ev["lesson_publishes"]
    assert all(publishes[lesson] == 1 for lesson in ev["published_at_kill"])
    assert {lesson for lesson, n in publishes.items() if n > 1} <= set(ev["unpublished_at_kill"])
    # One stored report per (lesson, node), however often one was delivered.
    assert ev["stored_reports"] == LESSONS
    assert ev["master_exit"] == 0


def test_a_pupil_back_from_offline_works_through_its_backlog_in_order(
    fault_broker: LocalBroker, tmp_path: Path
) -> None:
    result = pupil_offline_backlog(fault_broker, tmp_path)
    ev = result.evidence
    assert ev["backlog"] >= 1
    assert (result.lost, result.duplicated) == (0, 0)
    assert ev["report_order"] == ev["publish_order"]
    assert result.trained_twice == 0  # from the pupil's checkpoints
    assert (ev["stop_exit"], ev["pupil_exit"], ev["master_exit"]) == (0, 0, 0)


def test_a_node_slower_than_consumer_timeout_still_learns_each_lesson_once(
    timeout_broker: LocalBroker, tmp_path: Path
) -> None:
    result = slower_than_consumer_timeout(timeout_broker, tmp_path)
    ev = result.evidence
    assert ev["channel_closures"] >= 1  # the broker did close the channel for the timeout
    # Each lesson was worked on once, reported once, and its redelivery only acked.
    assert ev["started"] == result.lessons_sent
    assert (result.lost, result.duplicated) == (0, 0)
    assert ev["acked_from_journal"] >= 1
    assert ev["adapter_version"] == result.lessons_sent
    assert result.trained_twice == 0  # from the pupil's checkpoints
    assert ev["pupil_exit"] == 0


def test_bad_input_is_dead_lettered_with_a_reason_and_the_pupil_goes_on(
    fault_broker: LocalBroker, tmp_path: Path
) -> None:
    result = bad_input(fault_broker, tmp_path)
    ev = result.evidence
    bad, dead = ev["bad_ids"], ev["dead_letters"]
    assert set(bad.values()) == set(CATEGORIES)  # every kind of bad input was sent
    assert set(dead) == set(bad)  # every bad body, and nothing else, is dead-lettered
    for message_id, (reason, origin) in dead.items():
        assert reason, f"{message_id} ({bad[message_id]}) has no reason header"
        assert origin.endswith(".pupil.pupil-1")
    assert sum(ev["rejected_delta"].values()) == len(bad)
    # A lesson from another embedding space also gets an error report, so the master knows why.
    assert ev["refusal_reports"] == ev["rejected_delta"]["embedding_mismatch"] > 0
    assert (result.lost, result.duplicated) == (0, 0)  # the valid lessons after them went through
    assert result.trained_twice == 0  # from the pupil's checkpoints
    assert ev["pupil_alive"] and ev["pupil_exit"] == 0


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(
    fault_broker: LocalBroker, tmp_path: Path
) -> None:
    result = corrupt_checkpoint(fault_broker, tmp_path)
    ev = result.evidence
    assert ev["fallbacks"] == 2, ev["log"]  # both adapters, each saying so in the log
    assert ev["loaded_v1"] == 2, ev["log"]
    # It learns on from the previous version: 1 + the new lesson.
    assert ev["report_adapter_versions"] == [2]
    assert set(ev["versions_after"].values()) == {2}
    assert result.trained_twice == 0  # from the pupil's checkpoints
    assert (result.lost, ev["pupil_exit"]) == (0, 0)


def test_a_model_server_outage_pauses_the_swarm_and_loses_nothing(
    fault_broker: LocalBroker, tmp_path: Path
) -> None:
    result = model_server_outage(fault_broker, tmp_path)
    ev = result.evidence
    assert ev["published_at_stop"] < LESSONS  # the outage came mid-run
    # Nothing dead-lettered, nothing lost, nothing reported or trained twice.
    assert ev["dead_letters"] == 0, ev["pupil_log"][-3000:]
    assert (result.lost, result.duplicated, result.reports_received) == (0, 0, LESSONS)
    assert result.trained_twice == 0
    assert ev["adapter_lessons"] == ev["train_lessons"]
    # The pupil said so: in its log, on /metrics, and to the master (`status` shows the state).
    assert ev["pupil_said_down"] and ev["pupil_said_back"], ev["pupil_log"][-3000:]
    assert "model down" in ev["node_states_during"], ev["node_states_during"]
    assert 0.0 in ev["model_up_during"]
    assert ev["model_metrics_after"]["distill_swarm_model_up"] == 1.0
    assert ev["model_metrics_after"]["distill_swarm_model_outages_total"] >= 1
    assert ev["node_states_after"] == ["online"]
    # The master's publisher waited for its model instead of failing the run.
    assert ev["master_said_down"], ev["master_log"][-3000:]
    assert (ev["master_exit"], ev["pupil_exit"]) == (0, 0), ev["master_log"][-3000:]


def test_a_pupil_whose_model_is_down_takes_no_jobs_until_it_is_back(
    fault_broker: LocalBroker, tmp_path: Path
) -> None:
    ev = jobs_while_model_down(fault_broker, tmp_path)
    results = ev["results"]
    # The job that found the model down was answered at once with the reason (the master then
    # answers it itself); nothing else was taken and failed while the model was down.
    assert results["first"].error is not None and "Unreachable" in results["first"].error
    assert ev["answered_during_outage"] == ["first"], ev["pupil_log"][-3000:]
    # One job waits in the paused consumer (its prefetch window), the rest in the shared queue
    # for pupils whose model answers.
    assert ev["queue_while_down"] == (JOBS_WHILE_DOWN - 1, 1)
    # Once the model is back, every one of them is answered, none with an error.
    later = [results[f"later-{n}"] for n in range(JOBS_WHILE_DOWN)]
    assert all(r.error is None and r.output for r in later), [r.error for r in later]
    assert ev["pupil_exit"] == 0


def test_a_broker_name_that_stops_resolving_is_waited_for_not_fatal(
    fault_broker: LocalBroker, tmp_path: Path
) -> None:
    if not can_isolate_hosts():
        reason = "needs root and mount namespaces (unshare -m) for a private /etc/hosts"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)  # CI runs as root: this fault must be tested there
        pytest.skip(reason)
    result = broker_name_unresolvable(fault_broker, tmp_path)
    ev = result.evidence
    # At start: the broker's exit code and one `error:` line, not a traceback.
    assert ev["start_exit"] == ev["expected_start_exit"], ev["start_log"][-2000:]
    assert len(ev["start_error_lines"]) == 1, ev["start_log"][-2000:]
    assert "Traceback" not in ev["start_log"], ev["start_log"][-3000:]
    # While running: it kept trying through the outage and caught up afterwards.
    assert ev["survived_outage"] and ev["failed_attempts"] >= 2, ev["pupil_log"][-3000:]
    assert "Traceback" not in ev["pupil_log"], ev["pupil_log"][-3000:]
    assert (result.lost, result.duplicated, result.reports_received) == (0, 0, 4)
    assert result.trained_twice == 0  # from the pupil's checkpoints
    assert ev["pupil_exit"] == 0
