"""Write-side behaviour: every writable subject, in-process and over FUSE, and the host.

Each test gets a fresh empty directory (``rw_view``); the ``host`` subject, a
directory on the host's own filesystem, proves each expectation is Linux's.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conformance.conftest import WRITE_VIEW_IDS, view_params
from conformance.helpers import errno_of
from conformance.reference import GiB, MiB, pattern
from conformance.views import RENAME_NOREPLACE, View

# -- open flags and data -------------------------------------------------------------


def test_create_exclusive(rw_view: View):
    fd = rw_view.open("f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    rw_view.close(fd)
    st = rw_view.lstat("f")
    assert stat.S_ISREG(st.mode) and stat.S_IMODE(st.mode) == 0o640 and st.size == 0
    assert st.uid == os.getuid() and st.gid == os.getgid()
    assert errno_of(rw_view.open, "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL) == errno.EEXIST
    assert errno_of(rw_view.open, "missing", os.O_RDONLY) == errno.ENOENT
    # O_CREAT without O_EXCL opens what exists, leaving it as it was.
    rw_view.write_file("g", b"kept")
    rw_view.close(rw_view.open("g", os.O_WRONLY | os.O_CREAT))
    assert rw_view.read_file("g") == b"kept"


def test_o_trunc_empties_the_file(rw_view: View):
    rw_view.write_file("f", b"x" * 10_000)
    fd = rw_view.open("f", os.O_WRONLY | os.O_TRUNC)
    assert rw_view.fstat(fd).size == 0
    rw_view.close(fd)
    assert rw_view.lstat("f").size == 0 and rw_view.read_file("f") == b""
    # O_TRUNC on a read-only open does not truncate.
    rw_view.write_file("g", b"data")
    rw_view.close(rw_view.open("g", os.O_RDONLY))
    assert rw_view.read_file("g") == b"data"


def test_o_append_writes_at_the_end(rw_view: View):
    rw_view.write_file("f", b"abc")
    fd = rw_view.open("f", os.O_WRONLY | os.O_APPEND)
    try:
        assert rw_view.write(fd, b"def") == 3
        assert rw_view.write(fd, b"ghi") == 3
    finally:
        rw_view.close(fd)
    other = rw_view.open("f", os.O_RDWR)
    rw_view.pwrite(other, b"ABC", 0)
    rw_view.close(other)
    assert rw_view.read_file("f") == b"ABCdefghi"


def test_read_and_write_modes_are_enforced(rw_view: View):
    rw_view.write_file("f", b"data")
    fd = rw_view.open("f", os.O_RDONLY)
    try:
        assert errno_of(rw_view.write, fd, b"x") == errno.EBADF
    finally:
        rw_view.close(fd)
    fd = rw_view.open("f", os.O_WRONLY)
    try:
        assert errno_of(rw_view.read, fd, 4) == errno.EBADF
    finally:
        rw_view.close(fd)


def test_writes_at_any_offset_leave_holes_of_zeros(rw_view: View):
    pieces = {
        0: b"start",
        4095: b"across-a-block-boundary",
        100_000: pattern("mid", 10_000),
        4 * GiB - 2: b"across 4 GiB",
        5 * GiB + 12345: b"far out",
    }
    fd = rw_view.open("f", os.O_RDWR | os.O_CREAT)
    try:
        for offset, data in pieces.items():
            assert rw_view.pwrite(fd, data, offset) == len(data)
        size = 5 * GiB + 12345 + len(b"far out")
        assert rw_view.fstat(fd).size == size
        for offset, data in pieces.items():
            assert rw_view.pread(fd, len(data), offset) == data, offset
        assert rw_view.pread(fd, 4095 - 5, 5) == bytes(4090)
        assert rw_view.pread(fd, 50_000, 3 * GiB) == bytes(50_000)
        assert rw_view.pread(fd, 100, size) == b""
    finally:
        rw_view.close(fd)
    assert rw_view.lstat("f").blocks * 512 < 64 * MiB  # the holes are not stored


def test_large_write_reads_back(rw_view: View):
    data = pattern("large", 3 * MiB + 333)
    fd = rw_view.open("f", os.O_WRONLY | os.O_CREAT)
    try:
        offset, step = 0, 12_345  # odd sizes: writes straddle every block boundary
        while offset < len(data):
            offset += rw_view.pwrite(fd, data[offset : offset + step], offset)
    finally:
        rw_view.close(fd)
    assert rw_view.read_file("f") == data
    assert rw_view.lstat("f").size == len(data)


def test_truncate_really_shrinks_then_grows_with_zeros(rw_view: View):
    data = pattern("trunc", 20_000)
    rw_view.write_file("f", data)
    rw_view.truncate("f", 5000)
    assert rw_view.lstat("f").size == 5000
    assert rw_view.read_file("f") == data[:5000]
    rw_view.truncate("f", 30_000)  # the old bytes past 5000 must not come back
    assert rw_view.read_file("f") == data[:5000] + bytes(25_000)
    fd = rw_view.open("f", os.O_RDWR)
    try:
        rw_view.ftruncate(fd, 4097)
        assert rw_view.fstat(fd).size == 4097
        rw_view.ftruncate(fd, 4096 * 3)
        assert rw_view.pread(fd, 4096 * 3, 0) == data[:4097] + bytes(4096 * 3 - 4097)
        rw_view.ftruncate(fd, 0)
        assert rw_view.pread(fd, 10, 0) == b""
        rw_view.ftruncate(fd, 6 * GiB)
        assert rw_view.pread(fd, 4096, 5 * GiB) == bytes(4096)
        # Far data cut off by a shrink stays gone when the file grows back.
        rw_view.pwrite(fd, b"stale far data", 5 * GiB + 10)
        rw_view.ftruncate(fd, 4096)
        rw_view.ftruncate(fd, 6 * GiB)
        assert rw_view.pread(fd, 100, 5 * GiB) == bytes(100)
    finally:
        rw_view.close(fd)
    assert rw_view.lstat("f").size == 6 * GiB
    assert errno_of(rw_view.truncate, "", 0) == errno.EISDIR


# -- names ---------------------------------------------------------------------------


def test_rename_over_a_file_replaces_it(rw_view: View):
    rw_view.write_file("a", b"from a")
    rw_view.write_file("b", b"from b")
    ino = rw_view.lstat("a").ino
    rw_view.rename("a", "b")
    assert not rw_view.exists("a")
    assert rw_view.read_file("b") == b"from a"
    assert rw_view.lstat("b").ino == ino
    assert sorted(rw_view.listdir("")) == [b"b"]


def test_rename_over_an_open_file_keeps_its_data_for_the_open_fd(rw_view: View):
    rw_view.write_file("old", b"replaced but still open")
    rw_view.write_file("new", b"the replacement")
    fd = rw_view.open("old", os.O_RDONLY)
    try:
        rw_view.rename("new", "old")
        assert rw_view.pread(fd, 100, 0) == b"replaced but still open"
    finally:
        rw_view.close(fd)
    assert rw_view.read_file("old") == b"the replacement"


def test_rename_directories(rw_view: View):
    rw_view.mkdir("src")
    rw_view.write_file("src/inner", b"inner")
    rw_view.mkdir("empty")
    rw_view.rename("src", "empty")  # over an empty directory
    assert rw_view.read_file("empty/inner") == b"inner"
    assert not rw_view.exists("src")
    rw_view.mkdir("full")
    rw_view.write_file("full/x", b"x")
    assert errno_of(rw_view.rename, "empty", "full") == errno.ENOTEMPTY
    assert rw_view.read_file("full/x") == b"x" and rw_view.read_file("empty/inner") == b"inner"
    rw_view.write_file("file", b"f")
    assert errno_of(rw_view.rename, "file", "full") == errno.EISDIR
    assert errno_of(rw_view.rename, "full", "file") == errno.ENOTDIR
    assert errno_of(rw_view.rename, "missing", "other") == errno.ENOENT


def test_rename_across_directories(rw_view: View):
    rw_view.mkdir("one")
    rw_view.mkdir("two")
    rw_view.mkdir("one/moving")
    rw_view.write_file("one/moving/data", b"payload")
    rw_view.write_file("one/file", b"file")
    assert (rw_view.lstat("one").nlink, rw_view.lstat("two").nlink) == (3, 2)
    rw_view.rename("one/moving", "two/moved")
    rw_view.rename("one/file", "two/file")
    assert rw_view.listdir("one") == []
    assert sorted(rw_view.listdir("two")) == [b"file", b"moved"]
    assert rw_view.read_file("two/moved/data") == b"payload"
    assert (rw_view.lstat("one").nlink, rw_view.lstat("two").nlink) == (2, 3)
    # The moved directory's ".." is its new parent.
    assert rw_view.lstat("two/moved/..").ino == rw_view.lstat("two").ino


def test_rename_a_directory_into_itself_is_einval(rw_view: View):
    rw_view.mkdir("a")
    rw_view.mkdir("a/b")
    assert errno_of(rw_view.rename, "a", "a/b/c") == errno.EINVAL
    assert errno_of(rw_view.rename, "a", "a/c") == errno.EINVAL
    assert rw_view.exists("a/b") and not rw_view.exists("a/b/c")


def test_rename_noreplace(rw_view: View):
    rw_view.write_file("a", b"a")
    rw_view.write_file("b", b"b")
    assert errno_of(rw_view.rename, "a", "b", RENAME_NOREPLACE) == errno.EEXIST
    assert rw_view.read_file("a") == b"a" and rw_view.read_file("b") == b"b"
    rw_view.rename("a", "c", RENAME_NOREPLACE)
    assert sorted(rw_view.listdir("")) == [b"b", b"c"]


def test_rename_keeps_open_files_working(rw_view: View):
    rw_view.write_file("a", b"0123456789")
    fd = rw_view.open("a", os.O_RDWR)
    try:
        rw_view.mkdir("d")
        rw_view.rename("a", "d/b")
        rw_view.pwrite(fd, b"XY", 2)
        assert rw_view.pread(fd, 10, 0) == b"01XY456789"
    finally:
        rw_view.close(fd)
    assert rw_view.read_file("d/b") == b"01XY456789"


def test_hard_links_and_nlink(rw_view: View):
    rw_view.write_file("a", b"shared")
    rw_view.mkdir("d")
    rw_view.link("a", "d/b")
    a, b = rw_view.lstat("a"), rw_view.lstat("d/b")
    assert a.ino == b.ino and a.nlink == b.nlink == 2
    fd = rw_view.open("d/b", os.O_WRONLY)
    rw_view.pwrite(fd, b"SH", 0)
    rw_view.close(fd)
    assert rw_view.read_file("a") == b"SHared"
    assert errno_of(rw_view.link, "a", "d/b") == errno.EEXIST
    assert errno_of(rw_view.link, "d", "d2") == errno.EPERM
    rw_view.unlink("a")
    assert rw_view.lstat("d/b").nlink == 1
    assert rw_view.read_file("d/b") == b"SHared"


def test_unlinked_open_file_lives_until_last_close(rw_view: View):
    rw_view.write_file("f", b"still here")
    fd = rw_view.open("f", os.O_RDWR)
    try:
        rw_view.unlink("f")
        assert not rw_view.exists("f")
        assert rw_view.listdir("") == []
        assert rw_view.pread(fd, 100, 0) == b"still here"
        rw_view.pwrite(fd, b"STILL", 0)
        assert rw_view.pread(fd, 100, 0) == b"STILL here"
        assert rw_view.fstat(fd).nlink == 0
        rw_view.write_file("f", b"a new file")  # the name is free again
        assert rw_view.pread(fd, 100, 0) == b"STILL here"
    finally:
        rw_view.close(fd)
    assert rw_view.read_file("f") == b"a new file"


def test_symlinks(rw_view: View):
    rw_view.write_file("target", b"pointed at")
    rw_view.symlink("target", "rel")
    rw_view.symlink("/absolute/elsewhere", "abs")
    rw_view.symlink("missing-target", "dangling")
    assert rw_view.readlink("rel") == b"target"
    assert rw_view.readlink("abs") == b"/absolute/elsewhere"
    st = rw_view.lstat("rel")
    assert stat.S_ISLNK(st.mode) and st.size == len(b"target")
    assert rw_view.read_file("rel") == b"pointed at"
    assert errno_of(rw_view.symlink, "x", "rel") == errno.EEXIST
    # O_CREAT|O_EXCL refuses a dangling symlink; plain O_CREAT creates its target.
    assert errno_of(rw_view.open, "dangling", os.O_WRONLY | os.O_CREAT | os.O_EXCL) == errno.EEXIST
    assert not rw_view.exists("missing-target")
    rw_view.write_file("dangling", b"created")
    assert rw_view.read_file("missing-target") == b"created"
    rw_view.unlink("rel")
    assert rw_view.read_file("target") == b"pointed at"


def test_mkdir_and_rmdir(rw_view: View):
    rw_view.mkdir("d", 0o750)
    st = rw_view.lstat("d")
    assert stat.S_ISDIR(st.mode) and stat.S_IMODE(st.mode) == 0o750 and st.nlink == 2
    assert rw_view.lstat("").nlink == 3
    assert errno_of(rw_view.mkdir, "d") == errno.EEXIST
    rw_view.write_file("d/f", b"")
    assert errno_of(rw_view.rmdir, "d") == errno.ENOTEMPTY
    assert errno_of(rw_view.rmdir, "d/f") == errno.ENOTDIR
    assert errno_of(rw_view.unlink, "d") == errno.EISDIR
    assert errno_of(rw_view.mkdir, "missing/d") == errno.ENOENT
    rw_view.unlink("d/f")
    rw_view.rmdir("d")
    assert not rw_view.exists("d") and rw_view.lstat("").nlink == 2
    assert errno_of(rw_view.rmdir, "d") == errno.ENOENT


def test_mknod_fifos_and_devices(rw_view: View):
    rw_view.mknod("fifo", stat.S_IFIFO | 0o600)
    rw_view.mknod("char", stat.S_IFCHR | 0o640, os.makedev(1, 5))
    rw_view.mknod("block", stat.S_IFBLK | 0o640, os.makedev(259, 70000))
    assert stat.S_ISFIFO(rw_view.lstat("fifo").mode)
    char, block = rw_view.lstat("char"), rw_view.lstat("block")
    assert stat.S_ISCHR(char.mode) and char.rdev == os.makedev(1, 5)
    assert stat.S_ISBLK(block.mode) and block.rdev == os.makedev(259, 70000)
    assert stat.S_IMODE(block.mode) == 0o640


def test_long_and_non_utf8_names(rw_view: View):
    names = [b"L" * 255, b"caf\xe9", b"\xff\xfe", "日本語".encode()]
    for name in names:
        rw_view.write_file(name, name)
    assert sorted(rw_view.listdir("")) == sorted(names)
    for name in names:
        assert rw_view.read_file(name) == name
    assert errno_of(rw_view.open, b"L" * 256, os.O_WRONLY | os.O_CREAT) == errno.ENAMETOOLONG


def test_removing_entries_while_listing_empties_the_directory(rw_view: View):
    """What `rm -rf` and shutil.rmtree do: unlink each entry as the listing yields it."""
    names = [f"entry-{i:04d}".encode() for i in range(600)]
    rw_view.mkdir("d")
    for name in names:
        rw_view.mknod(b"d/" + name, stat.S_IFREG | 0o644)
    handle = rw_view.opendir("d")
    seen = []
    try:
        while batch := rw_view.readdir(handle):
            for name, _ in batch:
                seen.append(name)
                rw_view.unlink(b"d/" + name)
    finally:
        rw_view.closedir(handle)
    assert sorted(seen) == names  # each once, none skipped
    assert rw_view.listdir("d") == []
    rw_view.rmdir("d")


def test_entries_unchanged_during_a_listing_are_listed_once(rw_view: View):
    names = [f"entry-{i:04d}".encode() for i in range(600)]
    rw_view.mkdir("d")
    for name in names:
        rw_view.mknod(b"d/" + name, stat.S_IFREG | 0o644)
    handle = rw_view.opendir("d")
    try:
        seen = [name for name, _ in rw_view.readdir(handle)]
        removed = set(names[::7]) - set(seen)  # some entries the listing has not reached
        for name in removed:
            rw_view.unlink(b"d/" + name)
        for i in range(100):
            rw_view.mknod(f"d/added-{i:03d}".encode(), stat.S_IFREG | 0o644)
        while batch := rw_view.readdir(handle):
            seen += [name for name, _ in batch]
    finally:
        rw_view.closedir(handle)
    # POSIX leaves open whether removed or added entries show up; the rest must,
    # exactly once.
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    assert set(names) - removed <= set(seen), "an unchanged entry was skipped"


# -- attributes ----------------------------------------------------------------------


def test_chmod_chown_utimens_to_the_nanosecond(rw_view: View):
    rw_view.write_file("f", b"data")
    rw_view.chown("f", 1234, 5678)  # before chmod: chown clears setuid
    rw_view.chmod("f", 0o4751)
    times = (1_234_567_890_123_456_789, 4_102_444_800_000_000_007)  # the second past 2038
    rw_view.utimens("f", *times)
    st = rw_view.lstat("f")
    assert (stat.S_IMODE(st.mode), st.uid, st.gid) == (0o4751, 1234, 5678)
    assert (st.atime_ns, st.mtime_ns) == times
    rw_view.mkdir("d")
    rw_view.chmod("d", 0o1777)
    assert stat.S_IMODE(rw_view.lstat("d").mode) == 0o1777
    # On a symlink: chown and utimens change the link, not its target.
    rw_view.symlink("f", "link")
    rw_view.chown("link", 42, 43)
    rw_view.utimens("link", 5_000_000_001, 6_000_000_002)
    link = rw_view.lstat("link")
    assert (link.uid, link.gid, link.mtime_ns) == (42, 43, 6_000_000_002)
    assert rw_view.lstat("f").uid == 1234 and rw_view.lstat("f").mtime_ns == times[1]


def test_writes_update_mtime(rw_view: View):
    rw_view.write_file("f", b"data")
    rw_view.utimens("f", 1_000_000_000, 1_000_000_000)
    fd = rw_view.open("f", os.O_WRONLY)
    try:
        rw_view.pwrite(fd, b"more", 4)
        rw_view.fsync(fd)
    finally:
        rw_view.close(fd)
    assert rw_view.lstat("f").mtime_ns > 1_000_000_000
    before = rw_view.lstat("").mtime_ns
    rw_view.utimens("", 2_000_000_000, 2_000_000_000)
    rw_view.write_file("new", b"")
    assert rw_view.lstat("").mtime_ns > 2_000_000_000 and before > 2_000_000_000


def test_xattrs_set_replace_remove(rw_view: View):
    rw_view.write_file("f", b"")
    rw_view.setxattr("f", b"user.a", b"1")
    rw_view.setxattr("f", b"user.bin", bytes(range(256)) * 4)
    rw_view.setxattr("f", b"user.empty", b"")
    assert rw_view.getxattr("f", b"user.bin") == bytes(range(256)) * 4
    assert rw_view.getxattr("f", b"user.empty") == b""
    assert errno_of(rw_view.setxattr, "f", b"user.a", b"2", os.XATTR_CREATE) == errno.EEXIST
    assert errno_of(rw_view.setxattr, "f", b"user.new", b"2", os.XATTR_REPLACE) == errno.ENODATA
    rw_view.setxattr("f", b"user.a", b"replaced", os.XATTR_REPLACE)
    rw_view.setxattr("f", b"user.created", b"c", os.XATTR_CREATE)
    assert rw_view.getxattr("f", b"user.a") == b"replaced"
    rw_view.removexattr("f", b"user.a")
    assert errno_of(rw_view.getxattr, "f", b"user.a") == errno.ENODATA
    assert errno_of(rw_view.removexattr, "f", b"user.a") == errno.ENODATA
    names = [n for n in rw_view.listxattr("f") if n.startswith(b"user.")]
    assert sorted(names) == [b"user.bin", b"user.created", b"user.empty"]
    rw_view.mkdir("d")
    for i in range(50):
        rw_view.setxattr("d", f"user.k{i:02d}".encode(), f"v{i}".encode())
    got = {n: rw_view.getxattr("d", n) for n in rw_view.listxattr("d") if n.startswith(b"user.")}
    assert got == {f"user.k{i:02d}".encode(): f"v{i}".encode() for i in range(50)}


def test_statfs_reports_real_numbers_in_4k_blocks(rw_view: View):
    st = rw_view.statfs()
    assert st.bsize == 4096 and st.frsize == 4096
    assert st.blocks > 0 and 0 <= st.bavail <= st.bfree <= st.blocks
    assert st.files > 0 and 0 <= st.ffree <= st.files
    assert st.namemax == 255
    assert st.blocks * st.frsize >= 100 * MiB


def test_fsync_and_fdatasync(rw_view: View):
    data = pattern("sync", 70_000)
    fd = rw_view.open("f", os.O_RDWR | os.O_CREAT)
    try:
        rw_view.pwrite(fd, data, 0)
        rw_view.fsync(fd)
        rw_view.pwrite(fd, b"tail", len(data))
        rw_view.fdatasync(fd)
    finally:
        rw_view.close(fd)
    dfd = rw_view.open("", os.O_RDONLY | os.O_DIRECTORY)
    try:
        rw_view.fsync(dfd)
    finally:
        rw_view.close(dfd)
    assert rw_view.read_file("f") == data + b"tail"


# -- big directories -----------------------------------------------------------------

# 100,000 entries are only worth their time once per way of access: each
# in-process subject and the first FUSE subject (the host's ext4 needs no proof
# here). Each gets them by its fastest path: a copy of a host tree made when it
# is prepared (for FUSE, before the mount: not 200,000 requests through it).
BIG_COUNT = 100_000
_FIRST_FUSE = next(i for i in WRITE_VIEW_IDS if i.endswith("-fuse"))
BIG_DIR_VIEW_IDS = [i for i in WRITE_VIEW_IDS if i == _FIRST_FUSE or i.endswith("-object")]


def _big_name(i: int) -> bytes:
    return f"n{i:06d}".encode()


def _make_big_tree(root: Path) -> Path:
    (root / "big").mkdir(parents=True)
    base = os.fsencode(root / "big")
    for i in range(BIG_COUNT):
        os.mknod(os.path.join(base, _big_name(i)), stat.S_IFREG | 0o644)
    return root


@pytest.fixture(scope="session")
def big_tree(tmp_path_factory) -> Iterator[Path]:
    # On tmpfs when there is one: 100,000 creations there take a second, on
    # ext4 several.
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tmp_path_factory.getbasetemp()
    scratch = Path(tempfile.mkdtemp(dir=base, prefix="occlumfs-conformance-"))
    try:
        yield _make_big_tree(scratch / "tree")
    finally:
        shutil.rmtree(scratch)


@pytest.fixture(params=view_params(BIG_DIR_VIEW_IDS))
def big_dir_view(request, view_pool, big_tree) -> Iterator[View]:
    with view_pool.private(request.param, big_tree) as view:
        yield view


def test_directory_of_100k_entries(big_dir_view: View):
    names = [_big_name(i) for i in range(BIG_COUNT)]
    handle = big_dir_view.opendir("big")
    try:
        listing: list[tuple[bytes, int]] = []
        while batch := big_dir_view.readdir(handle):
            listing += batch
    finally:
        big_dir_view.closedir(handle)
    assert len(listing) == BIG_COUNT and sorted(n for n, _ in listing) == names
    # Resume deep into the listing from a cookie, on a new open of the directory.
    handle = big_dir_view.opendir("big")
    try:
        big_dir_view.seekdir(handle, listing[90_000][1])
        rest = []
        while batch := big_dir_view.readdir(handle):
            rest += [n for n, _ in batch]
    finally:
        big_dir_view.closedir(handle)
    assert rest == [n for n, _ in listing[90_001:]]
    # Lookups, changes and creation in it stay correct.
    assert stat.S_ISREG(big_dir_view.lstat(b"big/" + names[BIG_COUNT // 2]).mode)
    big_dir_view.unlink(b"big/" + names[0])
    big_dir_view.rename(b"big/" + names[1], b"big/renamed")
    big_dir_view.write_file(b"big/created", b"new")
    after = big_dir_view.listdir("big")
    assert len(after) == BIG_COUNT and len(set(after)) == BIG_COUNT
    assert {b"renamed", b"created"} <= set(after) and not {names[0], names[1]} & set(after)
    assert big_dir_view.read_file(b"big/created") == b"new"
