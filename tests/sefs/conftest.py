"""SEFS test fixtures: every test gets its own trusted-state dir, never ~/.local/state."""

from __future__ import annotations

import pytest

from sefs.helpers import SimVolume, Volume, make_volume


@pytest.fixture(autouse=True)
def _state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("OCCLUMFS_STATE_DIR", str(tmp_path / "default-state"))


@pytest.fixture
def volume(tmp_path) -> Volume:
    return make_volume(tmp_path / "vol")


@pytest.fixture
def sim() -> SimVolume:
    return SimVolume()
