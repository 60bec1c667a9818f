"""Union test fixtures: the layers are built once; each test gets its own upper."""

from __future__ import annotations

import pytest

from unionfs.helpers import Layers, Stack, build_layers


@pytest.fixture(autouse=True)
def _state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("OCCLUMFS_STATE_DIR", str(tmp_path / "default-state"))


@pytest.fixture(scope="session")
def layers(tmp_path_factory) -> Layers:
    return build_layers(tmp_path_factory.mktemp("layers"))


@pytest.fixture
def stack(layers, tmp_path):
    s = Stack(layers, tmp_path)
    s.open()
    yield s
    if s.fs is not None:
        s.fs.close()
