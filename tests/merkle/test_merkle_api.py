"""The image filesystem states facts; tools use its public API (issue 7, items 3, 4 and 6).

An ImageFS may be a union's lower layer and never be mounted itself: it must
not tune mounts, parse mountinfo or answer differently "while serving". The
adapter and the mount act on the facts in its FsInfo.
"""

from __future__ import annotations

import ast
import errno
import os
from pathlib import Path

import pytest

import occlumfs.merkle
from merkle.trees import make_golden_tree, pattern
from occlumfs.fs import BLOCK_SIZE as FS_BLOCK_SIZE
from occlumfs.fs import Filesystem, lookup_path
from occlumfs.merkle import build_image, open_image_fs
from occlumfs.merkle.format import BLOCK_SIZE, HASH_SIZE
from occlumfs.merkle.reader import ImageFS
from occlumfs.merkle.tree import first_mismatch

MERKLE = Path(occlumfs.merkle.__file__).parent


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    base = tmp_path_factory.mktemp("api")
    bare = base / "bare"
    bare.mkdir()
    (bare / "f").write_bytes(pattern("f", 2 * BLOCK_SIZE))
    build_image(bare, base / "bare.img")
    build_image(make_golden_tree(base / "golden"), base / "golden.img")
    return base / "bare.img", base / "golden.img"


def test_image_fs_states_facts_for_the_adapter_and_the_mount(images):
    bare, golden = images
    fs = open_image_fs(bare, digest=None, key=None)
    try:
        info = fs.info
        assert (info.read_only, info.immutable, info.has_xattrs) == (True, True, False)
        assert info.readahead_kb == 4096
        ino = lookup_path(fs, "f").ino
        fh = fs.open(ino, os.O_RDONLY)
        assert fs.flush(fh) is None  # in-process: nothing to flush, no ENOSYS
        with pytest.raises(OSError) as raised:
            fs.getxattr(ino, b"user.x")
        assert raised.value.errno == errno.ENODATA
    finally:
        fs.close()
    fs = open_image_fs(golden, digest=None, key=None)
    try:
        assert fs.info.has_xattrs
    finally:
        fs.close()


def test_image_fs_carries_no_mount_policy():
    # Serving or not, an image answers the same; the base class's lifecycle hook is enough.
    assert ImageFS.started_serving is Filesystem.started_serving
    assert ImageFS.flush is Filesystem.flush
    source = (MERKLE / "reader.py").read_text()
    for word in ("/sys/class/bdi", "mountinfo", "ENOSYS"):
        assert word not in source, word


def _private_uses(path: Path) -> set[str]:
    """Attributes starting with '_' read off anything but ``self`` in a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id == "self")
        ):
            found.add(node.attr)
    return found


def test_verify_uses_only_the_public_reader_api():
    assert _private_uses(MERKLE / "verify.py") == set()


def test_first_mismatch_finds_the_first_differing_hash():
    hashes = bytes(range(32)) * 5
    assert first_mismatch(hashes, hashes) is None
    for bad in range(5):
        for byte in (0, 17, 31):
            other = bytearray(hashes)
            other[bad * HASH_SIZE + byte] ^= 1
            assert first_mismatch(hashes, bytes(other)) == bad
            assert first_mismatch(bytes(other), hashes) == bad
    assert first_mismatch(hashes[:64], hashes[:96]) == 2


def test_one_block_size():
    assert BLOCK_SIZE == FS_BLOCK_SIZE == 4096
    for module in ("format.py", "build.py", "reader.py", "verify.py", "source.py", "tree.py"):
        tree = ast.parse((MERKLE / module).read_text())
        assigned = {
            t.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign)
            for t in node.targets
            if isinstance(t, ast.Name)
        }
        assert "BLOCK_SIZE" not in assigned, module
