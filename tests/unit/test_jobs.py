"""Job kinds, job messages, the jobs policy in config, and the job store's state machine."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from distill_swarm.client import split_payload
from master.job_store import JOB_SCHEMA, JobStore
from master.jobs import is_sampled
from master.prompts import load_prompts
from master.store import Store
from shared.config import load_settings
from shared.errors import ConfigError, DecodeError
from shared.job_metrics import FALLBACK_REASONS
from shared.jobs import CRITICAL, KINDS, OFFLOADABLE, Fallback, InvalidJob, render_goal
from shared.messages import Job, JobResult, decode, encode

BENCHMARK = Path(__file__).resolve().parents[2] / "master" / "prompt_sets" / "benchmark.jsonl"
PAYLOADS = {
    "answer_scoring": ("There are seven continents.", {"question": "How many continents?"}),
    "summarisation": ("The council voted to extend the bike lanes.", {}),
    "translation": ("Where is the station?", {"language": "French"}),
    "query_routing": ("I was charged twice.", {"routes": "billing, technical support, sales"}),
    "keyword_tagging": ("Repairing a leaking kitchen tap", {}),
    "hypothesis_summarisation": ("Stretch breaks reduce back pain.", {}),
    "complex_reasoning": ("Should we merge the two teams?", {}),
    "legal_medical": ("May I stop my medication early?", {}),
}


def job(kind: str = "summarisation", **extra: object) -> Job:
    text, params = PAYLOADS[kind]
    fields: dict[str, object] = {
        "job_id": "j-1", "job_kind": kind, "text": text, "params": params,
        "deadline": datetime.now(UTC) + timedelta(seconds=30),
    }  # fmt: skip
    return Job.model_validate({**fields, **extra})


# -- kinds and goals ---------------------------------------------------------------------------


def test_the_seed_table_decides_what_is_critical() -> None:
    assert set(CRITICAL) == {"complex_reasoning", "legal_medical"}
    assert set(OFFLOADABLE) == set(KINDS) - set(CRITICAL)
    assert set(PAYLOADS) == set(KINDS)


def test_every_goal_is_phrased_like_the_lessons_of_its_task() -> None:
    # Retrieval finds the lessons of the same task only if a job's goal reads like them.
    openings = {item.task: " ".join(item.goal_text.split()[:2]) for item in load_prompts(BENCHMARK)}
    for kind in OFFLOADABLE:
        text, params = PAYLOADS[kind]
        goal = render_goal(kind, text, params)
        assert text in goal
        if kind != "keyword_tagging":  # lessons say "Give three", jobs "Give 3"
            assert goal.startswith(openings[kind]), (kind, goal, openings[kind])
    routing = render_goal("query_routing", *PAYLOADS["query_routing"])
    assert "billing, technical support or sales?" in routing


@pytest.mark.parametrize(
    ("kind", "text", "params", "says"),
    [
        ("weather", "x", {}, "unknown job kind 'weather'"),
        ("translation", "Hello", {}, "needs the parameter(s): language"),
        ("translation", "Hello", {"language": "  "}, "needs the parameter(s): language"),
        ("summarisation", "   ", {}, "empty text"),
        ("summarisation", "x", {"language": "fr"}, "does not take the parameter(s) language"),
        ("query_routing", "x", {"routes": " , "}, "at least one route"),
    ],
)
def test_an_incomplete_job_is_refused_with_what_is_missing(
    kind: str, text: str, params: dict[str, str], says: str
) -> None:
    with pytest.raises(InvalidJob, match=says.replace("(", r"\(").replace(")", r"\)")):
        render_goal(kind, text, params)


# -- messages ----------------------------------------------------------------------------------


def test_job_and_result_round_trip() -> None:
    original = job("translation")
    assert decode(encode(original), Job) == original
    result = JobResult(job_id="j-1", job_kind="translation", answered_by="pi-1", output="Où?")
    assert decode(encode(result), JobResult) == result


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"deadline": "2030-01-01T00:00:00"}, "deadline"),
        ({"job_kind": "Legal Medical"}, "job_kind"),
        ({"job_id": "has space"}, "job_id"),
        ({"text": ""}, "text"),
        ({"params": {"BAD KEY": "x"}}, "params"),
    ],
)
def test_a_malformed_job_fails_to_decode_naming_the_field(
    change: dict[str, object], field: str
) -> None:
    body = json.loads(encode(job()))
    body.update(change)
    with pytest.raises(DecodeError, match=field):
        decode(json.dumps(body).encode(), Job)


def test_a_payload_is_a_text_or_a_mapping_with_text_and_params() -> None:
    assert split_payload("hello") == ("hello", {})
    assert split_payload({"text": "hi", "language": "French"}) == ("hi", {"language": "French"})


# -- policy ------------------------------------------------------------------------------------


def test_the_policy_offloads_every_kind_not_marked_critical() -> None:
    critical = "translation," + ",".join(CRITICAL)
    settings = load_settings(env={}, overrides={"master.jobs.critical": critical})
    assert "translation" not in settings.master.jobs.offloaded
    assert set(settings.master.jobs.offloaded) == set(OFFLOADABLE) - {"translation"}
    assert set(load_settings(env={}).master.jobs.offloaded) == set(OFFLOADABLE)


def test_a_critical_kind_can_neither_be_offloaded_nor_done_by_a_pupil() -> None:
    with pytest.raises(ConfigError, match="legal_medical is critical by design"):
        load_settings(env={}, overrides={"master.jobs.critical": ["complex_reasoning"]})
    with pytest.raises(ConfigError, match=r"'pupil\.jobs'.*legal_medical is critical"):
        load_settings(env={"DISTILL_SWARM__PUPIL__JOBS": "summarisation,legal_medical"})
    with pytest.raises(ConfigError, match="unknown job kind"):
        load_settings(env={"DISTILL_SWARM__PUPIL__JOBS": "astrology"})


def test_a_partial_generator_section_keeps_each_roles_defaults(tmp_path: Path) -> None:
    # Setting one field of [master.generator] must not drop the master's own template.
    config = tmp_path / "c.toml"
    config.write_text("[master.generator]\nmax_tokens = 8\n[pupil.generator]\nmax_tokens = 8\n")
    settings = load_settings(config, env={})
    assert settings.master.generator.template == "master.j2"
    assert settings.pupil.generator.temperature == 0.8


# -- the store's state machine -----------------------------------------------------------------


@pytest.fixture
def jobs(tmp_path: Path) -> JobStore:
    return JobStore(Store(tmp_path / "master.sqlite3"))


def answer(by: str, output: str = "ok", **extra: object) -> JobResult:
    return JobResult.model_validate(
        {"job_id": "j-1", "job_kind": "summarisation", "answered_by": by, "output": output, **extra}
    )


def test_a_job_is_stored_once_and_answered_once(jobs: JobStore) -> None:
    assert jobs.add(job(), "offloaded", "reply-q", "j-1")
    assert not jobs.add(job(), "offloaded", "reply-q", "j-1")  # a redelivered submission
    assert jobs.finish(answer("pi-1", "first"))
    assert not jobs.finish(answer("pi-2", "second"))  # a late or duplicate answer loses
    row = jobs.get("j-1")
    assert row is not None and row.state == "done" and row.output == "first"
    assert row.answered_by == "pi-1"
    assert row.result is not None and row.result.output == "first"
    assert jobs.open_jobs() == []


def test_the_deadline_moves_a_job_to_the_master_once(jobs: JobStore) -> None:
    jobs.add(job(), "offloaded", None, "j-1")
    assert jobs.to_master("j-1", Fallback.DEADLINE, "deadline: no pupil answered in time")
    assert not jobs.to_master("j-1", Fallback.PUPIL_FAILED, "again")  # already the master's
    row = jobs.get("j-1")
    assert row is not None and row.state == "master"
    assert row.fallback == "deadline: no pupil answered in time"
    assert row.fallback_code is Fallback.DEADLINE
    assert [r.job_id for r in jobs.open_jobs()] == ["j-1"]
    # A pupil answering before the master does still wins, and the row says no fallback happened.
    assert jobs.finish(answer("pi-1"))
    row = jobs.get("j-1")
    assert row is not None and row.answered_by == "pi-1" and row.fallback is None
    assert row.fallback_code is None


def test_a_failed_answer_is_stored_as_failed(jobs: JobStore) -> None:
    jobs.add(job("legal_medical"), "master", None, "j-1")
    assert jobs.get("j-1").fallback_code is Fallback.CRITICAL  # type: ignore[union-attr]
    assert jobs.finish(answer("master", "", error="backend down", fallback="critical"))
    row = jobs.get("j-1")
    assert row is not None and row.state == "failed" and row.error == "backend down"
    assert not jobs.to_master("j-1", Fallback.DEADLINE, "deadline")


def test_agreement_is_averaged_per_kind_and_node(jobs: JobStore) -> None:
    for i, (node, value) in enumerate([("pi-1", 0.5), ("pi-1", 0.7), ("pi-2", 0.9)]):
        jobs.add(job(job_id=f"j-{i}"), "offloaded", None, None)
        jobs.add_sample(f"j-{i}", "summarisation", node, "pupil", "master", value)
    assert jobs.agreement() == [
        ("summarisation", "pi-1", 2, pytest.approx(0.6)),
        ("summarisation", "pi-2", 1, pytest.approx(0.9)),
    ]
    assert [r.job_id for r in jobs.recent(2)] == ["j-2", "j-1"]
    assert jobs.recent(5, kind="translation") == []


# -- metrics and sampling ----------------------------------------------------------------------


def test_fallback_labels_are_the_ones_the_dashboard_and_alerts_know() -> None:
    assert FALLBACK_REASONS == ("critical", "deadline", "pupil_failed", "unroutable")


def test_a_store_from_before_fallback_codes_gets_them_from_its_texts(tmp_path: Path) -> None:
    store = Store(tmp_path / "old.sqlite3")
    db = store.connection()
    db.executescript(JOB_SCHEMA.replace("    fallback_code TEXT,", ""))
    texts = [
        "critical",
        "deadline: no pupil answered in time",
        "unroutable: no queue",
        "pupil failed: x",
    ]
    for i, text in enumerate(texts):
        db.execute(
            "INSERT INTO jobs (job_id, kind, text, params, submitted_at, deadline, state, fallback)"
            " VALUES (?, 'translation', 't', '{}', '2026-01-01T00:00:00+00:00',"
            " '2026-01-01T00:00:00+00:00', 'master', ?)",
            (f"j-{i}", text),
        )
    jobs = JobStore(store)
    codes = [row.fallback_code for row in jobs.open_jobs()]
    assert codes == [
        Fallback.CRITICAL,
        Fallback.DEADLINE,
        Fallback.UNROUTABLE,
        Fallback.PUPIL_FAILED,
    ]


def test_sampling_takes_about_the_configured_share_and_the_same_jobs_every_time() -> None:
    ids = [f"job-{i}" for i in range(4000)]
    tenth = [is_sampled(i, 0.1) for i in ids]
    assert 0.08 < sum(tenth) / len(ids) < 0.12
    assert tenth == [is_sampled(i, 0.1) for i in ids]
    assert not any(is_sampled(i, 0.0) for i in ids)
    assert all(is_sampled(i, 1.0) for i in ids)
