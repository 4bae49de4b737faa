"""A pupil's state directory: per-node default, one owner node, one process at a time."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pupil_node.state import NodeState, default_state_dir, resolve_state_dir
from shared.errors import ConfigError, StateDirInUse


def test_the_default_is_per_node_under_the_users_state_directory(tmp_path: Path) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path / "xdg")}
    assert default_state_dir("pi-7", env) == tmp_path / "xdg" / "distill-swarm" / "pupil" / "pi-7"
    assert default_state_dir("a", env) != default_state_dir("b", env)
    # Unset, empty or relative (invalid per the XDG spec): ~/.local/state.
    home_default = Path.home() / ".local" / "state" / "distill-swarm" / "pupil" / "a"
    for env in ({}, {"XDG_STATE_HOME": ""}, {"XDG_STATE_HOME": "relative/dir"}):
        assert default_state_dir("a", env) == home_default
    assert resolve_state_dir(tmp_path / "given", "a") == tmp_path / "given"


def test_a_state_dir_records_its_owner_and_refuses_another_node(tmp_path: Path) -> None:
    state = NodeState.open(tmp_path / "s", "a")
    state.close()
    assert json.loads((tmp_path / "s" / "node.json").read_text())["node_id"] == "a"
    with pytest.raises(ConfigError, match="belongs to node 'a', not 'b'"):
        NodeState.open(tmp_path / "s", "b")
    NodeState.open(tmp_path / "s", "a").close()  # the owner itself comes back


def test_a_second_opener_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    first = NodeState.open(tmp_path / "s", "a")
    with pytest.raises(StateDirInUse, match="in use by another pupil process"):
        NodeState.open(tmp_path / "s", "a")
    first.close()
    NodeState.open(tmp_path / "s", "a").close()


def test_a_state_dir_from_before_owner_files_is_adopted_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / "journal.sqlite3").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        NodeState.open(old, "b").close()
    assert "node b adopts it" in caplog.text and "journal.sqlite3" in caplog.text
    assert json.loads((old / "node.json").read_text())["node_id"] == "b"


def test_an_unreadable_owner_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "node.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"node\.json is unreadable"):
        NodeState.open(tmp_path / "s", "a")
