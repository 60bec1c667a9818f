"""Host storage that SEFS writes through.

Names are ``/``-separated paths relative to the SEFS directory (``head``,
``m/0000000000000001.pack``, ``d/0000000000000002``), at most one directory
deep. The filesystem only uses the operations below, so a crash can be
simulated by a storage that keeps what was made durable (by
``fsync``/``fsync_dir``) apart from what was not (the tests' power-loss
storage does).

:class:`DiskStorage` resolves every name through directory descriptors with
``O_NOFOLLOW`` (:mod:`occlumfs.hostio`): a symlink, fifo, device, directory or
hard link planted in the store is an integrity error naming it, and nothing
outside the store is ever opened, written or removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from occlumfs.hostio import HostDir, willneed

_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages, do not wait
WRITEBACK_FROM = 256 << 10  # bytes: a run written behind this long is sent to the disk at once


class Storage:
    """The contract; every method may raise OSError like the host would."""

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def preadv(self, name: str, offset: int, buffers: Sequence[memoryview]) -> int:
        """Read into ``buffers`` from ``offset``; returns the bytes read (short at EOF)."""
        raise NotImplementedError

    def pwritev(self, name: str, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        """Write at ``offset``, creating the file if needed."""
        raise NotImplementedError

    def write_file(self, name: str, data: bytes) -> None:
        """Create (or replace the contents of) ``name`` with ``data``."""
        raise NotImplementedError

    def data_writer(self) -> DataWriter:
        """What another thread writes data files through while this one goes on
        (occlumfs.sefs.writeback); closed by that thread when it is done."""
        return DataWriter(self)

    def replace(self, name: str, data: bytes, tmp: str) -> None:
        """Atomically make ``name`` hold ``data`` by way of ``tmp`` (same directory)."""
        self.write_file(tmp, data)
        self.fsync(tmp)
        self.rename(tmp, name)
        self.fsync_dir(name.rpartition("/")[0])

    def fsync(self, name: str) -> None:
        raise NotImplementedError

    def datasync(self, name: str) -> None:
        """Make the contents of ``name`` durable (its size too, not its times)."""
        self.fsync(name)

    def fsync_dir(self, name: str) -> None:
        """Make creations, renames and removals in directory ``name`` ("" = top) durable."""
        raise NotImplementedError

    def rename(self, src: str, dst: str) -> None:
        raise NotImplementedError

    def unlink(self, name: str) -> None:
        raise NotImplementedError

    def listdir(self, name: str) -> list[str]:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def sync(self, names: Sequence[str]) -> None:
        """Make the contents of ``names`` and their directory entries durable."""
        for name in names:
            self.fsync(name)
        for directory in sorted({name.rpartition("/")[0] for name in names}):
            self.fsync_dir(directory)

    def discard(self, names: Sequence[str]) -> None:
        """Delete files nothing references any more; missing ones are fine."""
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                self.unlink(name)

    def wait_discarded(self) -> None:
        """Return once the files discarded so far are deleted."""

    def statvfs(self) -> os.statvfs_result | None:
        return None

    def close(self) -> None:
        pass


class DataWriter:
    """Writes data files for one thread: here, through the storage itself."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    def pwritev(self, name: str, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        self._storage.pwritev(name, offset, buffers)

    def close(self) -> None:
        pass


