"""`eval --judge`: the score parser, and a real judge run on the embedded model, cached."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from master.evaluation import PLAIN, load, summarise
from master.judge import MAX_TOKENS, parse_score, render_judge_prompt, run_judge
from master.store import Store
from shared.backends import GenerationParams, TextGenerator, build_generator
from shared.messages import Embedding, Lesson, Report

pytestmark = pytest.mark.models

MASTER_ANSWER = "Answer: Paris.\nReason: It is the capital of France.\nTip: Visit in spring."


@pytest.mark.parametrize(
    ("output", "score"),
    [
        ("Score: 7", 7),
        (" Score: 10\n", 10),
        ("**Score:** 9", 9),
        ("score: 8/10 - close in content, not in style", 8),
        ("Score (1-10): 4", 4),
        ("Score is 3.", 3),
        ("I would rate it 6 out of 10.", 6),
        ("7/10", 7),
        ("10 points.", 10),
        ("The answers agree on the facts. 8", 8),
    ],
)
def test_scores_are_read_from_realistic_outputs(output: str, score: int) -> None:
    assert parse_score(output) == score


@pytest.mark.parametrize(
    "output",
    [
        "",
        "No idea.",
        "Score: high",
        "Score: 0",
        "Score: 85",
        "Score: 7.5",
        "7.5/10",
        "Answer: Paris.\nReason: It is the capital and",
    ],
)
def test_outputs_without_a_valid_score_are_unparseable(output: str) -> None:
    assert parse_score(output) is None


def test_prompt_holds_both_answers_and_asks_for_a_score() -> None:
    prompt = render_judge_prompt("What is the capital?", MASTER_ANSWER, "")
    assert MASTER_ANSWER in prompt and "(no answer)" in prompt
    assert "Score: N" in prompt and "What is the capital?" in prompt


class CountingGenerator:
    """A thin wrapper that counts how often the judge is asked."""

    def __init__(self, inner: TextGenerator) -> None:
        self.inner = inner
        self.model_name = inner.model_name
        self.calls = 0
        self.max_tokens: list[int] = []

    def generate(self, prompt: str, params: GenerationParams, system: str | None = None) -> str:
        self.calls += 1
        self.max_tokens.append(params.max_tokens)
        assert params.temperature == 0.0
        return self.inner.generate(prompt, params, system)


def make_store(path: Path) -> Store:
    store = Store(path)
    for i, pupil in enumerate(["Paris is the capital of France.", "I like turtles."]):
        lesson = Lesson(
            lesson_id=f"e{i}",
            task="qa",
            prompt="What is the capital of France?",
            goal_text="What is the capital of France?",
            master_model="m",
            master_answer=MASTER_ANSWER,
            reference=Embedding(model="e", dim=2, values=[1.0, 0.0]),
            split="eval",
        )
        store.save_lesson(lesson, f"e{i}", i, ceiling=1.0)
        store.add_report(
            Report(
                lesson_id=f"e{i}",
                node_id="a",
                split="eval",
                pupil_model="p",
                pupil_answer=pupil,
                similarity_before=0.5,
                similarity_adapted=0.5,
                guided={"retrieval": 0.6},
                guided_answers={"retrieval": "Answer: Paris.\nReason: capital.\nTip: go."},
            )
        )
    return store


def test_a_real_judge_run_is_stored_counted_and_cached(tmp_path: Path) -> None:
    store = make_store(tmp_path / "master.sqlite3")
    judge = CountingGenerator(build_generator("embedded", "gemma3-270m", n_threads=2))
    scores = run_judge(store, judge, limit_per_node=30, progress=False)
    # 2 reports x (plain + retrieval).
    assert judge.calls == 4 and set(judge.max_tokens) == {MAX_TOKENS} and MAX_TOKENS <= 16
    assert set(scores) == {(f"e{i}", "a", m) for i in range(2) for m in (PLAIN, "retrieval")}
    assert scores == store.judgements(judge.model_name)
    assert all(s is None or 1 <= s <= 10 for s in scores.values())
    with sqlite3.connect(tmp_path / "master.sqlite3") as db:
        stored = db.execute("SELECT score, raw, judge_model FROM judgements").fetchall()
    assert len(stored) == 4
    # A NULL score is an unparseable output, kept with its text so it can be audited.
    assert all(
        parse_score(raw) == score and model == judge.model_name for score, raw, model in stored
    )

    rows = summarise(load(store), resamples=200, judgements=scores, judge={"model": "j"}).rows
    plain = next(r for r in rows if r.node == "a" and r.method == PLAIN)
    unparsed = sum(scores[(f"e{i}", "a", PLAIN)] is None for i in range(2))
    assert plain.judge_n == 2 and plain.judge_unparsed == unparsed

    again = run_judge(store, judge, limit_per_node=30, progress=False)
    assert again == scores and judge.calls == 4  # the rerun asked nothing new

    # A lower limit selects a subset of the cached answers; still nothing new is asked.
    assert len(run_judge(store, judge, limit_per_node=1, progress=False)) == 2
    assert judge.calls == 4
