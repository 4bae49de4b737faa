"""Prompt rendering from the packaged and user Jinja2 templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.backends.templates import render_prompt
from shared.errors import ConfigError

GOAL = "Why is the sky blue?"


def test_pupil_template_is_the_seeds_plain_prompt() -> None:
    assert render_prompt("pupil", GOAL) == (
        "You are a helpful assistant\nAnswer this question:\nWhy is the sky blue?"
    )


def test_preferences_and_instructions_are_listed_in_order() -> None:
    prompt = render_prompt(
        "pupil", GOAL, preferences=["short", "plain words"], instructions=["cite physics"]
    )
    assert prompt.endswith(
        "Use these preferences:\n- short\n- plain words\nAdditional instructions:\n- cite physics"
    )


def test_empty_preferences_leave_no_heading() -> None:
    prompt = render_prompt("master", GOAL, preferences=[], instructions=["one line"])
    assert "preferences" not in prompt
    assert prompt.endswith("Additional instructions:\n- one line")


def test_master_asks_for_a_fixed_structure_unlike_the_pupil() -> None:
    master = render_prompt("master.j2", GOAL)
    assert GOAL in master
    assert all(label in master for label in ("Answer:", "Reason:", "Tip:"))
    assert master != render_prompt("pupil.j2", GOAL)


def test_inline_template_text() -> None:
    assert render_prompt("Q: {{ goal_text }} ({{ preferences | length }})", GOAL, ["a"]) == (
        "Q: Why is the sky blue? (1)"
    )


def test_user_template_file_with_the_seeds_variables(tmp_path: Path) -> None:
    path = tmp_path / "mine.j2"
    path.write_text(
        "Goal: {{ goal.goal_text }}\n{% for i in instructions %}* {{ i }}\n{% endfor %}\n"
    )
    assert render_prompt(str(path), GOAL, instructions=["x", "y"]) == (
        "Goal: Why is the sky blue?\n* x\n* y"
    )


def test_unknown_template_name_is_named_in_the_error() -> None:
    with pytest.raises(ConfigError, match="'teacher'"):
        render_prompt("teacher", GOAL)


def test_missing_template_file_is_named_in_the_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.j2"
    with pytest.raises(ConfigError, match=r"nope\.j2"):
        render_prompt(str(missing), GOAL)


def test_undefined_variable_is_an_error_not_a_blank() -> None:
    with pytest.raises(ConfigError, match="goal_txt"):
        render_prompt("{{ goal_txt }}", GOAL)


def test_syntax_error_names_the_line() -> None:
    with pytest.raises(ConfigError, match="line 2"):
        render_prompt("ok\n{% if %}", GOAL)
