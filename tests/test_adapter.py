"""The FUSE adapter: errors map to errnos in one place, and a bug never ends the mount.

The filesystem served here is real (MemFS) with a few requests that hit a bug
(a non-FUSE exception), as a defective filesystem would. It is served in the
foreground by a small script calling :func:`occlumfs.mount.serve`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from occlumfs.mount import mounted_paths

_FAULTY_SERVER = """
import errno, sys
from pathlib import Path
from occlumfs.errors import FSError, IntegrityError
from occlumfs.memfs import MemFS
from occlumfs.mount import serve

class FaultyFS(MemFS):
    def lookup(self, parent, name):
        if name == b"bug-in-lookup":
            raise RuntimeError("a bug in lookup")
        if name == b"tampered":
            raise IntegrityError("tampered: block 7 of /tampered")
        if name == b"errno-eacces":
            raise FSError(errno.EACCES)
        return super().lookup(parent, name)

    def read(self, fh, offset, size):
        if self._handle(fh).xattrs.get(b"user.fail") == b"read":
            raise ZeroDivisionError("a bug in read")
        return super().read(fh, offset, size)

    def forget(self, ino, nlookup):
        raise FSError(errno.EIO, "a bug in forget")

    def listxattr(self, ino):
        if self._node(ino).xattrs.get(b"user.fail") == b"listxattr":
            raise KeyError("a bug in listxattr")
        return super().listxattr(ino)

serve(FaultyFS("faulty"), Path(sys.argv[1]), foreground=True, log_file=Path(sys.argv[2]))
"""


_COUNTING_SERVER = """
import json, sys
from collections import Counter
from pathlib import Path
from occlumfs import adapter
from occlumfs.memfs import MemFS
from occlumfs.mount import serve

class CountingFS(MemFS):
    # What reached the server, shown as the root's xattr user.counts.
    counts = Counter()

    def lookup(self, parent, name):
        self.counts["lookup " + name.decode()] += 1
        return super().lookup(parent, name)

    def read(self, fh, offset, size):
        self.counts["read"] += 1
        return super().read(fh, offset, size)

    def getxattr(self, ino, name):
        self.counts["getxattr " + name.decode()] += 1
        if name == b"user.counts":
            return json.dumps(self.counts).encode()
        return super().getxattr(ino, name)

# Requests the adapter answers itself never reach the filesystem: count them there too.
answer_getxattr = adapter.FuseOperations.getxattr

async def getxattr_request(self, inode, name, ctx):
    CountingFS.counts["request getxattr " + name.decode()] += 1
    return await answer_getxattr(self, inode, name, ctx)

