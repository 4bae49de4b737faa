"""Bad command-line input: a non-zero exit and one line that says what was wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distill_swarm", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.lower().startswith("error")]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("pupil", "run"), "no node id"),
        (("pupil", "run", "--node-id", "has space"), "'pupil.node_id'"),
        (("submit", "weather_forecast", "--input", "x.txt"), "cannot read --input x.txt"),
        (("submit", "summarisation", "--param", "oops"), "use KEY=VALUE"),
        (("jobs", "--store", "nowhere.sqlite3"), "no master store at nowhere.sqlite3"),
        (("master", "run", "--prompts", "missing.jsonl"), "missing.jsonl does not exist"),
        (("status", "--store", "nowhere.sqlite3"), "no master store at nowhere.sqlite3"),
        (("demo", "--nodes", "0"), "'--nodes'"),
        (("demo", "--prompts", "missing.jsonl"), "missing.jsonl does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert expected in line


def test_submit_refuses_an_unknown_kind_or_a_missing_parameter(tmp_path: Path) -> None:
    text = tmp_path / "job.txt"
    text.write_text("Good morning")
    unknown = run_cli("submit", "weather_forecast", "--input", str(text))
    missing = run_cli("submit", "translation", "--input", str(text))
    assert unknown.returncode == missing.returncode == 2
    (line,) = error_lines(unknown)
    assert "unknown job kind 'weather_forecast'" in line and "summarisation" in line
    (line,) = error_lines(missing)
    assert "translation job needs the parameter(s): language" in line


def test_bad_config_file_names_the_field(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[broker]\nprefetch = 0\n")
    result = run_cli("pupil", "run", "--node-id", "a", "--config", str(config))
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert "'broker.prefetch'" in line and str(config) in line


def test_bad_prompt_item_names_item_and_field(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"goal_text": "fine"}\n{"goal_text": ""}\n')
    result = run_cli("master", "run", "--prompts", str(prompts))
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert "item 2, field 'goal_text'" in line
