"""Golden images per format version: a format change cannot slip in silently.

The trees are made in code (git keeps no mtimes, owners, xattrs or devices);
building them must give exactly the committed bytes and digests of the
current version (2), and the committed images of every version must still
read back. To accept a deliberate format change, bump the version in
docs/formats/image.md, keep the old goldens, and write the new ones with
``OCCLUMFS_REGEN_GOLDEN=1 pytest tests/merkle/test_merkle_golden.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from merkle.trees import make_golden_tree, pattern
from occlumfs.fs import lookup_path, read_all
from occlumfs.merkle import build_image, open_image_fs, read_digest, verify_image

GOLDEN = Path(__file__).resolve().parent.parent / "fixtures" / "golden"
KEY = bytes(range(16))  # the example key of docs/formats/image.md; a test key only
REGEN = os.environ.get("OCCLUMFS_REGEN_GOLDEN") == "1"

# The worked example of docs/formats/image.md (format version 2).
EXAMPLE_DIGEST = "sha256:286a752c5bb29dec3b554bce8728c6e58d8b4661ef4df0ec3bd6d2cbea0e7e8e"
EXAMPLE_ENCRYPTED_DIGEST = "sha256:7e4627a03174e36465351f7c6d32e4e92a4d60b5ea1ddf7620592800b414bf55"
CURRENT = [("image-v2", None), ("image-v2-encrypted", KEY)]
EVERY_VERSION = [("image-v1", None), ("image-v1-encrypted", KEY), *CURRENT]


def _check_or_write(built: Path, name: str, digest: str) -> None:
    image, digest_file = GOLDEN / f"{name}.img", GOLDEN / f"{name}.digest"
    if REGEN:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        image.write_bytes(built.read_bytes())
        digest_file.write_text(digest + "\n")
    assert digest == digest_file.read_text().strip(), f"{name}: the digest changed"
    assert built.read_bytes() == image.read_bytes(), f"{name}: the image bytes changed"


@pytest.mark.parametrize(("name", "key"), CURRENT)
def test_golden_tree_builds_the_committed_image(tmp_path, name, key):
    src = make_golden_tree(tmp_path / "src")
    digest = build_image(src, tmp_path / "built.img", key=key)
    _check_or_write(tmp_path / "built.img", name, digest)


@pytest.mark.parametrize(("name", "key"), EVERY_VERSION)
def test_committed_golden_images_still_read_back(name, key):
    image = GOLDEN / f"{name}.img"
    digest = (GOLDEN / f"{name}.digest").read_text().strip()
    assert read_digest(image) == digest
    verify_image(image, digest=digest, key=key)
    fs = open_image_fs(image, digest=digest, key=key)
    try:
        assert b"".join(read_all(fs, lookup_path(fs, "five").ino)) == pattern("five", 5000)
        assert fs.getxattr(lookup_path(fs, "one").ino, b"user.binary") == bytes(range(256))
        assert fs.readlink(lookup_path(fs, "dir/rel-link").ino) == b"../one"
        assert lookup_path(fs, "dir/hard-b").ino == lookup_path(fs, "hard-a").ino
        assert lookup_path(fs, "owned").mode & 0o7777 == 0o4751
        assert lookup_path(fs, b"caf\xe9").size == 6
    finally:
        fs.close()


def _example_tree(root: Path) -> Path:
    root.mkdir()
    (root / "empty").write_bytes(b"")
    (root / "one").write_bytes(b"A")
    (root / "five").write_bytes(bytes(i % 251 for i in range(5000)))
    for path in (root / "empty", root / "one", root / "five"):
        path.chmod(0o644)
        os.utime(path, ns=(0, 1_700_000_000 * 10**9))
    root.chmod(0o755)
    os.utime(root, ns=(0, 1_700_000_000 * 10**9))
    return root


def test_worked_example_digest(tmp_path):
    src = _example_tree(tmp_path / "src")
    plain = build_image(src, tmp_path / "plain.img", source_date_epoch=1_700_000_000)
    assert plain == EXAMPLE_DIGEST
    assert (tmp_path / "plain.img").stat().st_size == 7 * 4096
    encrypted = build_image(src, tmp_path / "enc.img", key=KEY, source_date_epoch=1_700_000_000)
    assert encrypted == EXAMPLE_ENCRYPTED_DIGEST
    assert (tmp_path / "enc.img").stat().st_size == 8 * 4096