class DiskStorage(Storage):
    """Files under a host directory, with a bounded cache of open descriptors.

    The directory is opened once (``O_NOFOLLOW``), ``m/`` and ``d/`` relative
    to it; every file below goes through :class:`~occlumfs.hostio.HostDir`.
    Many files are made durable with one ``syncfs`` rather than an fsync each,
    and discarded files are unlinked by a background thread: on a journaling
    host an unlink costs about a millisecond, which ``rm -rf`` would otherwise
    pay inside each request.

    Reads give the host hints (``POSIX_FADV_WILLNEED``, which starts the
    host's reads and returns), per open file (docs/performance.md):

    * a read smaller than :attr:`READ_AROUND` first has the aligned window
      around it brought into the host's page cache, once per window: a random
      4 KiB read of a cold file costs about as much disk time as a 128 KiB
      one, so later reads near it find the host cache warm;
    * a larger read that continues the previous one keeps :attr:`READ_AHEAD`
      bytes past it on their way in, so the disk works while the filesystem
      decrypts (the host's own read-ahead alone left the server waiting for
      the disk on most requests).
    """

    MAX_FDS = 64
    SYNCFS_ABOVE = 8  # files; beyond this one syncfs is cheaper than an fsync each
    READ_AROUND = 128 * 1024  # bytes, a power of two: the window a small read brings in
    AROUND_WINDOWS = 1 << 20  # windows tracked per file (a 128 KiB bitmap); reads past: as is
    READ_AHEAD = 4 << 20  # bytes kept on their way in ahead of a sequential reader

    def __init__(self, root: Path | HostDir) -> None:
        self.dir = root if isinstance(root, HostDir) else HostDir.open(root)
        self.root = Path(self.dir.path)
        self._dirs: dict[str, HostDir] = {"": self.dir}
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._hints: dict[str, _ReadHints] = {}  # per open file
        self._reaper: threading.Thread | None = None
        self._reaper_pid = 0
        self._doomed: queue.Queue[str | None] = queue.Queue()

    def _subdir(self, name: str) -> HostDir:
        found = self._dirs.get(name)
        if found is None:
            found = self._dirs[name] = self.dir.subdir(name)
        return found

    def _at(self, name: str) -> tuple[HostDir, str]:
        """The open directory holding ``name`` and its last component."""
        parent, _, base = name.rpartition("/")
        return self._subdir(parent), base

    def _fd(self, name: str, create: bool) -> int:
        fd = self._fds.get(name)
        if fd is not None:
            self._fds.move_to_end(name)
            return fd
        where, base = self._at(name)
        try:
            fd = where.open_file(base, os.O_RDWR | (os.O_CREAT if create else 0))
        except OSError as exc:
            # A file we may only read (its mode, or read-only host storage):
            # reads work, and a write through it fails with the host's reason.
            if not isinstance(exc, PermissionError) and exc.errno != errno.EROFS:
                raise
            fd = where.open_file(base, os.O_RDONLY)
        self._fds[name] = fd
        while len(self._fds) > self.MAX_FDS:
            old_name, old = self._fds.popitem(last=False)
            self._hints.pop(old_name, None)
            os.close(old)
        return fd

    def _forget(self, name: str) -> None:
        fd = self._fds.pop(name, None)
        self._hints.pop(name, None)
        if fd is not None:
            os.close(fd)

    def _hint(self, name: str, fd: int, offset: int, size: int) -> None:
        """Tell the host what a read of ``size`` bytes at ``offset`` will want next."""
        hints = self._hints.get(name)
        if hints is None:
            hints = self._hints[name] = _ReadHints()
        end = offset + size
        if size < self.READ_AROUND:
            window = offset // self.READ_AROUND
            if window < self.AROUND_WINDOWS:
                seen = hints.windows
                byte, bit = window >> 3, 1 << (window & 7)
                if byte >= len(seen):
                    seen.extend(bytes(byte + 1 - len(seen)))
                if not seen[byte] & bit:
                    seen[byte] |= bit
                    start = window * self.READ_AROUND
                    willneed(fd, start, self.READ_AROUND)
        elif offset == hints.expect and hints.advised - end < self.READ_AHEAD // 2:
            start = max(hints.advised, end)  # advised in halves: once per 2 MiB read
            hints.advised = end + self.READ_AHEAD
            willneed(fd, start, hints.advised - start)
        hints.expect = end

    def read(self, name: str) -> bytes:
        where, base = self._at(name)
        return where.read_file(base)

    def preadv(self, name: str, offset: int, buffers: Sequence[memoryview]) -> int:
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fd(name, False)
        else:
            self._fds.move_to_end(name)
        want = len(buffers[0]) if len(buffers) == 1 else sum(map(len, buffers))
        self._hint(name, fd, offset, want)
        total = os.preadv(fd, buffers, offset)
        while 0 < total < want:  # a short read that is not EOF: resume it
            n = os.preadv(fd, _skip(buffers, total), offset + total)
            if n == 0:
                break
            total += n
        return total

    def pwritev(self, name: str, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        _pwrite_all(self._fd(name, True), buffers, offset)

    def data_writer(self) -> DataWriter:
        return _DiskDataWriter(self.dir)

    def write_file(self, name: str, data: bytes) -> None:
        self._forget(name)
        where, base = self._at(name)
        where.write_file(base, data)

    def replace(self, name: str, data: bytes, tmp: str) -> None:
        self._forget(name)
        self._forget(tmp)
        where, base = self._at(name)
        where.replace_file(base, data, tmp=tmp.rpartition("/")[2])

    def fsync(self, name: str) -> None:
        fd = self._fds.get(name)
        if fd is not None:
            os.fsync(fd)
            return
        where, base = self._at(name)
        where.fsync_file(base)

    def datasync(self, name: str) -> None:
        os.fdatasync(self._fd(name, False))

    def fsync_dir(self, name: str) -> None:
        self._subdir(name).fsync()

    def rename(self, src: str, dst: str) -> None:
        self._forget(src)
        self._forget(dst)
        src_dir, src_base = self._at(src)
        dst_dir, dst_base = self._at(dst)
        if src_dir is not dst_dir:
            raise ValueError("SEFS renames only within one directory")
        src_dir.rename(src_base, dst_base)

    def unlink(self, name: str) -> None:
        self._forget(name)
        where, base = self._at(name)
        where.unlink(base)

    def listdir(self, name: str) -> list[str]:
        return self._subdir(name).listdir()

    def exists(self, name: str) -> bool:
        where, base = self._at(name)
        return where.lstat(base) is not None

    def entries(self, name: str) -> list[tuple[str, os.stat_result]]:
        """Each file in directory ``name`` with its status; anything but a regular file refuses."""
        where = self._subdir(name)
        out = []
        for entry in where.listdir():
            where.check_file(entry)
            st = where.lstat(entry)
            if st is not None:
                out.append((entry, st))
        return out

    def statvfs(self) -> os.statvfs_result:
        return os.fstatvfs(self.dir.fd)

    def sync(self, names: Sequence[str]) -> None:
        if len(names) <= self.SYNCFS_ABOVE:
            super().sync(names)
            return
        if _libc.syncfs(self.dir.fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(self.root))

    def discard(self, names: Sequence[str]) -> None:
        if not names:
            return
        for name in names:
            self._forget(name)
        # Threads do not survive the mount's fork: start one in whoever discards.
        if self._reaper is None or self._reaper_pid != os.getpid():
            self._doomed = queue.Queue()
            self._reaper = threading.Thread(target=self._reap, name="sefs-reaper", daemon=True)
            self._reaper_pid = os.getpid()
            self._reaper.start()
        for name in names:
            self._doomed.put(name)

    def _reap(self) -> None:
        while (name := self._doomed.get()) is not None:
            # Unlinking through the directory descriptor removes only the entry,
            # whatever was planted there; nothing outside the store is reached.
            try:
                where, base = self._at(name)
                os.unlink(base, dir_fd=where.fd)
            except OSError:
                # Gone already, or refused: the next read-write mount's leftover
                # check removes what is left. The thread lives on, and whoever
                # waits for the queue (wait_discarded) is not kept waiting.
                pass
            finally:
                self._doomed.task_done()

    def wait_discarded(self) -> None:
        if self._reaper is not None and self._reaper_pid == os.getpid():
            self._doomed.join()

    def close(self) -> None:
        if self._reaper is not None and self._reaper_pid == os.getpid():
            self._doomed.put(None)
            self._reaper.join()
            self._reaper = None
        self._hints.clear()
        while self._fds:
            _, fd = self._fds.popitem()
            os.close(fd)
        for opened in self._dirs.values():
            opened.close()
        self._dirs.clear()


class _DiskDataWriter(DataWriter):
    """Data files written from one thread, through descriptors of its own (the storage's
    cache of them belongs to the request thread), opened like the storage opens them."""

    def __init__(self, root: HostDir) -> None:
        self._root = root
        self._dirs: dict[str, HostDir] = {}
        self._fds: dict[str, int] = {}

    def pwritev(self, name: str, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        fd = self._fds.get(name)
        if fd is None:
            parent, _, base = name.rpartition("/")
            where = self._dirs.get(parent)
            if where is None:
                where = self._dirs[parent] = self._root.subdir(parent) if parent else self._root
            if len(self._fds) >= DiskStorage.MAX_FDS:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[name] = where.open_file(base, os.O_RDWR | os.O_CREAT)
        _pwrite_all(fd, buffers, offset)
        size = sum(map(len, buffers))
        if size >= WRITEBACK_FROM:
            # Have the host start writing a long run to its disk now (a hint; it does not
            # wait): the fsync that follows a long write then finds little left. Small
            # (random) runs stay in the host's cache, where rewrites and neighbours merge.
            _sync_file_range(fd, offset, size, _SYNC_FILE_RANGE_WRITE)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for parent, where in self._dirs.items():
            if parent:
                where.close()
        self._dirs.clear()


def _pwrite_all(fd: int, buffers: Sequence[bytes | memoryview], offset: int) -> None:
    want = sum(map(len, buffers))
    done = os.pwritev(fd, buffers, offset)
    if done != want:  # short writes only happen on a full disk
        joined = b"".join(bytes(b) for b in buffers)
        while done < want:
            n = os.pwrite(fd, joined[done:], offset + done)
            if n == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += n


class _ReadHints:
    """What one open data file's readers were last told to expect (``DiskStorage._hint``)."""

    __slots__ = ("advised", "expect", "windows")

    def __init__(self) -> None:
        self.windows = bytearray()  # a bit per READ_AROUND window already brought in
        self.expect = -1  # where a sequential reader's next read starts
        self.advised = 0  # read ahead up to here


def _skip(buffers: Sequence[memoryview], done: int) -> list[memoryview]:
    """``buffers`` without their first ``done`` bytes (to resume a short read)."""
    out = []
    for buf in buffers:
        if done >= len(buf):
            done -= len(buf)
            continue
        out.append(buf[done:])
        done = 0
    return out
