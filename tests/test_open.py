"""The filesystem factory (occlumfs.open): kinds, detection, secrets, advice; no mounts."""

from __future__ import annotations

import pytest

from occlumfs.errors import NotFoundError, UsageError, WrongKeyError
from occlumfs.fs import ROOT_INO
from occlumfs.keys import generate_key
from occlumfs.merkle import build_image
from occlumfs.open import KINDS, detect_type, needs_secret, open_filesystem
from occlumfs.sefs import Credential, create_sefs


@pytest.fixture
def image(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello").write_bytes(b"from the image")
    path = tmp_path / "layer.img"
    digest = build_image(tree, path, source_date_epoch=0)
    return path, digest


@pytest.fixture
def sefs(tmp_path):
    key = generate_key()
    create_sefs(tmp_path / "store", Credential(key=key), state_dir=tmp_path / "state")
    return tmp_path / "store", key, tmp_path / "state"


def _names(fs) -> set[bytes]:
    handle = fs.opendir(ROOT_INO)
    try:
        return {entry.name for entry in fs.readdir(handle, 0)}
    finally:
        fs.releasedir(handle)


def test_detection_names_each_kind_by_its_source(image, sefs, tmp_path):
    assert detect_type(image[0]) == "image"
    assert detect_type(sefs[0]) == "sefs"
    (tmp_path / "plain").write_bytes(b"neither")
    with pytest.raises(UsageError, match="not a filesystem of any known type"):
        detect_type(tmp_path / "plain")


def test_an_unpinned_image_is_reported_through_warn_and_a_pinned_one_is_not(image):
    path, digest = image
    said: list[str] = []
    fs = open_filesystem(None, path, warn=said.append)
    fs.close()
    assert len(said) == 1 and "no digest pinned" in said[0] and str(path) in said[0]
    assert "authenticated by nothing" in said[0]  # a plain image: say what that means
    said.clear()
    fs = open_filesystem("image", path, digest=digest, warn=said.append)
    try:
        assert fs.info.read_only
        assert fs.lookup(ROOT_INO, b"hello").size == len(b"from the image")
    finally:
        fs.close()
    assert said == []


def test_a_sefs_needs_exactly_one_secret(sefs):
    store, key, state = sefs
    assert needs_secret("sefs") and not needs_secret("image") and not needs_secret("mem")
    with pytest.raises(UsageError, match="no key or passphrase"):
        open_filesystem("sefs", store, state_dir=state)
    with pytest.raises(UsageError, match="both"):
        open_filesystem("sefs", store, key=key, passphrase=b"x", state_dir=state)
    with pytest.raises(WrongKeyError):
        open_filesystem("sefs", store, key=generate_key(), state_dir=state)
    fs = open_filesystem(None, store, key=key, state_dir=state)
    try:
        assert fs.info.name == f"sefs:{store}"
    finally:
        fs.close()


def test_mem_starts_empty_or_from_a_directory(tmp_path):
    fs = open_filesystem("mem", tmp_path / "absent")
    assert _names(fs) - {b".", b".."} == set()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"copied")
    fs = open_filesystem("mem", tmp_path / "src")
    assert b"f" in _names(fs)
    with pytest.raises(UsageError, match="starts from a directory"):
        open_filesystem("mem", tmp_path / "src" / "f")


def test_missing_sources_and_unknown_kinds_are_clear(tmp_path):
    with pytest.raises(NotFoundError, match="does not exist"):
        open_filesystem(None, tmp_path / "absent")
    with pytest.raises(NotFoundError, match="does not exist"):
        open_filesystem("image", tmp_path / "absent")
    with pytest.raises(UsageError, match="unknown filesystem type 'tar'"):
        open_filesystem("tar", tmp_path)


def test_an_image_takes_no_passphrase(image):
    with pytest.raises(UsageError, match="not a passphrase"):
        open_filesystem("image", image[0], digest=image[1], passphrase=b"secret")


def test_every_kind_is_one_entry_and_the_cli_offers_each():
    from occlumfs.cli.mount import mount

    choices = next(p for p in mount.params if p.name == "kind").type.choices
    assert list(choices) == list(KINDS)
