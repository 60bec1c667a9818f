"""Write-behind of sealed SEFS data blocks: a thread writes while requests go on.

:class:`~occlumfs.sefs.blocks.BlockIO` seals (encrypts) buffered blocks into
batches of at most :data:`BATCH_BLOCKS`, each in a ciphertext buffer of its
own, and hands them to :class:`WriteBehind`, whose thread writes them to the
data files in the order handed over (so a block sealed twice lands last with
its newer ciphertext) while the request thread answers the next WRITEs and
seals the next batch. ``os.pwritev`` releases the GIL; sealing does not.

Memory stays bounded: at most :data:`BATCHES` batches are out at a time (a
new one waits for the oldest), and a batch keeps its plaintext only until its
write is done. On a failed write the thread skips every later batch; the
plaintext of each batch not yet confirmed is handed back (:meth:`drain`) to be
buffered again, so nothing is lost and the next write-out retries it (its
map entries already name the slot it was written to, which is never a
committed one).

While batches are out, only the thread writes data files, through a view of
the storage of its own (:meth:`Storage.data_writer`: DiskStorage's descriptor
cache is not shared between threads); the request thread drains before it reads
or changes anything a batch touches.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections import deque
from typing import TYPE_CHECKING

from occlumfs.sefs.storage import Storage

if TYPE_CHECKING:
    from occlumfs.sefs.inode import Inode

_libc = ctypes.CDLL(None)
# glibc keeps freed heap memory (the requests' buffers) unless told: give it back after
# a streak, before a commit allocates its own (the server's peak RSS is the sum).
_trim = getattr(_libc, "malloc_trim", None)  # glibc's

BATCH_BLOCKS = 128  # 512 KiB of plaintext a batch; one pwritev when its blocks are contiguous
BATCHES = 2  # batches out at a time: one being written while the next is sealed


class Batch:
    """Sealed blocks of one inode: their plaintext (kept until written), the ciphertext
    buffer and the writes (data file, host offset, ciphertext pieces)."""

    __slots__ = ("buf", "node", "ok", "plain", "writes")

    def __init__(
        self,
        node: Inode,
        plain: dict,
        buf: bytearray,
        writes: list[tuple[str, int, list[memoryview]]],
    ) -> None:
        self.node = node
        self.plain = plain
        self.buf = buf
        self.writes = writes
        self.ok = False  # written (set by the writer thread)


class WriteBehind:
    """Writes batches in a thread of its own, started with the first batch and stopped
    by :meth:`drain` (a thread never outlives a write-out, nor crosses a fork)."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._held: deque[Batch] = deque()  # handed over, not yet seen done (oldest first)
        self._spare: list[bytearray] = []  # ciphertext buffers free for the next batch
        self._jobs: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[Batch] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self.error: BaseException | None = None  # the first failed write, until drained
        self.held_blocks = 0  # plaintext blocks of the batches held
        self._written: set[str] = set()  # data files written to by batches let go of

    @property
    def active(self) -> bool:
        return bool(self._held)

    def buffer(self, size: int) -> bytearray:
        """A ciphertext buffer of at least ``size`` bytes for the next batch; waits for
        the oldest batch to be written when :data:`BATCHES` are out."""
        while len(self._held) >= BATCHES and self.error is None:
            self._reap(wait=True)
        while self._spare:
            buf = self._spare.pop()
            if len(buf) >= size:
                return buf
        return bytearray(size)

    def release(self, buf: bytearray) -> None:
        """``buf`` is free again (a batch written by the caller itself)."""
        self._spare.append(buf)

    def submit(self, batch: Batch) -> None:
        if self._thread is None or self._pid != os.getpid():
            self._thread = threading.Thread(target=self._run, name="sefs-writer", daemon=True)
            self._pid = os.getpid()
            self._thread.start()
        self._held.append(batch)
        self.held_blocks += len(batch.plain)
        self._jobs.put(batch)

    def reap(self) -> None:
        """Let go of the batches written so far (without waiting)."""
        while self._held and self._reap(wait=False):
            pass

    def _reap(self, wait: bool) -> bool:
        """Let go of the oldest batch once it is written; False if it is not (yet)."""
        if self.error is not None:  # the rest waits for drain()
            return False
        try:
            batch = self._done.get(block=wait)
        except queue.Empty:
            return False
        if not batch.ok:  # failed or skipped: from here on it is drain()'s
            return False
        self._held.popleft()  # batches are done in the order handed over
        self.held_blocks -= len(batch.plain)
        self._note(batch)
        return True

    def drain(self) -> tuple[BaseException | None, set[str], list[Batch]]:
        """Wait for every batch and stop the thread. Returns the first error, the data
        files written to since the last drain, and the batches not written (oldest
        first), whose plaintext must be buffered again."""
        thread, self._thread = self._thread, None
        if thread is not None and self._pid == os.getpid():
            self._jobs.put(None)
            thread.join()
        error, self.error = self.error, None
        failed = [batch for batch in self._held if not batch.ok]
        for batch in self._held:
            if batch.ok:
                self._note(batch)
        self._held.clear()
        self._done = queue.SimpleQueue()
        self.held_blocks = 0
        written, self._written = self._written, set()
        if thread is not None:
            self._spare.clear()  # a streak is over: what it freed goes back to the host
            if _trim is not None:
                _trim(0)
        return error, written, failed

    def _note(self, batch: Batch) -> None:
        """``batch`` was written: its buffer is free, its files are to be made durable."""
        self._spare.append(batch.buf)
        self._written.update(name for name, _, _ in batch.writes)

    def _run(self) -> None:
        writer = self._storage.data_writer()
        try:
            while (batch := self._jobs.get()) is not None:
                if self.error is None:
                    try:
                        for name, offset, pieces in batch.writes:
                            writer.pwritev(name, offset, pieces)
                        batch.ok = True
                    except BaseException as exc:  # handed to the request thread by drain()
                        self.error = exc
                self._done.put(batch)
        finally:
            writer.close()