adapter.FuseOperations.getxattr = getxattr_request
serve(CountingFS("counting"), Path(sys.argv[1]), foreground=True, log_file=Path(sys.argv[2]))
"""


@pytest.fixture
def faulty_mount(tmp_path):
    yield from _served(_FAULTY_SERVER, tmp_path)


@pytest.fixture
def counting_mount(tmp_path):
    for mnt, _log, _server in _served(_COUNTING_SERVER, tmp_path):
        yield mnt, lambda m=mnt: Counter(json.loads(os.getxattr(m, b"user.counts")))


def _served(script: str, tmp_path: Path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-c", script, str(mnt), str(log)]
    with subprocess.Popen(cmd) as server:
        try:
            deadline = time.monotonic() + 30
            while mnt.resolve() not in mounted_paths():
                assert server.poll() is None, "the server died before mounting"
                assert time.monotonic() < deadline, "not mounted in 30 s"
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.wait(timeout=0.02)
            yield mnt, log, server
            subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
            assert server.wait(timeout=30) == 0
        finally:
            if mnt.resolve() in mounted_paths():
                subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
            server.kill()


def _errno(call, *args) -> int:
    try:
        call(*args)
    except OSError as exc:
        return exc.errno
    raise AssertionError(f"{call.__name__}{args} succeeded")


def _still_serving(mnt: Path) -> None:
    (mnt / "alive").write_bytes(b"still serving")
    assert (mnt / "alive").read_bytes() == b"still serving"


@pytest.mark.fuse
def test_a_bug_answers_eio_keeps_the_mount_and_is_logged(faulty_mount):
    mnt, log, server = faulty_mount
    assert _errno(os.lstat, mnt / "bug-in-lookup") == errno.EIO
    _still_serving(mnt)
    # The same in a data path: the file's pages are not cached, so read reaches us.
    (mnt / "data").write_bytes(b"x" * 10_000)
    os.setxattr(mnt / "data", b"user.fail", b"read")
    fd = os.open(mnt / "data", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert _errno(os.pread, fd, 100, 0) == errno.EIO
    finally:
        os.close(fd)
    os.setxattr(mnt / "data", b"user.fail", b"listxattr")
    assert _errno(os.listxattr, mnt / "data") == errno.EIO
    _still_serving(mnt)
    assert server.poll() is None
    text = log.read_text()
    assert "lookup(1, b'bug-in-lookup') failed" in text
    assert "RuntimeError: a bug in lookup" in text
    assert "ZeroDivisionError: a bug in read" in text
    assert "KeyError: 'a bug in listxattr'" in text
    assert text.count("ERROR") >= 3


@pytest.mark.fuse
def test_filesystem_errors_pass_through_and_integrity_errors_are_logged(faulty_mount):
    mnt, log, _ = faulty_mount
    assert _errno(os.lstat, mnt / "errno-eacces") == errno.EACCES
    assert _errno(os.lstat, mnt / "missing") == errno.ENOENT
    assert _errno(os.lstat, mnt / "tampered") == errno.EIO
    _still_serving(mnt)
    text = log.read_text()
    assert "tampered: block 7 of /tampered" in text
    assert "errno-eacces" not in text  # an ordinary errno is an answer, not an error


@pytest.mark.fuse
def test_a_failing_forget_is_logged_and_the_mount_lives_on(faulty_mount):
    mnt, log, server = faulty_mount
    (mnt / "short-lived").write_bytes(b"")
    os.unlink(mnt / "short-lived")  # its inode is evicted: the kernel sends a forget
    deadline = time.monotonic() + 30
    while "a bug in forget" not in log.read_text():
        assert time.monotonic() < deadline, "no forget reached the server in 30 s"
        assert server.poll() is None, "the server died"
        os.listdir(mnt)  # requests keep the queue moving; forgets ride along
    _still_serving(mnt)
    assert server.poll() is None


@pytest.mark.fuse
def test_what_only_the_mount_changes_the_kernel_keeps(counting_mount):
    mnt, counts = counting_mount
    # A missing name is asked once: the kernel keeps the answer (a negative entry).
    for _ in range(3):
        assert _errno(os.lstat, mnt / "absent") == errno.ENOENT
    assert counts()["lookup absent"] == 1
    # Creating it through the mount replaces that answer at once.
    (mnt / "absent").write_bytes(b"here now\n")
    assert (mnt / "absent").read_bytes() == b"here now\n"
    # A file read again, through a new open, comes from the kernel's pages.
    (mnt / "data").write_bytes(b"x" * 10_000)
    Path("/proc/sys/vm/drop_caches").write_text("1\n")
    reads = counts().get("read", 0)
    assert (mnt / "data").read_bytes() == b"x" * 10_000
    after_one = counts()["read"]
    assert after_one > reads
    for _ in range(3):
        assert (mnt / "data").read_bytes() == b"x" * 10_000
    assert counts()["read"] == after_one
    # Changes through the mount show at once.
    with open(mnt / "data", "r+b") as f:
        f.write(b"changed")
    assert (mnt / "data").read_bytes()[:8] == b"changedx"


@pytest.mark.fuse
def test_acls_are_not_supported_and_ls_stops_asking(counting_mount):
    mnt, counts = counting_mount
    for i in range(20):
        (mnt / f"f{i}").write_bytes(b"")
    os.setxattr(mnt / "f0", b"user.kept", b"v")
    (mnt / "d").mkdir()
    # An ACL granting user 1000 read, beside the owner, group, mask and other entries.
    entries = [(0x01, 6, -1), (0x02, 4, 1000), (0x04, 4, -1), (0x10, 4, -1), (0x20, 4, -1)]
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHi", *e) for e in entries)
    for path, name in (
        (mnt / "f0", b"system.posix_acl_access"),
        (mnt / "d", b"system.posix_acl_default"),
    ):
        assert _errno(os.getxattr, path, name) == errno.EOPNOTSUPP
        assert _errno(os.setxattr, path, name, acl) == errno.EOPNOTSUPP
        assert _errno(os.removexattr, path, name) == errno.EOPNOTSUPP
    (mnt / "d").rmdir()
    assert os.getxattr(mnt / "f0", b"user.kept") == b"v"
    assert os.listxattr(mnt / "f0") == ["user.kept"]
    asked = "request getxattr system.posix_acl_access"
    before = counts()[asked]
    listing = subprocess.run(["ls", "-l", str(mnt)], capture_output=True, text=True, check=True)
    modes = [line.split()[0] for line in listing.stdout.splitlines()[1:]]
    assert len(modes) == 20 and not any(m.endswith("+") for m in modes)  # no ACL claimed
    # ls learns "not supported" once for the mount instead of asking for every file.
    assert counts()[asked] - before <= 1
    assert counts()["request getxattr security.selinux"] >= 20  # still answered per file


@pytest.mark.fuse
def test_a_listing_starts_with_dot_and_dotdot_and_resumes_across_requests(mount):
    """`ls -a` and code that counts entries to find a directory empty see "." and ".."
    as on ext4; a listing spread over many READDIR requests returns every name once."""
    with mount("x", "-t", "mem") as mnt:
        (mnt / "d").mkdir()
        names = {f"entry-{i:05d}" for i in range(3000)}  # ~100 READDIR requests
        for name in names:
            (mnt / "d" / name).write_bytes(b"")
        (mnt / "empty").mkdir()
        for path, parent, expected in (
            (mnt / "d", mnt, names),
            (mnt / "empty", mnt, set()),
            (mnt, None, {"d", "empty"}),
        ):
            out = subprocess.run(
                ["ls", "-1fi", str(path)], check=True, capture_output=True, text=True
            ).stdout
            listed = [line.split(maxsplit=1) for line in out.splitlines()]
            got = [name for _, name in listed]
            assert got[:2] == [".", ".."], got[:5]
            assert sorted(got[2:]) == sorted(expected)  # each once
            inos = dict((name, int(ino)) for ino, name in listed[:2])
            assert inos["."] == os.stat(path).st_ino
            if parent is not None:
                assert inos[".."] == os.stat(parent).st_ino
