"""A real Prometheus scrapes a running master and pupil; we read the swarm back through its API.

The master and pupil are separate processes on the real broker and the embedded models (see
``tests/support/live_swarm.py``); Prometheus is the Debian ``prometheus`` binary, run with the
stack's own ``deploy/prometheus/prometheus.yml`` (targets rewritten) and ``alerts.yml``. Outside
CI the test is skipped when the binary is missing; under ``CI=true`` it fails.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support.live_swarm import (
    LESSONS,
    MASTER_JOB,
    NODE_ID,
    PUPIL_JOB,
    LivePrometheus,
    LiveSwarm,
    wait_for,
)

pytestmark = [pytest.mark.models, pytest.mark.broker]

SCRAPE_WAIT_S = 60


def values(prometheus: LivePrometheus, expr: str) -> list[float]:
    return [float(row["value"][1]) for row in prometheus.query(expr)]


def eventually(prometheus: LivePrometheus, expr: str, check: Callable[[list[float]], bool]) -> None:
    """Wait until the query's values pass ``check`` (the first scrapes take a second or two)."""
    wait_for(lambda: check(values(prometheus, expr)), SCRAPE_WAIT_S, f"{expr!r}", poll_s=0.5)


def test_prometheus_scrapes_both_services(live_prometheus: LivePrometheus) -> None:
    for job in (MASTER_JOB, PUPIL_JOB, "prometheus"):
        eventually(live_prometheus, f'up{{job="{job}"}}', lambda v: v == [1.0])
    eventually(
        live_prometheus,
        "distill_swarm_broker_connected",
        lambda v: len(v) == 2 and set(v) == {1.0},
    )
    roles = {
        row["metric"]["role"]: row["metric"]["job"]
        for row in live_prometheus.query("distill_swarm_build_info")
    }
    assert roles == {"master": MASTER_JOB, "pupil": PUPIL_JOB}


def test_the_pupils_own_figures(live_prometheus: LivePrometheus) -> None:
    job = f'job="{PUPIL_JOB}"'
    eventually(
        live_prometheus,
        f"sum(distill_swarm_lessons_consumed_total{{{job}}})",
        lambda v: v == [float(LESSONS)],
    )
    assert values(
        live_prometheus, f'distill_swarm_lessons_consumed_total{{{job},split="eval"}}'
    ) == [1.0]
    assert values(live_prometheus, f"distill_swarm_train_seconds_count{{{job}}}") == [2.0]
    assert values(live_prometheus, f"distill_swarm_adapter_loss{{{job}}}")
    methods = {
        row["metric"]["method"]
        for row in live_prometheus.query(f"distill_swarm_heldout_similarity{{{job}}}")
    }
    assert {"plain", "adapter", "guided", "retrieval"} <= methods
    rejected = f'distill_swarm_messages_rejected_total{{{job},queue="lessons",reason="invalid"}}'
    assert values(live_prometheus, rejected)[0] >= 1


def test_the_master_ingests_and_reexports_each_node(live_prometheus: LivePrometheus) -> None:
    job = f'job="{MASTER_JOB}"'
    eventually(
        live_prometheus,
        f'distill_swarm_reports_ingested_total{{{job},node="{NODE_ID}",result="ok"}}',
        lambda v: v == [float(LESSONS)],
    )
    assert values(live_prometheus, f"distill_swarm_lessons_published_total{{{job}}}") == [
        float(LESSONS)
    ]
    node = f'{job},node="{NODE_ID}"'
    # The node's figures as the master re-exports them, without scraping the node.
    assert values(live_prometheus, f"distill_swarm_node_adapter_loss{{{node}}}")
    similarity = values(
        live_prometheus, f'distill_swarm_node_heldout_similarity{{{node},method="plain"}}'
    )
    assert len(similarity) == 1 and -1.0 <= similarity[0] <= 1.0
    assert values(live_prometheus, f"distill_swarm_node_online{{{node}}}") == [1.0]
    assert (
        values(
            live_prometheus, f"time() - distill_swarm_node_last_seen_timestamp_seconds{{{node}}}"
        )[0]
        < 30
    )
    # Quantiles come out of the histograms the way the dashboard computes them.
    p95 = values(
        live_prometheus,
        "histogram_quantile(0.95, sum by (le) "
        f"(distill_swarm_node_generate_seconds_bucket{{{node}}}))",
    )
    assert len(p95) == 1 and 0 < p95[0] <= 600
    assert values(live_prometheus, f"distill_swarm_generate_seconds_count{{{job}}}") == [
        float(LESSONS)
    ]
    rejected = f'distill_swarm_messages_rejected_total{{{job},queue="reports",reason="invalid"}}'
    assert values(live_prometheus, rejected)[0] >= 1


def test_alert_rules_evaluate_and_the_dead_letters_alert_goes_off(
    live_prometheus: LivePrometheus, live_swarm: LiveSwarm
) -> None:
    def evaluated() -> bool:
        rules = [r for g in live_prometheus.api("rules")["groups"] for r in g["rules"]]
        return bool(rules) and all(r["lastEvaluation"] > "0001-01-01T00:00:00Z" for r in rules)

    wait_for(evaluated, SCRAPE_WAIT_S, "every alert rule to be evaluated", poll_s=0.5)
    rules = [r for g in live_prometheus.api("rules")["groups"] for r in g["rules"]]
    assert {r["health"] for r in rules} == {"ok"}, [r for r in rules if r["health"] != "ok"]

    def alerts() -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for alert in live_prometheus.api("alerts")["alerts"]:
            found.setdefault(alert["labels"]["alertname"], set()).add(
                alert["labels"].get("job", "")
            )
        return found

    # The alert needs a rise that Prometheus saw happen: dead-letter once more now that it scrapes.
    eventually(
        live_prometheus,
        'distill_swarm_messages_rejected_total{reason="invalid",queue=~"lessons|reports"}',
        lambda v: len(v) == 2,
    )
    live_swarm.send_garbage()
    # Both services dead-lettered a message: pending (for: 1m) or firing, for each of them.
    wait_for(
        lambda: alerts().get("DistillSwarmDeadLetters") == {MASTER_JOB, PUPIL_JOB},
        SCRAPE_WAIT_S,
        "the dead-letter alert",
        poll_s=0.5,
    )
    # A healthy, connected swarm trips nothing else.
    assert set(alerts()) == {"DistillSwarmDeadLetters"}
