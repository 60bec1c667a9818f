"""File data of an image, read and hashed ahead of the kernel on worker threads.

A sequential read of a large file arrives as FUSE requests of up to 1 MiB, one
at a time. Hashing 1 MiB (256 SHA-256 calls) takes longer than everything else
the server does for the request, and on one thread the second core idles. So
when a request continues the one before it, the blocks that follow (up to
``AHEAD_BLOCKS``, never past the end of the run the caller names) are read and
hashed by a small pool of threads while the request loop answers this one;
hashlib releases the GIL on each 4 KiB block, so the threads hash in parallel.

What the workers do is pure: ``pread`` into a private buffer, hash each block,
and (encrypted images) open each block with the seals the caller fetched. They
never see the tree and decide nothing: :meth:`Runs.fetch` hands back bytes and
their hashes, and the caller compares those with the verified tree before
serving them, exactly as for a block read on the spot. The bytes served are
the bytes hashed; a block the kernel never asks for is never judged, so a
tampered block still fails exactly the reads that touch it.

Memory is bounded: at most ``AHEAD_BLOCKS`` blocks (plus one request) are held.
"""

from __future__ import annotations

import ctypes
import os
import signal
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, NamedTuple

from occlumfs.merkle.format import BLOCK_SIZE, HASH_SIZE
from occlumfs.merkle.tree import hash_blocks

if TYPE_CHECKING:
    from collections.abc import Callable

    from occlumfs.merkle.crypto import ImageKeys

WORKERS = 2
AHEAD_BLOCKS = 1024  # 4 MiB hashed ahead of a sequential reader
MIN_AHEAD_RUN = 32  # requests of fewer blocks (128 KiB) never start read-ahead
SPLIT_BLOCKS = 64  # a request read on the spot is split in two from here on
_SHORT = "short read"
# glibc malloc: serve blocks below this from the heap, and keep up to this much
# free at its top instead of handing it back to the kernel.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HEAP_KEEP = 32 << 20
HEAP_BLOCK_MAX = 4 << 20


class Piece(NamedTuple):
    """Blocks ``first`` .. ``first + count - 1`` as read: the data served, the hashes of
    the stored bytes, and the index of the first block whose seal failed (or None)."""

    first: int
    count: int
    data: bytes | memoryview
    hashes: bytes
    bad_seal: int | None

    def head(self, count: int) -> Piece:
        return Piece(
            self.first,
            count,
            memoryview(self.data)[: count * BLOCK_SIZE],
            self.hashes[: count * HASH_SIZE],
            self.bad_seal if self.bad_seal is not None and self.bad_seal < count else None,
        )

    def tail(self, count: int) -> Piece:
        bad = self.bad_seal - count if self.bad_seal is not None else None
        return Piece(
            self.first + count,
            self.count - count,
            memoryview(self.data)[count * BLOCK_SIZE :],
            self.hashes[count * HASH_SIZE :],
            bad if bad is not None and bad >= 0 else None,
        )


def read_piece(fd: int, first: int, count: int, keys: ImageKeys | None, seals: bytes) -> Piece:
    """Read, hash and (with ``keys``) open ``count`` blocks from absolute block ``first``.

    Raises OSError on a short read; the caller decides what that means.
    """
    buf = os.pread(fd, count * BLOCK_SIZE, first * BLOCK_SIZE)
    if len(buf) != count * BLOCK_SIZE:
        raise OSError(_SHORT)
    hashes = hash_blocks(buf)
    if keys is None:
        return Piece(first, count, buf, hashes, None)
    plain, bad = keys.open_run(first, buf, seals)
    return Piece(first, count, plain, hashes, bad)


