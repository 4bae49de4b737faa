"""The bundled benchmark prompt set: size, balance, fixed split and eval points spread in order."""

from __future__ import annotations

import re
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest

from master.prompts import PromptItem, load_prompts

ROOT = Path(__file__).resolve().parents[2]
BENCHMARK = ROOT / "master" / "prompt_sets" / "benchmark.jsonl"
OTHER_SETS = (
    ROOT / "master" / "prompt_sets" / "demo.jsonl",
    ROOT / "tests" / "e2e" / "prompts.jsonl",
)

# The seed's six task kinds, with the short id prefix and the wording each goal starts with.
KINDS = {
    "answer_scoring": ("score", "Score this answer to '"),
    "summarisation": ("sum", "Summarise in one sentence: "),
    "translation": ("tr", "Translate into "),
    "query_routing": ("route", "Which team should handle this "),
    "keyword_tagging": ("tag", "Give three keyword tags for this "),
    "hypothesis_summarisation": ("hyp", "Summarise this hypothesis in one sentence: "),
}


@pytest.fixture(scope="module")
def items() -> list[PromptItem]:
    return load_prompts(BENCHMARK)


def _normalised(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def test_size_and_six_balanced_kinds(items: list[PromptItem]) -> None:
    assert len(items) >= 120
    assert Counter(i.task for i in items) == dict.fromkeys(KINDS, 24)


def test_fixed_split_per_kind(items: list[PromptItem]) -> None:
    for task in KINDS:
        splits = Counter(i.split for i in items if i.task == task)
        assert splits == {"eval": 6, "train": 18}, task


def test_ids_and_goal_texts_are_unique(items: list[PromptItem]) -> None:
    assert len({i.id for i in items}) == len(items)
    assert len({_normalised(i.goal_text) for i in items}) == len(items)


def test_ids_and_wording_follow_the_kind(items: list[PromptItem]) -> None:
    for item in items:
        short, opening = KINDS[item.task]
        assert re.fullmatch(rf"{short}-\d\d", item.id), item.id
        assert item.goal_text.startswith(opening), item.id


def test_no_goal_shared_with_other_bundled_sets(items: list[PromptItem]) -> None:
    ours = {_normalised(i.goal_text) for i in items}
    for path in OTHER_SETS:
        theirs = {_normalised(i.goal_text) for i in load_prompts(path)}
        assert not ours & theirs, path


def test_goals_are_short(items: list[PromptItem]) -> None:
    for item in items:
        assert len(item.goal_text) <= 300, item.id


def test_eval_items_spread_through_the_file(items: list[PromptItem]) -> None:
    quarter = len(items) / 4
    per_quarter = Counter(int(n // quarter) for n, i in enumerate(items) if i.split == "eval")
    for q in range(4):
        assert 6 <= per_quarter[q] <= 12, (q, per_quarter)
    # Task kinds are interleaved: no kind twice in a row.
    assert all(a.task != b.task for a, b in pairwise(items))
