"""Fixtures for the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for a module's tests, restored afterwards (the setting is global).

    Matrices this small gain nothing from threads, and on a busy CI machine torch's spinning
    worker threads make them many times slower.
    """
    import torch  # here, not at the top: most unit tests never need torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
