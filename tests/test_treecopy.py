"""copy_tree_into: a host tree into a filesystem object, everything preserved.

The conformance suite checks the whole reference tree after a copy (the memfs
subjects are filled this way); these tests pin the details.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from occlumfs.errors import FSError
from occlumfs.fs import ROOT_INO, Caller, iter_dir, lookup_path, read_all
from occlumfs.memfs import MemFS
from occlumfs.treecopy import copy_tree_into


def _read(fs: MemFS, path: str) -> bytes:
    return b"".join(read_all(fs, lookup_path(fs, path).ino))


def test_sparse_files_keep_their_holes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.seek(10 << 20)
        f.write(b"middle")
        f.truncate(64 << 20)  # a trailing hole: only a size
    fs = MemFS()
    copy_tree_into(fs, ROOT_INO, src)
    attr = lookup_path(fs, "sparse")
    assert attr.size == 64 << 20
    assert attr.blocks * 512 <= 8192  # one or two 4 KiB blocks written, not 64 MiB
    fh = fs.open(attr.ino, os.O_RDONLY)
    assert fs.read(fh, 10 << 20, 10) == b"middle\0\0\0\0"
    assert fs.read(fh, 1 << 20, 4096) == bytes(4096)
    fs.release(fh)


def test_hard_links_become_one_inode(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "one").write_bytes(b"shared")
    os.link(src / "one", src / "a" / "two")
    os.link(src / "one", src / "three")
    (src / "single").write_bytes(b"single")
    fs = MemFS()
    copy_tree_into(fs, ROOT_INO, src)
    attrs = [lookup_path(fs, p) for p in ("one", "a/two", "three")]
    assert len({a.ino for a in attrs}) == 1 and attrs[0].nlink == 3
    assert lookup_path(fs, "single").nlink == 1
    assert _read(fs, "a/two") == b"shared"


def test_metadata_of_every_kind_of_entry(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_bytes(b"x")
    os.chown(src / "file", 1001, 2002)
    os.chmod(src / "file", 0o6751)
    os.setxattr(src / "file", b"user.k", b"\x00\xffbinary")
    os.symlink(b"target-\xff", os.fsencode(src / "link"))
    os.lchown(src / "link", 7, 8)
    os.mknod(src / "fifo", stat.S_IFIFO | 0o600)
    os.mknod(src / "dev", stat.S_IFCHR | 0o620, os.makedev(10, 200))
    (src / "dir").mkdir(mode=0o700)
    os.setxattr(src / "dir", b"user.d", b"dir")
    for name in ("file", "link", "fifo", "dev", "dir"):
        os.utime(src / name, ns=(111_222_333_444, 555_666_777_888), follow_symlinks=False)
    fs = MemFS()
    copy_tree_into(fs, ROOT_INO, src)
    f = lookup_path(fs, "file")
    assert (stat.S_IMODE(f.mode), f.uid, f.gid) == (0o6751, 1001, 2002)
    assert fs.getxattr(f.ino, b"user.k") == b"\x00\xffbinary"
    link = lookup_path(fs, "link")
    assert stat.S_ISLNK(link.mode) and fs.readlink(link.ino) == b"target-\xff"
    assert (link.uid, link.gid) == (7, 8)
    assert stat.S_ISFIFO(lookup_path(fs, "fifo").mode)
    dev = lookup_path(fs, "dev")
    assert stat.S_ISCHR(dev.mode) and dev.rdev == os.makedev(10, 200)
    d = lookup_path(fs, "dir")
    assert stat.S_ISDIR(d.mode) and stat.S_IMODE(d.mode) == 0o700
    assert fs.getxattr(d.ino, b"user.d") == b"dir"
    for name in ("file", "link", "fifo", "dev", "dir"):
        attr = lookup_path(fs, name)
        assert (attr.atime_ns, attr.mtime_ns) == (111_222_333_444, 555_666_777_888), name


def test_directory_times_survive_their_children(tmp_path):
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "e" / "f").write_bytes(b"")
    for path in (src / "d" / "e", src / "d", src):
        os.utime(path, ns=(5, 123_456_789_012_345_678))
    fs = MemFS()
    copy_tree_into(fs, ROOT_INO, src)
    for path in ("d/e", "d", ""):
        assert lookup_path(fs, path).mtime_ns == 123_456_789_012_345_678, path


def test_root_attributes_are_copied_unless_asked_not_to(tmp_path):
    src = tmp_path / "src"
    src.mkdir(mode=0o751)
    os.chmod(src, 0o751)
    os.chown(src, 3, 4)
    fs = MemFS()
    copy_tree_into(fs, ROOT_INO, src)
    root = fs.getattr(ROOT_INO)
    assert (stat.S_IMODE(root.mode), root.uid, root.gid) == (0o751, 3, 4)
    other = MemFS()
    copy_tree_into(other, ROOT_INO, src, copy_root_attrs=False)
    assert stat.S_IMODE(other.getattr(ROOT_INO).mode) == 0o755


def test_copy_into_a_subdirectory_with_non_utf8_names(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with open(os.path.join(os.fsencode(src), b"caf\xe9"), "wb") as f:
        f.write(b"latin-1 name")
    fs = MemFS()
    sub = fs.mkdir(ROOT_INO, b"into", 0o755, Caller())
    copy_tree_into(fs, sub.ino, src, Caller(uid=5, gid=6))
    assert [e.name for e in iter_dir(fs, sub.ino)] == [b"caf\xe9"]
    assert _read(fs, b"into/caf\xe9") == b"latin-1 name"
    assert lookup_path(fs, b"into/caf\xe9").uid == os.getuid()  # the host's owner wins


def test_a_deep_tree_needs_no_recursion(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    deep = str(src)
    for _ in range(1500):  # deeper than Python's recursion limit
        deep += "/d"
        os.mkdir(deep)
    Path(deep, "bottom").write_bytes(b"down here")
    try:
        fs = MemFS()
        copy_tree_into(fs, ROOT_INO, src)
        assert _read(fs, "/".join(["d"] * 1500 + ["bottom"])) == b"down here"
    finally:
        # shutil.rmtree (and so pytest's cleanup) recurses: remove it here.
        subprocess.run(["rm", "-rf", str(src)], check=True)


def test_errors_propagate(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "clash").write_bytes(b"")
    fs = MemFS()
    fs.mkdir(ROOT_INO, b"clash", 0o755, Caller())
    with pytest.raises(FSError) as info:
        copy_tree_into(fs, ROOT_INO, src)
    assert info.value.errno == errno.EEXIST
    (tmp_path / "plain").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        copy_tree_into(MemFS(), ROOT_INO, tmp_path / "plain")
    with pytest.raises(FileNotFoundError):
        copy_tree_into(MemFS(), ROOT_INO, Path(tmp_path / "missing"))
