"""Names the kernel would cut short or reinterpret never get into an image or out of one.

Issue 6, sections 4 and 7: a pax ``path`` of ``conf\\0evil`` next to ``conf``
built, verified, and through a mount ``cat conf`` answered differently before
and after an ``ls``; broken archives gave five-line errors; a directory entry
naming an inode beyond the table was "No such file or directory".
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest
from conftest import run_cli

from merkle.trees import reseal, set_times
from occlumfs.errors import ExitCode, FormatError
from occlumfs.fs import ROOT_INO, iter_dir
from occlumfs.merkle import build_image, open_image_fs, reader, verify_image
from occlumfs.merkle.format import (
    BLOCK_SIZE,
    DESCRIPTOR_SIZE,
    DIRENT,
    DIRENT_SIZE,
    INODE,
    Descriptor,
    InodeRecord,
    Layout,
    MalformedImageError,
    name_problem,
)


def _one_line_error(done, code: int, words: str) -> None:
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("occlumfs: error: "), done.stderr
    assert words in lines[0], lines[0]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if "\0" in name:  # only a pax record can carry it; tarfile would cut it short
                info.pax_headers = {"path": name}
            info.size = len(data)
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return path


def test_name_rules():
    for good in (b"a", b"conf", b"...", b".hidden", b"\xff\xfe", b"x" * 255):
        assert name_problem(good) is None
    for bad, words in (
        (b"", "empty"),
        (b"x" * 256, "longer"),
        (b"conf\0evil", "NUL"),
        (b"a/b", "'/'"),
        (b".", "'.'"),
        (b"..", "'..'"),
    ):
        assert words in name_problem(bad)


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ([("conf", b"GOOD"), ("conf\0evil", b"EVIL")], "contains a NUL byte"),
        ([("dir\0x/file", b"x")], "contains a NUL byte"),
    ],
)
def test_mkimage_refuses_names_with_nul(tmp_path, members, words):
    archive = _tar(tmp_path / "layer.tar", members)
    # The archive really carries the NUL (in its pax header).
    with tarfile.open(archive) as tf:
        assert any("\0" in m.name for m in tf.getmembers())
    done = run_cli("mkimage", archive, tmp_path / "out.img", check=False)
    _one_line_error(done, ExitCode.FORMAT, words)
    assert not (tmp_path / "out.img").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["layer.tar"]  # no scratch left behind


def test_build_refuses_a_nul_in_a_symlink_target_or_xattr_name(tmp_path):
    archive = tmp_path / "layer.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
        link = tarfile.TarInfo("link")
        link.type = tarfile.SYMTYPE
        link.linkname = "target\0evil"
        link.pax_headers = {"linkpath": link.linkname}
        tf.addfile(link)
    with pytest.raises(FormatError, match="NUL"):
        build_image(archive, tmp_path / "a.img")
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("f")
        info.pax_headers = {"SCHILY.xattr.user.a\0b": "v"}
        tf.addfile(info, io.BytesIO(b""))
    with pytest.raises(FormatError, match="NUL"):
        build_image(archive, tmp_path / "b.img")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "empty file"),
        (os.urandom(3000), "not a readable tar archive (nor gzip"),
        (b"\x1f\x8b\x08\x00" + bytes(6) + b"garbage" * 100, "damaged gzip data"),
        ("truncated", "damaged gzip data"),
    ],
)
def test_mkimage_of_a_broken_archive_is_one_line(tmp_path, content, words):
    archive = tmp_path / "layer.tar.gz"
    if content == "truncated":
        inner = _tar(tmp_path / "inner.tar", [("f", os.urandom(50_000))]).read_bytes()
        import gzip

        content = gzip.compress(inner, mtime=0)[:60]
    archive.write_bytes(content)
    done = run_cli("mkimage", archive, tmp_path / "out.img", check=False)
    _one_line_error(done, ExitCode.FORMAT, words)
    assert not (tmp_path / "out.img").exists()


# -- crafted images: the tree is recomputed, only the reader's checks stand --------------


@pytest.fixture(scope="module")
def named_image(tmp_path_factory):
    """A root holding conf, confXevil, cong and sub/ (names of chosen lengths)."""
    base = tmp_path_factory.mktemp("names")
    src = base / "src"
    src.mkdir()
    (src / "conf").write_bytes(b"GOOD\n")
    (src / "confXevil").write_bytes(b"EVIL\n")
    (src / "cong").write_bytes(b"other\n")
    (src / "sub").mkdir()
    set_times(src)
    image = base / "names.img"
    build_image(src, image)
    return image


def _rename_entry(old: bytes, new: bytes):
    """An edit that rewrites the stored name ``old`` (same length) as ``new``."""
    assert len(old) == len(new)

    def edit(raw: bytearray, layout: Layout) -> None:
        heap = layout.heap_start * BLOCK_SIZE
        root = INODE.unpack_from(raw, layout.inode_start * BLOCK_SIZE)
        ref, count = InodeRecord._make(root).ref, InodeRecord._make(root).count
        for i in range(count):
            _ino, nlen, noff = DIRENT.unpack_from(raw, heap + ref + i * DIRENT_SIZE)
            if raw[heap + noff : heap + noff + nlen] == old:
                raw[heap + noff : heap + noff + nlen] = new
                return
        raise AssertionError(f"{old!r} not found")

    return edit


def _crafted(image: Path, tmp_path: Path, edit) -> tuple[Path, str]:
    copy = tmp_path / "crafted.img"
    shutil.copyfile(image, copy)
    return copy, reseal(copy, edit)


@pytest.mark.parametrize(
    ("old", "new", "words", "neighbour"),
    [
        (b"confXevil", b"conf\0evil", "NUL", b"conf"),
        (b"confXevil", b"conf/evil", "'/'", b"conf"),
        (b"cong", b"conf", "out of order or duplicated", b"conf"),
        (b"sub", b"..\0", "NUL", b"cong"),
    ],
)
def test_a_directory_with_a_bad_or_duplicate_name_is_malformed(
    named_image, tmp_path, old, new, words, neighbour
):
    image, digest = _crafted(named_image, tmp_path, _rename_entry(old, new))
    fs = open_image_fs(image, digest=digest, key=None)
    try:
        with pytest.raises(MalformedImageError, match=words):
            list(iter_dir(fs, ROOT_INO))
        # The same answer whatever was asked first: a lookup next to the bad
        # entry is refused as well, before or after a listing.
        with pytest.raises(MalformedImageError):
            fs.lookup(ROOT_INO, neighbour)
    finally:
        fs.close()
    done = run_cli("verify", image, "--digest", digest, check=False)
    _one_line_error(done, ExitCode.FORMAT, words)
    assert "malformed image" in done.stderr


def test_dot_names_are_malformed(named_image, tmp_path):
    def dotdot(raw: bytearray, layout: Layout) -> None:
        # Shorten the last name to "..": its length lives in the entry.
        heap = layout.heap_start * BLOCK_SIZE
        root = InodeRecord._make(INODE.unpack_from(raw, layout.inode_start * BLOCK_SIZE))
        at = heap + root.ref + (root.count - 1) * DIRENT_SIZE
        ino, _nlen, noff = DIRENT.unpack_from(raw, at)
        raw[heap + noff : heap + noff + 2] = b".."
        DIRENT.pack_into(raw, at, ino, 2, noff)

    image, digest = _crafted(named_image, tmp_path, dotdot)
    with pytest.raises(MalformedImageError, match=r"is '\.\.'"):
        verify_image(image, digest=digest)


@pytest.mark.fuse
def test_through_a_mount_a_nul_name_is_eio_not_a_second_conf(named_image, tmp_path, mount):
    image, digest = _crafted(named_image, tmp_path, _rename_entry(b"confXevil", b"conf\0evil"))
    with mount(image, "--digest", digest, allow_log_errors=True) as mnt:
        for _ in range(2):  # before and after a listing: the same answer
            with pytest.raises(OSError) as info:
                (mnt / "conf").read_bytes()
            assert info.value.errno == errno.EIO
            with pytest.raises(OSError) as info:
                os.listdir(mnt)
            assert info.value.errno == errno.EIO


def test_verify_of_an_entry_naming_an_inode_beyond_the_table_is_malformed(named_image, tmp_path):
    def far(raw: bytearray, layout: Layout) -> None:
        heap = layout.heap_start * BLOCK_SIZE
        root = InodeRecord._make(INODE.unpack_from(raw, layout.inode_start * BLOCK_SIZE))
        _ino, nlen, noff = DIRENT.unpack_from(raw, heap + root.ref)
        desc = Descriptor.parse(bytes(raw[:DESCRIPTOR_SIZE]))
        DIRENT.pack_into(raw, heap + root.ref, desc.inode_count + 7, nlen, noff)

    image, digest = _crafted(named_image, tmp_path, far)
    done = run_cli("verify", image, check=False)
    _one_line_error(done, ExitCode.FORMAT, "beyond the inode table")
    assert "malformed image" in done.stderr
    fs = open_image_fs(image, digest=digest, key=None)
    try:
        with pytest.raises(MalformedImageError, match="beyond the inode table"):
            fs.lookup(ROOT_INO, b"conf")
        with pytest.raises(OSError) as info:
            fs.getattr(10_000)  # asked directly, an unknown inode is just absent
        assert info.value.errno == errno.ENOENT
    finally:
        fs.close()


@pytest.fixture(scope="module")
def big_dir_image(tmp_path_factory):
    """A directory larger than SMALL_DIR, searched in place rather than decoded whole."""
    base = tmp_path_factory.mktemp("bigdir")
    src = base / "src"
    (src / "big").mkdir(parents=True)
    for i in range(reader.SMALL_DIR + 100):
        (src / "big" / f"n{i:05}").write_bytes(b"")
    set_times(src)
    image = base / "big.img"
    build_image(src, image)
    return image


def test_a_duplicate_in_a_large_directory_is_malformed(big_dir_image, tmp_path):
    def duplicate(raw: bytearray, layout: Layout) -> None:
        heap = layout.heap_start * BLOCK_SIZE
        big = InodeRecord._make(INODE.unpack_from(raw, layout.inode_start * BLOCK_SIZE + 64))
        assert stat.S_ISDIR(big.mode) and big.count > reader.SMALL_DIR
        _ino, nlen, noff = DIRENT.unpack_from(raw, heap + big.ref + 500 * DIRENT_SIZE)
        raw[heap + noff : heap + noff + nlen] = b"n00499"

    fs = open_image_fs(big_dir_image, digest=None, key=None)
    try:
        big = fs.lookup(ROOT_INO, b"big").ino
        names = [e.name for e in iter_dir(fs, big)]
        assert len(names) == reader.SMALL_DIR + 100 and names == sorted(names)
        assert all(fs.lookup(big, n).ino for n in names[::97])
        with pytest.raises(OSError) as info:
            fs.lookup(big, b"n00499x")
        assert info.value.errno == errno.ENOENT
    finally:
        fs.close()
    image, digest = _crafted(big_dir_image, tmp_path, duplicate)
    fs = open_image_fs(image, digest=digest, key=None)
    try:
        big = fs.lookup(ROOT_INO, b"big").ino
        assert fs.lookup(big, b"n00010").ino  # far from the damage: found in place
        with pytest.raises(MalformedImageError, match="out of order or duplicated"):
            fs.lookup(big, b"n00499")
        with pytest.raises(MalformedImageError, match="out of order or duplicated"):
            list(iter_dir(fs, big))
    finally:
        fs.close()


def test_decoded_listings_stay_bounded(named_image, big_dir_image, monkeypatch):
    monkeypatch.setattr(reader, "LISTED_NAMES", 3)
    for image in (named_image, big_dir_image):
        fs = open_image_fs(image, digest=None, key=None)
        try:
            for _ in range(2):  # a second pass finds everything again after evictions
                for entry in iter_dir(fs, ROOT_INO):
                    assert fs.lookup(ROOT_INO, entry.name).ino == entry.attr.ino
                    if entry.attr.is_dir:
                        for child in iter_dir(fs, entry.attr.ino):
                            assert fs.lookup(entry.attr.ino, child.name).ino == child.attr.ino
        finally:
            fs.close()
