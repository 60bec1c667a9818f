"""Host storage that SEFS writes through: real files, or a power-loss simulator for tests.

Names are ``/``-separated paths relative to the SEFS directory (``head``,
``m/0000000000000001.pack``, ``d/0000000000000002``). The filesystem only uses
the operations below, so a crash can be simulated by a storage that keeps
what was made durable (by ``fsync``/``fsync_dir``) apart from what was not.
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
from dataclasses import dataclass, field
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)


class Storage:
    """The contract; every method may raise OSError like the host would."""

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def pread(self, name: str, offset: int, size: int) -> bytes:
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

    def fsync(self, name: str) -> None:
        raise NotImplementedError

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

    def statvfs(self) -> os.statvfs_result | None:
        return None

    def close(self) -> None:
        pass


class DiskStorage(Storage):
    """Files under a host directory, with a bounded cache of open descriptors.

    Many files are made durable with one ``syncfs`` rather than an fsync each,
    and discarded files are unlinked by a background thread: on a journaling
    host an unlink costs about a millisecond, which ``rm -rf`` would otherwise
    pay inside each request.
    """

    MAX_FDS = 64
    SYNCFS_ABOVE = 8  # files; beyond this one syncfs is cheaper than an fsync each

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._reaper: threading.Thread | None = None
        self._reaper_pid = 0
        self._doomed: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _fd(self, name: str, create: bool) -> int:
        fd = self._fds.get(name)
        if fd is not None:
            self._fds.move_to_end(name)
            return fd
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            fd = os.open(self._path(name), flags, 0o600)
        except PermissionError:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_CLOEXEC)
        self._fds[name] = fd
        while len(self._fds) > self.MAX_FDS:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def _forget(self, name: str) -> None:
        fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def read(self, name: str) -> bytes:
        with open(self._path(name), "rb") as f:
            return f.read()

    def pread(self, name: str, offset: int, size: int) -> bytes:
        return os.pread(self._fd(name, False), size, offset)

    def preadv(self, name: str, offset: int, buffers: Sequence[memoryview]) -> int:
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fd(name, False)
        else:
            self._fds.move_to_end(name)
        total = os.preadv(fd, buffers, offset)
        want = len(buffers[0]) if len(buffers) == 1 else sum(map(len, buffers))
        while 0 < total < want:  # a short read that is not EOF: resume it
            n = os.preadv(fd, _skip(buffers, total), offset + total)
            if n == 0:
                break
            total += n
        return total

    def pwritev(self, name: str, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        fd = self._fd(name, True)
        want = sum(len(b) for b in buffers)
        done = os.pwritev(fd, buffers, offset)
        if done != want:  # short writes only happen on a full disk
            joined = b"".join(bytes(b) for b in buffers)
            while done < want:
                n = os.pwrite(fd, joined[done:], offset + done)
                if n == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += n

    def write_file(self, name: str, data: bytes) -> None:
        self._forget(name)
        fd = os.open(self._path(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def fsync(self, name: str) -> None:
        fd = self._fds.get(name)
        if fd is not None:
            os.fsync(fd)
            return
        fd = os.open(self._path(name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def fsync_dir(self, name: str) -> None:
        fd = os.open(self._path(name) if name else self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        self._forget(src)
        self._forget(dst)
        os.rename(self._path(src), self._path(dst))

    def unlink(self, name: str) -> None:
        self._forget(name)
        os.unlink(self._path(name))

    def listdir(self, name: str) -> list[str]:
        return os.listdir(self._path(name) if name else self.root)

    def exists(self, name: str) -> bool:
        return os.path.exists(self._path(name))

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.root)

    def sync(self, names: Sequence[str]) -> None:
        if len(names) <= self.SYNCFS_ABOVE:
            super().sync(names)
            return
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), str(self.root))
        finally:
            os.close(fd)

    def discard(self, names: Sequence[str]) -> None:
        if not names:
            return
        for name in names:
            self._forget(name)
        # Threads do not survive the mount's fork: start one in whoever discards.
        if self._reaper is None or self._reaper_pid != os.getpid():
            self._doomed = queue.SimpleQueue()
            self._reaper = threading.Thread(target=self._reap, name="sefs-reaper", daemon=True)
            self._reaper_pid = os.getpid()
            self._reaper.start()
        for name in names:
            self._doomed.put(name)

    def _reap(self) -> None:
        while (name := self._doomed.get()) is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(name))

    def close(self) -> None:
        if self._reaper is not None and self._reaper_pid == os.getpid():
            self._doomed.put(None)
            self._reaper.join()
            self._reaper = None
        while self._fds:
            _, fd = self._fds.popitem()
            os.close(fd)


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


@dataclass
class _SimFile:
    data: bytearray = field(default_factory=bytearray)
    durable: bytes = b""


class PowerCut(Exception):
    """The simulated machine lost power in the middle of an operation."""


class PowerLossStorage(Storage):
    """In memory, with a power switch: ``power_loss()`` forgets every write and every
    directory change that was not fsync'd, as a disk losing its write cache would.

    ``cut_power_after(n)`` lets ``n`` more changing operations through and fails
    every one after, so a crash can be placed anywhere, mid-commit included.
    """

    def __init__(self) -> None:
        self._names: dict[str, dict[str, _SimFile]] = {"": {}}
        self._durable_names: dict[str, dict[str, _SimFile]] = {"": {}}
        self.fsyncs = 0
        self.changes = 0  # changing operations so far
        self._budget: int | None = None

    def cut_power_after(self, n: int | None) -> None:
        self._budget = n

    def _change(self) -> None:
        if self._budget is not None:
            if self._budget <= 0:
                raise PowerCut("power cut")
            self._budget -= 1
        self.changes += 1

    @staticmethod
    def _split(name: str) -> tuple[str, str]:
        parent, _, base = name.rpartition("/")
        return parent, base

    def _file(self, name: str) -> _SimFile:
        parent, base = self._split(name)
        try:
            return self._names[parent][base]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name) from None

    def mkdir(self, name: str) -> None:
        self._names.setdefault(name, {})
        self._durable_names.setdefault(name, {})

    def read(self, name: str) -> bytes:
        return bytes(self._file(name).data)

    def pread(self, name: str, offset: int, size: int) -> bytes:
        return bytes(self._file(name).data[offset : offset + size])

    def preadv(self, name: str, offset: int, buffers: Sequence[memoryview]) -> int:
        data = self._file(name).data
        total = 0
        for buf in buffers:
            piece = data[offset + total : offset + total + len(buf)]
            buf[: len(piece)] = piece
            total += len(piece)
            if len(piece) < len(buf):
                break
        return total

    def pwritev(self, name: str, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        self._change()
        parent, base = self._split(name)
        f = self._names[parent].setdefault(base, _SimFile())
        data = b"".join(bytes(b) for b in buffers)
        if len(f.data) < offset:
            f.data.extend(bytes(offset - len(f.data)))
        f.data[offset : offset + len(data)] = data

    def write_file(self, name: str, data: bytes) -> None:
        self._change()
        parent, base = self._split(name)
        f = self._names[parent].setdefault(base, _SimFile())
        f.data[:] = data

    def fsync(self, name: str) -> None:
        self._change()
        f = self._file(name)
        f.durable = bytes(f.data)
        self.fsyncs += 1

    def fsync_dir(self, name: str) -> None:
        self._change()
        self._durable_names[name] = dict(self._names[name])
        self.fsyncs += 1

    def rename(self, src: str, dst: str) -> None:
        self._change()
        sp, sb = self._split(src)
        dp, db = self._split(dst)
        self._names[dp][db] = self._names[sp].pop(sb)

    def unlink(self, name: str) -> None:
        self._change()
        parent, base = self._split(name)
        self._file(name)
        del self._names[parent][base]

    def listdir(self, name: str) -> list[str]:
        return list(self._names[name])

    def exists(self, name: str) -> bool:
        parent, base = self._split(name)
        return base in self._names.get(parent, {})

    def power_loss(self) -> None:
        self._budget = None
        self._names = {d: dict(names) for d, names in self._durable_names.items()}
        for names in self._names.values():
            for f in names.values():
                f.data = bytearray(f.durable)

    def files(self) -> dict[str, bytes]:
        """Every file's current contents, by name (for tests that tamper)."""
        return {
            (f"{d}/{n}" if d else n): bytes(f.data)
            for d, names in self._names.items()
            for n, f in names.items()
        }
