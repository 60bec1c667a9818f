"""Worker processes that read and hash windows of an image into shared memory.

Why processes: verifying a sequential read is SHA-256 of every 4 KiB leaf,
~0.65 ms a MiB on one core, and Python threads hashing 4 KiB buffers reach
only ~1.2 cores (each hash is too short for the GIL hand-off it releases;
docs/performance.md, issue 11). A worker process has its own interpreter.

How: the reader (:class:`ReadAhead`) owns a shared mapping (a memfd) cut into
slots of one window (``WINDOW_BLOCKS`` blocks plus their hashes). It asks for
"window at image block B, N blocks, into slot S" on a pipe all workers read
from (each ask is read whole by one of them: whichever is free); the
worker ``preadv``\\ s the blocks into the slot (with ``O_DIRECT`` where the
image's filesystem allows it: the page cache would only hold a second copy),
hashes each leaf, writes the hashes beside it and answers "slot S done". The
server compares those hashes with the verified tree and serves the bytes from
the same slot, so the bytes served are the bytes hashed; the FUSE reply is
written straight from the slot (a borrowed view, :meth:`ReadAhead.read`). While
one window is answered the workers fill the next ones (up to ``DEPTH`` windows
ahead, within the extent being read).

Anything unexpected (a short read, a mismatch, a dead worker) makes the server
read and verify that request itself, as without workers: errors and their
messages come from one place, and a worker never decides what is served.

Lifetime: workers are started (fresh interpreters running
:mod:`occlumfs.merkle.hashworker`, so a threaded caller can start them too)
once one sequential stream has read ``START_BLOCKS`` (32 MiB), never on a
one-core machine: a program's start reads its binary and libraries (a few MB
each) cold, and starting two interpreters beside it cost more than hashing
them here (issue 11: a cold ``occlum run python3``, 289 vs 319 ms). Nothing
waits for them to come up: each says "ready" first, and until all have, the
request thread goes on verifying in place. They hold only the image, the
memfd and the two pipes they share; they exit when the ask pipe reaches end of
file (the reader closed it, or its process died: no other process holds that end),
and :meth:`ReadAhead.close` (the image's close, at unmount) kills and reaps them.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import select
import subprocess
import sys
from collections import deque
from pathlib import Path

from occlumfs.errors import FSError
from occlumfs.hostio import willneed
from occlumfs.merkle.blocks import READ_AHEAD_MIN
from occlumfs.merkle.format import BLOCK_SIZE, HASH_SIZE
from occlumfs.merkle.hashworker import ASK, DONE, READY

log = logging.getLogger("occlumfs.merkle")

WINDOW_BLOCKS = 512  # 2 MiB: two of the kernel's 1 MiB requests per hand-off to a worker
DEPTH = 8  # windows in flight or ready ahead of the reader (16 MiB)
ADVISE_BLOCKS = 4096  # and the disk asked for 16 MiB more (page cache, not slots)
MIN_REQUEST_BLOCKS = READ_AHEAD_MIN  # smaller requests are verified in place
MAX_REQUEST_BLOCKS = 2 * WINDOW_BLOCKS  # and so are larger ones (not a kernel's request)
START_BLOCKS = 8192  # 32 MiB read in one sequential stream before the workers start
_SLOT_BYTES = WINDOW_BLOCKS * BLOCK_SIZE
_HASHES_BASE = DEPTH * _SLOT_BYTES
_WORKER_SCRIPT = Path(__file__).with_name("hashworker.py")


def _worker_count() -> int:
    """Workers to start: none on one core, where they could only add hand-offs, else
    four: with direct reads a worker waits for the disk about as long as it hashes,
    so two a core keep two cores hashing while the next windows are read."""
    cores = len(os.sched_getaffinity(0))
    return 0 if cores < 2 else 4


class _Window:
    __slots__ = ("count", "first", "slot", "state")

    def __init__(self, first: int, count: int, slot: int) -> None:
        self.first = first
        self.count = count
        self.slot = slot
        self.state = "pending"  # then "ok" or "failed"

    @property
    def end(self) -> int:
        return self.first + self.count


class ReadAhead:
    """Sequential reads of one image, read ahead and hashed by worker processes."""

    def __init__(self, fd: int, workers: int | None = None) -> None:
        self.fd = fd
        self.workers = _worker_count() if workers is None else workers
        self._area: mmap.mmap | None = None
        self._view = memoryview(b"")  # of self._area once started
        self._workers: list[subprocess.Popen] = []
        # One ask pipe all workers take from (whoever is free takes the next
        # window: a worker slowed by the disk or by losing its CPU holds up only
        # the window it has), one answer pipe, and a pidfd per worker (poll
        # shows one that exited: it may have taken an ask it will never answer).
        self._ask = -1
        self._answer = -1
        self._pidfds: list[int] = []
        self._chain: deque[_Window] = deque()  # contiguous, ascending, from the reader's position
        self._out: dict[int, _Window] = {}  # slot -> window a worker still works on
        self._free: list[int] = list(range(DEPTH))
        self._last_end = -1
        self._advised = -1  # blocks up to here were advised (WILLNEED)
        self._run = 0  # blocks read by the current sequential stream
        self._ready = 0  # workers that said they are up (the first ones of self._workers)
        self.direct = False  # the workers read the image with O_DIRECT
        self.broken = False  # set once a worker is gone; reads then verify in place
        self.served_blocks = 0  # blocks answered from the workers' windows

    # -- the request side ---------------------------------------------------------------------
    def read(
        self, first: int, count: int, limit: int, expected, borrow: bool = False
    ) -> bytes | memoryview | None:
        """Verified bytes of blocks [first, first + count), or None: read them in place.

        ``limit`` is the end of the contiguous run (extent) the blocks belong to;
        ``expected(first, count)`` gives their level-0 hashes from the verified tree.
        With ``borrow``, bytes that lie in one window come as a view of its slot,
        not a copy: valid only until the next call (which may hand the slot to a
        worker again), so only for a caller that is done with them by then.
        """
        sequential = first == self._last_end
        self._last_end = first + count
        self._run = self._run + count if sequential else count
        if self.broken or not MIN_REQUEST_BLOCKS <= count <= MAX_REQUEST_BLOCKS:
            return None
        try:
            if self._area is None:
                if self._run >= START_BLOCKS and self.workers:
                    self._start()  # and this request is verified in place: they are not up yet
                return None
            if self._ready < len(self._workers) and not self._poll_ready(0):
                return None  # still starting: never wait for them
            while self._chain and self._chain[0].end <= first:
                self._release(self._chain.popleft())
            if self._chain and not self._chain[0].first <= first:
                self._drop_chain()
            if not self._chain and not sequential:
                return None
            self._top_up(first, limit)
            return self._serve(first, count, expected, borrow)
        except FSError:
            raise  # from the tree (expected): the image's fault, not the workers'
        except OSError as exc:
            self._break(f"read-ahead workers failed ({exc}); verifying on the request thread")
            return None

    def _top_up(self, first: int, limit: int) -> None:
        """Keep up to DEPTH windows asked for, from ``first`` (or the chain's end) to ``limit``."""
        at = self._chain[-1].end if self._chain else first
        if not at <= self._advised <= limit:  # a jump, or another extent
            self._advised = at
        # Start the disk on the windows before asking for them (a worker's pread
        # would only ask when it gets there), then ADVISE_BLOCKS past them: a
        # busy disk needs more in flight than the slots hold.
        self._advise(min(limit, at + len(self._free) * WINDOW_BLOCKS))
        while at < limit and self._free:
            window = _Window(at, min(WINDOW_BLOCKS, limit - at), self._free.pop())
            os.write(self._ask, ASK.pack(window.slot, window.first, window.count))
            self._out[window.slot] = window
            self._chain.append(window)
            at = window.end
        self._advise(min(limit, at + ADVISE_BLOCKS))

    def _advise(self, end: int) -> None:
        """POSIX_FADV_WILLNEED on the blocks from the last advised up to ``end``."""
        if self.direct:
            return  # direct reads skip the page cache: filling it would be waste
        while self._advised < end:
            n = min(WINDOW_BLOCKS, end - self._advised)
            with contextlib.suppress(OSError):
                willneed(self.fd, self._advised * BLOCK_SIZE, n * BLOCK_SIZE)
            self._advised += n

    def _serve(self, first: int, count: int, expected, borrow: bool) -> bytes | memoryview | None:
        end = first + count
        pieces = []
        at = first
        for window in self._chain:
            if at >= end:
                break
            if window.first > at:
                break
            self._wait(window)
            if window.state != "ok":
                self._drop_chain()
                return None
            stop = min(end, window.end)
            base = _HASHES_BASE + window.slot * WINDOW_BLOCKS * HASH_SIZE
            lo = base + (at - window.first) * HASH_SIZE
            if self._area[lo : lo + (stop - at) * HASH_SIZE] != expected(at, stop - at):
                self._drop_chain()  # the caller re-reads in place and names the bad block
                return None
            base = window.slot * _SLOT_BYTES
            lo = base + (at - window.first) * BLOCK_SIZE
            pieces.append(self._view[lo : base + (stop - window.first) * BLOCK_SIZE])
            at = stop
        if at < end:
            return None
        self.served_blocks += count
        if len(pieces) == 1:
            return pieces[0] if borrow else bytes(pieces[0])
        return b"".join(pieces)

    def _poll_ready(self, timeout: float | None) -> bool:
        """Whether every worker has said it is up, waiting at most ``timeout`` s."""
        while self._ready < len(self._workers):
            if not self._answers_waiting(timeout):
                return False
            got = os.read(self._answer, DONE.size * len(self._workers))
            # Each says READY before it takes an ask, and nothing is asked before all have.
            if not got or got != READY * (len(got) // DONE.size):
                raise OSError("a worker failed to start")
            self._ready += len(got) // DONE.size
        return True

    def _answers_waiting(self, timeout: float | None) -> bool:
        """Whether answers wait in the pipe (within ``timeout`` s; None: no limit),
        OSError once a worker has exited."""
        poller = select.poll()  # not select(): the server may hold descriptors past 1024
        poller.register(self._answer, select.POLLIN)
        for pidfd in self._pidfds:
            poller.register(pidfd, select.POLLIN)
        events = poller.poll(None if timeout is None else int(timeout * 1000))
        for fd, _ in events:
            if fd != self._answer:
                raise OSError(f"worker {self.pids[self._pidfds.index(fd)]} exited")
        return bool(events)

    def wait_ready(self) -> bool:
        """Wait until the started workers are up (tests); False if none were started."""
        try:
            return bool(self._workers) and self._poll_ready(None)
        except OSError as exc:
            self._break(f"read-ahead workers failed ({exc}); verifying on the request thread")
            return False

    def _wait(self, window: _Window) -> None:
        while window.state == "pending":
            self._answers_waiting(None)
            got = os.read(self._answer, DONE.size * DEPTH)
            if not got:
                raise OSError("the workers exited")
            # Answers are a few bytes, written whole: never split across reads.
            for slot, ok in DONE.iter_unpack(got):
                self._out.pop(slot).state = "ok" if ok else "failed"

    def _release(self, window: _Window) -> None:
        """Give a window's slot back; one still being filled is waited for (a few ms at
        most), so that every slot is free or in the chain between requests."""
        self._wait(window)
        self._free.append(window.slot)

    def _drop_chain(self) -> None:
        while self._chain:
            self._release(self._chain.popleft())

    def _break(self, message: str) -> None:
        if not self.broken:
            log.warning("%s", message)
        self.broken = True
        self._chain.clear()
        self._stop()

    # -- the workers ----------------------------------------------------------------------------
    def _start(self) -> None:
        size = DEPTH * (_SLOT_BYTES + WINDOW_BLOCKS * HASH_SIZE)
        area_fd = os.memfd_create("occlumfs-read-ahead", os.MFD_CLOEXEC)
        try:
            os.ftruncate(area_fd, size)
            self._area = mmap.mmap(area_fd, size)
            self._view = memoryview(self._area)
            image_fd = self._direct_fd()
            try:
                self._spawn(image_fd, area_fd)
            finally:
                if image_fd != self.fd:
                    os.close(image_fd)
        finally:
            os.close(area_fd)
        log.debug("read-ahead: hashing workers %s, direct I/O %s", self.pids, self.direct)

    def _direct_fd(self) -> int:
        """The image opened for direct I/O, if its filesystem can, or else ``self.fd``.

        The workers read windows that nobody reads twice into the slots: through
        the page cache, each block cost the disk's copy into a cache page, a copy
        out of it into the slot, and the page's allocation (the WILLNEED advice
        that started the disk early: ~0.2 s of the request thread a GiB). Direct
        reads land in the slot and leave the cache alone.
        """
        try:
            fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            return self.fd
        try:
            # Some filesystems accept the flag and refuse the reads: try one.
            ok = os.preadv(fd, [self._view[:BLOCK_SIZE]], 0) == BLOCK_SIZE
        except OSError:
            ok = False
        if not ok:
            os.close(fd)
            return self.fd
        self.direct = True
        return fd

    def _spawn(self, image_fd: int, area_fd: int) -> None:
        ask_r, self._ask = os.pipe2(os.O_CLOEXEC)
        self._answer, answer_w = os.pipe2(os.O_CLOEXEC)
        try:
            # Fresh interpreters (not forks): safe from a threaded caller, and
            # they hold only these four descriptors, never /dev/fuse.
            args = (image_fd, area_fd, ask_r, answer_w, BLOCK_SIZE, _SLOT_BYTES, _HASHES_BASE)
            for _ in range(self.workers):
                worker = subprocess.Popen(
                    [sys.executable, "-I", "-S", str(_WORKER_SCRIPT), *map(str, args)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    pass_fds=(image_fd, area_fd, ask_r, answer_w),
                )
                self._workers.append(worker)
                self._pidfds.append(os.pidfd_open(worker.pid))
        finally:
            os.close(ask_r)
            os.close(answer_w)

    def _stop(self) -> None:
        """Close the pipes (workers exit on their end of file), then reap the workers."""
        for fd in [self._ask, self._answer, *self._pidfds]:
            if fd >= 0:
                os.close(fd)
        self._ask = self._answer = -1
        self._pidfds = []
        for worker in self._workers:
            # A worker may be in the middle of a window: it has nothing to save.
            worker.kill()
            worker.wait()
        self._workers = []
        self._ready = 0
        self._out.clear()

    def close(self) -> None:
        self._stop()
        if self._area is not None:
            self._view.release()
            self._view = memoryview(b"")
            # A borrowed view still held somewhere keeps the mapping alive until
            # it goes; closing it under that view would raise.
            with contextlib.suppress(BufferError):
                self._area.close()
            self._area = None

    @property
    def pids(self) -> list[int]:
        return [worker.pid for worker in self._workers]
