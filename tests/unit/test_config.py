"""Configuration: file, environment and CLI overrides, and one-line errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import load_settings
from shared.errors import ConfigError


def test_defaults_need_no_file() -> None:
    settings = load_settings(env={})
    assert settings.broker.namespace == "swarm"
    assert settings.master.generator.template == "master.j2"
    assert settings.pupil.generator.template == "pupil.j2"


def test_precedence_file_then_env_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[pupil]\nnode_id = "from-file"\n[broker]\nprefetch = 2\n')
    env = {"DISTILL_SWARM__PUPIL__NODE_ID": "from-env", "AMQP_URL": "amqp://u:p@h:1/%2F"}
    settings = load_settings(
        path, env=env, overrides={"broker.prefetch": 4, "pupil.state_dir": None}
    )
    assert settings.pupil.node_id == "from-env"
    assert settings.broker.prefetch == 4
    assert settings.broker.url == "amqp://u:p@h:1/%2F"


def test_yaml_works_too(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("master:\n  eval_fraction: 0.5\n")
    assert load_settings(path, env={}).master.eval_fraction == 0.5


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[broker]\nprefetch = 0\n", "broker.prefetch"),
        ("[pupil]\nnode_id = 'has space'\n", "pupil.node_id"),
        ("[pupil.generator]\nkind = 'openai'\n", "pupil.generator.kind"),
        ("[master]\nunknown = 1\n", "master.unknown"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"'{field}'") as info:
        load_settings(path, env={})
    assert "\n" not in str(info.value)


def test_bad_env_value_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"'broker\.heartbeat_s'"):
        load_settings(env={"DISTILL_SWARM__BROKER__HEARTBEAT_S": "soon"})


def test_unparseable_and_missing_files(tmp_path: Path) -> None:
    broken = tmp_path / "c.toml"
    broken.write_text("[broker\n")
    with pytest.raises(ConfigError, match="not valid"):
        load_settings(broken, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match=r"\.toml, \.yaml"):
        other = tmp_path / "c.ini"
        other.write_text("")
        load_settings(other, env={})
