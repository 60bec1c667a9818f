"""Behaviour only a real mount shows: d_type in listings, shared mmap writes,
several writers at once.

Run over the FUSE mount of every subject and, as the oracle, the host.
After writing, each test syncs and drops the kernel's page cache for the file,
so the bytes read back come from the filesystem, not from the kernel's copy.
"""

from __future__ import annotations

import mmap
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

from conformance.reference import pattern
from conformance.views import View, getdents64


def _read_from_filesystem(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def test_shared_mmap_writes_reach_the_file(kernel_rw_view: View):
    path = kernel_rw_view.host_root / "mapped"
    size = 3 * 4096 + 100
    path.write_bytes(pattern("before", size))
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            m[0:5] = b"hello"
            m[4090:4102] = b"X" * 12  # across a page boundary
            m[size - 3 :] = b"end"
            # Visible to read(2) while still mapped: one page cache.
            assert os.pread(fd, 12, 4090) == b"X" * 12
            m.flush()
    finally:
        os.close(fd)
    want = bytearray(pattern("before", size))
    want[0:5] = b"hello"
    want[4090:4102] = b"X" * 12
    want[size - 3 :] = b"end"
    assert _read_from_filesystem(path) == bytes(want)


def test_mmap_sees_writes_made_through_write(kernel_rw_view: View):
    path = kernel_rw_view.host_root / "mapped"
    path.write_bytes(bytes(8192))
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 8192, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            os.pwrite(fd, b"written", 4000)
            assert m[4000:4007] == b"written"
    finally:
        os.close(fd)


WRITERS = 4
STRIDE = 1000  # not a block size: neighbours write different parts of one block
ROUNDS = 64


def _expected() -> bytes:
    out = bytearray(WRITERS * STRIDE * ROUNDS)
    for writer in range(WRITERS):
        piece = pattern(f"writer{writer}", STRIDE)
        for r in range(ROUNDS):
            start = (r * WRITERS + writer) * STRIDE
            out[start : start + STRIDE] = piece
    return bytes(out)


_WRITER = """
import hashlib, os, sys
path, writer, writers, stride, rounds = sys.argv[1], *map(int, sys.argv[2:])
piece = bytearray()
counter = 0
while len(piece) < stride:
    piece += hashlib.sha256(f"writer{writer}:{counter}".encode()).digest()
    counter += 1
fd = os.open(path, os.O_WRONLY)
for r in range(rounds):
    os.pwrite(fd, bytes(piece[:stride]), (r * writers + writer) * stride)
os.close(fd)
"""


def test_concurrent_writer_threads_on_one_file(kernel_rw_view: View):
    path = kernel_rw_view.host_root / "shared"
    path.write_bytes(b"")
    start = threading.Barrier(WRITERS)
    errors: list[BaseException] = []

    def write(writer: int) -> None:
        try:
            piece = pattern(f"writer{writer}", STRIDE)
            fd = os.open(path, os.O_WRONLY)
            try:
                start.wait()
                for r in range(ROUNDS):
                    os.pwrite(fd, piece, (r * WRITERS + writer) * STRIDE)
            finally:
                os.close(fd)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert _read_from_filesystem(path) == _expected()


def test_concurrent_writer_processes_on_one_file(kernel_rw_view: View):
    path = kernel_rw_view.host_root / "shared"
    path.write_bytes(b"")
    args = [str(path), "{}", str(WRITERS), str(STRIDE), str(ROUNDS)]
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, *(a.format(w) for a in args)])
        for w in range(WRITERS)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0] * WRITERS
    assert _read_from_filesystem(path) == _expected()


_DT = {
    stat.S_IFREG: 8,
    stat.S_IFDIR: 4,
    stat.S_IFLNK: 10,
    stat.S_IFIFO: 1,
    stat.S_IFCHR: 2,
    stat.S_IFBLK: 6,
}


def test_listings_carry_each_entrys_type(kernel_ro_view: View):
    """d_type lets `ls`, `find` and friends skip a stat per entry: it must be right."""
    for rel in ["", "special", "links", "tree"]:
        fd = os.open(kernel_ro_view.host_root / rel, os.O_RDONLY | os.O_DIRECTORY)
        try:
            entries = []
            while batch := getdents64(fd, 4096, with_type=True):
                entries += [e for e in batch if e[0] not in (b".", b"..")]
        finally:
            os.close(fd)
        assert entries, rel
        for name, _, d_type in entries:
            mode = kernel_ro_view.lstat(os.path.join(rel.encode(), name)).mode
            assert d_type == _DT[stat.S_IFMT(mode)], (rel, name)


def test_chown_clears_setuid_and_setgid(kernel_rw_view: View):
    """The kernel drops set-id bits when a file changes owner (even by root), and
    tells the filesystem in the same setattr."""
    kernel_rw_view.write_file("f", b"#!/bin/sh\n")
    kernel_rw_view.chmod("f", 0o6755)
    kernel_rw_view.chown("f", 1234, 5678)
    st = kernel_rw_view.lstat("f")
    assert (st.uid, st.gid) == (1234, 5678)
    assert stat.S_IMODE(st.mode) == 0o0755
    kernel_rw_view.mkdir("d")
    kernel_rw_view.chmod("d", 0o2775)
    kernel_rw_view.chown("d", 1234, 5678)  # directories keep theirs
    assert stat.S_IMODE(kernel_rw_view.lstat("d").mode) == 0o2775
