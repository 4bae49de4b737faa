"""Prompt sets: loading, fixed and stable splits, and errors naming item and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from master.prompts import PromptItem, assign_split, bundled_prompt_set, load_prompts
from shared.errors import ConfigError


def test_bundled_demo_set_loads_with_both_splits() -> None:
    with bundled_prompt_set("demo.jsonl") as path:
        items = load_prompts(path)
    splits = {assign_split(i, 0.25, 0) for i in items}
    assert splits == {"train", "eval"}
    assert len({i.id for i in items}) == len(items)


def test_yaml_with_seed_goal_fields(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "prompts:\n"
        "  - goal_text: If I was to develop a self improving process what would be the steps?\n"
        "    goal_type: research\n"
        "    preferences: [be brief]\n"
    )
    (item,) = load_prompts(path)
    assert item.preferences == ["be brief"]
    assert item.id  # derived from the goal text
    assert item.model_extra == {"goal_type": "research"}


def test_split_is_stable_and_near_the_fraction() -> None:
    items = [PromptItem(id=f"p{i}", goal_text="g") for i in range(2000)]
    first = [assign_split(i, 0.25, seed=7) for i in items]
    assert first == [assign_split(i, 0.25, seed=7) for i in items]
    assert 0.2 < first.count("eval") / len(first) < 0.3


def test_errors_name_item_and_field(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"goal_text": "ok"}) + "\n" + json.dumps({"task": "x"}) + "\n")
    with pytest.raises(ConfigError, match="item 2, field 'goal_text'"):
        load_prompts(path)


def test_duplicate_ids_and_empty_sets_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "goal_text": "x"}\n{"id": "a", "goal_text": "y"}\n')
    with pytest.raises(ConfigError, match="repeats id 'a'"):
        load_prompts(path)
    path.write_text("")
    with pytest.raises(ConfigError, match="no prompts"):
        load_prompts(path)
