"""The master's report consumer is sized by ``master.prefetch``; ``broker.prefetch`` stays the
pupils' (one lesson at a time on a Pi). docs/scale.md measured why: at prefetch 1 the master
waits a broker round trip per report and falls behind 200 reporting nodes."""

from __future__ import annotations

import pytest

from shared.config import load_settings
from shared.errors import ConfigError


def test_by_default_the_master_ingests_with_a_window_and_pupils_take_one_lesson() -> None:
    settings = load_settings(env={})
    ingest = settings.master_consumer_broker()
    assert settings.broker.prefetch == 1
    assert ingest.prefetch == settings.master.prefetch >= 10


def test_master_prefetch_is_configurable_apart_from_the_pupils() -> None:
    env = {"DISTILL_SWARM__MASTER__PREFETCH": "7", "DISTILL_SWARM__BROKER__PREFETCH": "3"}
    settings = load_settings(env=env)
    ingest = settings.master_consumer_broker()
    assert (ingest.prefetch, settings.broker.prefetch) == (7, 3)
    # Everything else about the connection is the broker section's.
    assert ingest.model_copy(update={"prefetch": 3}) == settings.broker


def test_a_master_prefetch_of_zero_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"'master\.prefetch'"):
        load_settings(env={"DISTILL_SWARM__MASTER__PREFETCH": "0"})
