"""SEFS test fixtures: every test gets its own trusted-state dir, never ~/.local/state."""

from __future__ import annotations

import pytest

from occlumfs.mount import mounted_paths
from sefs.helpers import SimVolume, Volume, force_unmount, make_volume


@pytest.fixture(autouse=True)
def _state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("OCCLUMFS_STATE_DIR", str(tmp_path / "default-state"))


@pytest.fixture
def volume(tmp_path) -> Volume:
    return make_volume(tmp_path / "vol")


@pytest.fixture
def sim() -> SimVolume:
    return SimVolume()


@pytest.fixture
def spare_mnt(tmp_path):
    """A mountpoint for mounts meant to fail: whatever got mounted is detached afterwards."""
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if path.resolve() in mounted_paths():
        force_unmount(path)
