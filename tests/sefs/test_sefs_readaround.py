"""DiskStorage's read-around: a small read of a data file brings its 128 KiB window
into the host's page cache, once per window; page residency is read with fincore."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from occlumfs.sefs.storage import DiskStorage

KiB = 1024
WINDOW = DiskStorage.READ_AROUND


def resident(path: Path) -> int:
    """Bytes of ``path`` in the host's page cache (util-linux fincore)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(out.split()[0])


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert resident(path) == 0


def test_small_read_brings_in_its_window_once(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    storage = DiskStorage(tmp_path)
    try:
        data = os.urandom(8 * WINDOW)
        storage.pwritev("d/x", 0, [data])
        host = tmp_path / "d" / "x"
        evict(host)
        buf = bytearray(4 * KiB)
        assert storage.preadv("d/x", 2 * WINDOW + 40 * KiB, [memoryview(buf)]) == len(buf)
        assert buf == data[2 * WINDOW + 40 * KiB : 2 * WINDOW + 44 * KiB]
        assert resident(host) >= WINDOW  # the whole window, not just the 4 KiB asked for
        # Once per window: a second read in it, after the host dropped it, reads as is.
        evict(host)
        assert storage.preadv("d/x", 2 * WINDOW + 8 * KiB, [memoryview(buf)]) == len(buf)
        assert buf == data[2 * WINDOW + 8 * KiB : 2 * WINDOW + 12 * KiB]
        assert resident(host) < WINDOW
        # Reopening the file (here: after a rewrite) starts over.
        storage.write_file("d/x", data)
        evict(host)
        assert storage.preadv("d/x", 2 * WINDOW + 8 * KiB, [memoryview(buf)]) == len(buf)
        assert resident(host) >= WINDOW
    finally:
        storage.close()


def test_sequential_reads_keep_the_host_reading_ahead(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    storage = DiskStorage(tmp_path)
    try:
        data = os.urandom(8 * 1024 * KiB)
        storage.pwritev("d/x", 0, [data])
        host = tmp_path / "d" / "x"
        evict(host)
        buf = bytearray(WINDOW)
        start = 3 * 1024 * KiB
        assert storage.preadv("d/x", start, [memoryview(buf)]) == WINDOW
        assert resident(host) < 2 * 1024 * KiB  # one large read alone: no hint
        assert storage.preadv("d/x", start + WINDOW, [memoryview(buf)]) == WINDOW
        assert buf == data[start + WINDOW : start + 2 * WINDOW]
        assert resident(host) >= DiskStorage.READ_AHEAD  # the next 4 MiB are on their way
    finally:
        storage.close()