def keep_heap() -> None:
    """Let 1 MiB read buffers be reused instead of mapped afresh for each request.

    By default glibc maps each 1 MiB block on its own, or trims it off the
    heap when freed, so every new buffer takes a page fault per 4 KiB:
    measured, about a quarter of the CPU of a cold sequential read (half the
    pages faulted in; with these settings almost none). Process-wide, and
    bounded: what stays mapped is at most the peak the heap already reached.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_MAX)
    mallopt(_M_TRIM_THRESHOLD, HEAP_KEEP)


def _block_signals() -> None:
    # Stop signals belong to the request loop's thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


class Runs:
    """Pieces of one image file's covered blocks, read on the spot or ahead of time."""

    def __init__(
        self,
        fd: int,
        keys: ImageKeys | None,
        seals: Callable[[int, int], bytes],
        on_short_read: Callable[[int], Exception],
    ) -> None:
        self._fd = fd
        self._keys = keys
        self._seals = seals
        self._on_short_read = on_short_read
        self._pool: ThreadPoolExecutor | None = None  # started on first use (after any fork)
        self._ahead: dict[int, tuple[int, Future | Piece]] = {}
        self._next = -1  # the block after the last request's

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._ahead.clear()

    def _submit(self, first: int, count: int) -> Future:
        if self._pool is None:
            keep_heap()
            self._pool = ThreadPoolExecutor(
                WORKERS, thread_name_prefix="image-hash", initializer=_block_signals
            )
        seals = self._seals(first, count) if self._keys is not None else b""
        return self._pool.submit(read_piece, self._fd, first, count, self._keys, seals)

    def _now(self, first: int, count: int) -> Piece:
        seals = self._seals(first, count) if self._keys is not None else b""
        try:
            return read_piece(self._fd, first, count, self._keys, seals)
        except OSError as exc:
            if exc.args == (_SHORT,):
                raise self._on_short_read(first) from None
            raise

    def _on_the_spot(self, first: int, count: int) -> list[Piece]:
        """Read and hash now; a large request is split between this thread and a worker."""
        if count < SPLIT_BLOCKS:
            return [self._now(first, count)]
        half = count // 2
        later = self._submit(first + half, count - half)
        pieces = [self._now(first, half)]
        pieces.append(self._result(first + half, count - half, later))
        return pieces

    def _result(self, first: int, count: int, job: Future | Piece) -> Piece:
        if isinstance(job, Piece):
            return job
        try:
            return job.result()
        except OSError:
            # Read again here: a failure must belong to this request's blocks only.
            return self._now(first, count)

    def fetch(self, first: int, count: int, ahead_to: int) -> list[Piece]:
        """Consecutive pieces covering ``count`` blocks from ``first`` (not yet verified).

        ``ahead_to`` is the block after the contiguous run this request belongs
        to: read-ahead never goes past it.
        """
        sequential = first == self._next and count >= MIN_AHEAD_RUN
        self._next = end = first + count
        pieces: list[Piece] = []
        at = first
        while at < end and sequential:
            job = self._ahead.pop(at, None)
            if job is None:
                break
            n, pending = job
            piece = self._result(at, n, pending)
            if at + n > end:
                self._ahead[end] = (at + n - end, piece.tail(end - at))
                piece = piece.head(end - at)
            pieces.append(piece)
            at += piece.count
        if at < end:
            pieces += self._on_the_spot(at, end - at)
        if sequential:
            self._plan(end, min(ahead_to, end + AHEAD_BLOCKS), count)
        else:
            self._drop()
        return pieces

    def _plan(self, at: int, horizon: int, size: int) -> None:
        """Keep (or start) jobs covering ``at`` .. ``horizon`` in runs of ``size``."""
        kept: dict[int, tuple[int, Future | Piece]] = {}
        while at < horizon:
            job = self._ahead.pop(at, None)
            if job is None:
                n = min(size, horizon - at)
                try:
                    job = (n, self._submit(at, n))
                except Exception:
                    # Fetching the seals ahead failed (a bad seal-table block):
                    # the request that needs them will fail on its own.
                    break
            kept[at] = job
            at += job[0]
        self._drop()
        self._ahead = kept

    def _drop(self) -> None:
        for _, job in self._ahead.values():
            if isinstance(job, Future):
                job.cancel()
        self._ahead.clear()


def joined(pieces: list[Piece]) -> bytes:
    """The data of consecutive pieces as one ``bytes`` (no copy for one whole piece)."""
    if len(pieces) == 1 and isinstance(pieces[0].data, bytes):
        return pieces[0].data
    return b"".join([p.data for p in pieces])
