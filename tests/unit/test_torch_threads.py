"""A pupil caps torch's threads whatever its backend, from its config or a default."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from shared import adapter
from shared.adapter import TORCH_THREADS_ENV, cap_torch_threads
from shared.config import load_settings
from shared.errors import ConfigError


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """torch's thread count and the configured cap are process-wide: put both back."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(adapter, "_configured_threads", None)
    monkeypatch.delenv(TORCH_THREADS_ENV, raising=False)
    yield
    torch.set_num_threads(threads)


def test_a_configured_number_is_set_and_kept_by_later_default_calls() -> None:
    torch.set_num_threads(1)
    assert cap_torch_threads(2) == min(2, os.cpu_count() or 1)
    # The embedded embedder calls without a number when it loads: the configured cap stays.
    assert cap_torch_threads() == min(2, os.cpu_count() or 1)


def test_the_default_is_half_the_cores_and_never_raises_a_lower_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    torch.set_num_threads(6)
    assert cap_torch_threads() == 4
    torch.set_num_threads(1)
    assert cap_torch_threads() == 1


def test_the_environment_sets_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(3)
    monkeypatch.setenv(TORCH_THREADS_ENV, "1")
    assert cap_torch_threads() == 1
    monkeypatch.setenv(TORCH_THREADS_ENV, "many")
    with pytest.raises(ConfigError, match=TORCH_THREADS_ENV):
        cap_torch_threads()


def test_the_pupil_config_names_the_cap() -> None:
    settings = load_settings(env={"DISTILL_SWARM__PUPIL__ADAPTER__THREADS": "3"})
    assert settings.pupil.adapter.threads == 3
    assert load_settings(env={}).pupil.adapter.threads is None
    with pytest.raises(ConfigError, match="threads"):
        load_settings(env={"DISTILL_SWARM__PUPIL__ADAPTER__THREADS": "0"})
