"""Data blocks an fsync logged, held in memory until the next commit writes them.

An fsync on a store with a log (version 3 on) makes its changed blocks durable
in the log entry, which carries their ciphertext (docs/formats/sefs.md, "The
log"); replay takes them from there and never from their slot. Writing them
to their data files as well can wait for the commit, whose barrier makes the
data files durable anyway. :class:`HeldWrites` sits between the filesystem's
data I/O (:class:`~occlumfs.sefs.blocks.BlockIO`, the log) and the host storage
and, while :attr:`holding` is set (``SefsFS.sync`` sets it around its write-out),
keeps whole-block writes of data files in memory instead of passing them on:

* a program that fsyncs after every small change (sqlite's rollback journal:
  created, written, fsync'd and deleted in every transaction) then costs one
  host write and ``fdatasync`` of the log per fsync, not also the creation of
  a host data file, its writes and the read back of the ciphertext for the log;
* a block rewritten and fsync'd many times between two commits (a database
  page) is written to its slot once, at the commit.

The commit (``SefsFS.commit``) calls :meth:`write_out` with the data files it
is about to make durable; blocks of files deleted since (no longer among them)
are dropped. Reads of a held block are served from memory, and any later write
of it that reaches the host (from this thread or the write-behind thread)
replaces the held copy, so the host never gets an older version after a newer
one. At most :data:`HELD_MAX_BLOCKS` are held; past that, writes go to the host
as before. The slots written are always uncommitted ones (occlumfs.sefs.blocks),
so holding changes when the host sees the bytes, never which bytes it sees.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence

from occlumfs.sefs.format import BLOCK_SIZE
from occlumfs.sefs.storage import DataWriter, Storage

HELD_MAX_BLOCKS = 256  # 1 MiB of ciphertext at most waits in memory for a commit
DATA_PREFIX = "d/"


class HeldWrites:
    """A storage that holds data-file block writes made while :attr:`holding`."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.holding = False
        self.count = 0  # blocks held
        self._blocks: dict[str, dict[int, bytes]] = {}  # name -> block number -> ciphertext
        self._lock = threading.Lock()  # the write-behind thread drops blocks it overwrites
        self.passed: set[str] = set()  # data files written to the host since the commit

    def __getattr__(self, attr: str):
        return getattr(self.inner, attr)

    def held(self, name: str) -> int:
        """How many blocks of ``name`` are held (for tests and fsck)."""
        return len(self._blocks.get(name, ()))

    # == writing ===========================================================================
    def pwritev(self, name: str, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        if self.holding and name.startswith(DATA_PREFIX) and not offset % BLOCK_SIZE:
            size = sum(map(len, buffers))
            n = size // BLOCK_SIZE
            if size == n * BLOCK_SIZE and self.count + n <= HELD_MAX_BLOCKS:
                self._hold(name, offset // BLOCK_SIZE, b"".join(buffers), n)
                return
        if self._blocks:
            self._drop_range(name, offset, sum(map(len, buffers)))
        self.passed.add(name)
        self.inner.pwritev(name, offset, buffers)

    def _hold(self, name: str, first: int, data: bytes, n: int) -> None:
        with self._lock:
            blocks = self._blocks.setdefault(name, {})
            before = len(blocks)
            for i in range(n):
                blocks[first + i] = data[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
            self.count += len(blocks) - before

    def _drop_range(self, name: str, offset: int, size: int) -> None:
        """A write of ``size`` bytes at ``offset`` goes to the host: the held blocks it
        covers are older, forget them. (Data files are written in whole blocks.)"""
        with self._lock:
            blocks = self._blocks.get(name)
            if not blocks:
                return
            first, end = offset // BLOCK_SIZE, -(-(offset + size) // BLOCK_SIZE)
            for block in [b for b in blocks if first <= b < end]:
                del blocks[block]
                self.count -= 1
            if not blocks:
                del self._blocks[name]

    def data_writer(self) -> DataWriter:
        return _Writer(
            self.inner.data_writer(), self._drop_range, lambda: bool(self._blocks), self.passed
        )

    def write_out(self, keep: Iterable[str]) -> None:
        """Write every held block of the files in ``keep`` to the host (the commit makes
        them durable next); drop those of other files (deleted since)."""
        keep = set(keep)
        with self._lock:
            for name in sorted(self._blocks):
                blocks = self._blocks[name]
                if name in keep:
                    self.passed.add(name)
                    _write_runs(self.inner, name, blocks)
                del self._blocks[name]
                self.count -= len(blocks)

    # == reading ===========================================================================
    def preadv(self, name: str, offset: int, buffers: Sequence[memoryview]) -> int:
        blocks = self._blocks.get(name)
        if not blocks:
            return self.inner.preadv(name, offset, buffers)
        want = sum(map(len, buffers))
        first, end = offset // BLOCK_SIZE, -(-(offset + want) // BLOCK_SIZE)
        inside = [b for b in range(first, end) if b in blocks]
        if len(inside) == end - first and not offset % BLOCK_SIZE:
            if len(buffers) == 1 and not want % BLOCK_SIZE:  # the log's read of what it logs
                view = memoryview(buffers[0]).cast("B")
                for i, block in enumerate(inside):
                    view[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] = blocks[block]
                return want
            got = 0  # all of it is held: the host file may not even exist
        else:
            try:
                got = self.inner.preadv(name, offset, buffers)
            except FileNotFoundError:
                if not inside:
                    raise
                got = 0
        flat = _Flat(buffers)
        for block in inside:
            start = block * BLOCK_SIZE - offset
            data = blocks[block]
            lo = max(0, -start)
            hi = min(BLOCK_SIZE, want - start)
            flat.put(start + lo, memoryview(data)[lo:hi])
            if start + lo <= got:
                got = max(got, start + hi)
        return got

    # == removing ==========================================================================
    def forget(self, names: Iterable[str]) -> None:
        with self._lock:
            for name in names:
                blocks = self._blocks.pop(name, None)
                if blocks:
                    self.count -= len(blocks)

    def unlink(self, name: str) -> None:
        self.forget([name])
        self.inner.unlink(name)

    def discard(self, names: Sequence[str]) -> None:
        self.forget(names)
        self.inner.discard(names)


class _Writer(DataWriter):
    """The write-behind thread's writer: what it writes replaces held blocks."""

    def __init__(
        self,
        inner: DataWriter,
        drop: Callable[[str, int, int], None],
        any_held: Callable[[], bool],
        passed: set[str],
    ) -> None:
        self._inner = inner
        self._drop = drop
        self._any_held = any_held
        self._passed = passed

    def pwritev(self, name: str, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        if self._any_held():
            self._drop(name, offset, sum(map(len, buffers)))
        self._passed.add(name)
        self._inner.pwritev(name, offset, buffers)

    def close(self) -> None:
        self._inner.close()


class _Flat:
    """Writes into a sequence of buffers as if they were one."""

    def __init__(self, buffers: Sequence[memoryview]) -> None:
        self._bufs = [memoryview(b).cast("B") for b in buffers]
        self._starts = []
        pos = 0
        for buf in self._bufs:
            self._starts.append(pos)
            pos += len(buf)

    def put(self, at: int, data: memoryview) -> None:
        for buf, start in zip(self._bufs, self._starts, strict=True):
            if not data:
                break
            if at >= start + len(buf):
                continue
            take = min(len(data), start + len(buf) - at)
            buf[at - start : at - start + take] = data[:take]
            data = data[take:]
            at += take


def _write_runs(storage: Storage, name: str, blocks: dict[int, bytes]) -> None:
    """Write ``blocks`` of ``name``, one pwritev per run of consecutive block numbers."""
    run: list[bytes] = []
    start = prev = -2
    for block in sorted(blocks):
        if block != prev + 1 and run:
            storage.pwritev(name, start * BLOCK_SIZE, run)
            run = []
        if not run:
            start = block
        run.append(blocks[block])
        prev = block
    if run:
        storage.pwritev(name, start * BLOCK_SIZE, run)
