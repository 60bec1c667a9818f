"""Through a real mount: shared mmap writes, concurrent writers, appends, remount."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import threading

import pytest
from conftest import run_cli

pytestmark = pytest.mark.fuse


def test_shared_mmap_writes_reach_the_file_and_survive_remount(volume, mount):
    with mount(*volume.mount_args()) as mnt:
        path = mnt / "mapped"
        path.write_bytes(b"a" * 3 * 4096)
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            m[4000:4200] = b"M" * 200
            m[-1:] = b"Z"
            m.flush()
        with open(path, "rb") as f:
            data = f.read()
        assert data[4000:4200] == b"M" * 200 and data[-1:] == b"Z" and len(data) == 3 * 4096
    with mount(*volume.mount_args()) as mnt:
        assert (mnt / "mapped").read_bytes() == data
    assert run_cli(*volume.fsck_args()).returncode == 0


def test_concurrent_writers_to_one_file(volume, mount):
    region = 256 * 1024
    with mount(*volume.mount_args()) as mnt:
        path = mnt / "shared"
        path.write_bytes(b"")
        errors: list[BaseException] = []

        def writer(k: int) -> None:
            try:
                fd = os.open(path, os.O_WRONLY)
                try:
                    for i in range(0, region, 10_000):
                        chunk = bytes([65 + k]) * min(10_000, region - i)
                        os.pwrite(fd, chunk, k * region + i)
                finally:
                    os.close(fd)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    with mount(*volume.mount_args()) as mnt:
        data = (mnt / "shared").read_bytes()
    assert data == b"".join(bytes([65 + k]) * region for k in range(4))


_APPENDER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
for i in range(300):
    os.write(fd, f"{sys.argv[2]}:{i:04d}\n".encode())
os.close(fd)
"""


def test_o_append_from_two_processes_interleaves_whole_lines(volume, mount):
    with mount(*volume.mount_args()) as mnt:
        path = mnt / "log"
        path.write_bytes(b"")
        procs = [
            subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), name])
            for name in ("a", "b")
        ]
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
        lines = path.read_text().splitlines()
    assert sorted(lines) == sorted(f"{n}:{i:04d}" for n in "ab" for i in range(300))
    assert [x for x in lines if x.startswith("a")] == [f"a:{i:04d}" for i in range(300)]


def test_statfs_and_big_offsets_through_the_mount(volume, mount):
    with mount(*volume.mount_args()) as mnt:
        st = os.statvfs(mnt)
        host = os.statvfs(volume.dir)
        assert st.f_bsize == 4096 and st.f_frsize == 4096
        assert abs(st.f_blocks * 4096 - host.f_blocks * host.f_frsize) < 1 << 20
        with open(mnt / "far", "wb") as f:
            f.seek(6 << 30)
            f.write(b"beyond 4 GiB")
        with open(mnt / "far", "rb") as f:
            f.seek((6 << 30) - 4)
            assert f.read() == b"\0\0\0\0beyond 4 GiB"
        assert os.stat(mnt / "far").st_blocks <= 16
