"""A build's file data: hashing each source file's blocks, and writing what is
placed into the image, from memory when a worker still holds the bytes it hashed.

Zero blocks are found while hashing (they become holes, never stored), so the
image's data region is only known once every file is hashed. A forked worker
(:mod:`occlumfs.merkle.forkmap`, two rounds) therefore keeps each small file it
read, up to :data:`HOLD_BYTES`, and writes it once the builder has placed it:
one read of each file, and the image written in few large ``pwritev`` calls
rather than a ``copy_file_range`` per file after opening it again (about half
the CPU, docs/performance.md, issue 11). What it does not hold it copies from
the source file, as a build in threads does.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import threading
from collections.abc import Iterator

from occlumfs.errors import OcclumfsError
from occlumfs.merkle.format import BLOCK_SIZE, ZERO_BLOCK
from occlumfs.merkle.source import Content, SourceNode
from occlumfs.merkle.tree import hash_blocks

ZERO_RUN = bytes(64)
SMALL_FILE = 1 << 20
READ = 1 << 20
HOLD_BYTES = 128 << 20  # what one forked worker keeps of the files it hashed
ARENA_CHUNK = 16 << 20
IOV_MAX = 1024

Task = tuple[SourceNode, int, int]  # a file and the byte range [start, end) of it to hash
Runs = list[tuple[int, bytes]]  # (first file block, hashes of the run) per run of data blocks
Segment = tuple[int, int, int]  # (offset in the task's range, length, image offset)


def _data_segments(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Block-aligned [a, b) ranges of [start, end) that may hold data (holes skipped)."""
    if end - start <= SMALL_FILE:
        # Reading a small file whole costs less than asking where its holes
        # are; zero blocks become holes all the same.
        yield start, end
        return
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            if exc.errno == errno.EINVAL:  # no SEEK_DATA here: treat all as data
                yield pos, end
                return
            raise
        if data >= end:
            return
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        a = data - data % BLOCK_SIZE
        b = min(end, -(-hole // BLOCK_SIZE) * BLOCK_SIZE)
        yield max(a, pos), b
        pos = b


_thread_state = threading.local()


def _read_area() -> bytearray:
    """This thread's read buffer: reused, so reading costs no fresh page faults."""
    area = getattr(_thread_state, "area", None)
    if area is None:
        area = _thread_state.area = bytearray(READ)
    return area


def _hash_buffer(buf, got: int, first_block: int, out: list, base: int = 0) -> None:
    """Append (first block, hashes of the run) for each run of non-zero blocks of
    ``buf[base : base + got]`` (a bytearray or an mmap), whose first block is
    file block ``first_block``."""
    mv = memoryview(buf)[base : base + got]
    run_first = first_block
    run: list[bytes] = []
    first_off = 0
    full = got - got % BLOCK_SIZE
    if full and buf.find(ZERO_RUN, base, base + full) < 0:
        # No all-zero block can hide in a buffer without 64 zeros in a row:
        # hash its whole blocks as one run, without copies.
        run.append(hash_blocks(mv[:full]))
        first_off = full
    for off in range(first_off, got, BLOCK_SIZE):
        n = min(BLOCK_SIZE, got - off)
        zeros = ZERO_BLOCK if n == BLOCK_SIZE else ZERO_BLOCK[:n]
        if buf[base + off : base + off + n] == zeros:  # an all-zero block becomes a hole
            if run:
                out.append((run_first, b"".join(run)))
                run = []
            continue
        if not run:
            run_first = first_block + off // BLOCK_SIZE
        h = hashlib.sha256(mv[off : off + n])
        if n < BLOCK_SIZE:
            h.update(ZERO_BLOCK[n:])
        run.append(h.digest())
    if run:
        out.append((run_first, b"".join(run)))


def _hash_chunk(content: Content, start: int, end: int) -> list[tuple[int, bytes]]:
    """Hash logical bytes [start, end) of a file: [(first block, hashes of the run)]."""
    out: list[tuple[int, bytes]] = []
    base = content.offset
    fd = os.open(content.path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        area = _read_area()
        for seg_a, seg_b in _data_segments(fd, base + start, base + end):
            pos = seg_a
            while pos < seg_b:
                want = min(READ, seg_b - pos)
                got = os.preadv(fd, [memoryview(area)[:want]], pos)
                if got != want and pos + got != base + content.size:
                    raise OcclumfsError(f"{os.fsdecode(content.path)}: changed during the build")
                _hash_buffer(area, got, (pos - base) // BLOCK_SIZE, out)
                pos += want
    finally:
        os.close(fd)
    return out


def hash_batch(batch: list[Task]) -> list[Runs]:
    return [_hash_chunk(node.content, start, end) for node, start, end in batch]


def hash_and_hold(batch: list[Task]) -> tuple[list[Runs], tuple[list[Task], list]]:
    """:func:`hash_batch`, keeping the bytes of each small whole file read (for
    :func:`write_held`): (runs of each task, (the batch, its held buffers or None))."""
    results: list[Runs] = []
    held: list[memoryview | None] = []
    for node, start, end in batch:
        content = node.content
        size = content.size
        at = _ARENA.take(size) if start == 0 and end == size <= SMALL_FILE else -1
        if at < 0:
            results.append(_hash_chunk(content, start, end))
            held.append(None)
            continue
        fd = os.open(content.path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            got = os.preadv(fd, [_ARENA.view[at : at + size]], content.offset)
        finally:
            os.close(fd)
        if got != size:
            raise OcclumfsError(f"{os.fsdecode(content.path)}: changed during the build")
        runs: Runs = []
        _hash_buffer(_ARENA.map, got, 0, runs, at)
        results.append(runs)
        # Zeros up to a whole block (the arena is never reused): the file's image blocks.
        held.append(_ARENA.view[at : at + -(-size // BLOCK_SIZE) * BLOCK_SIZE])
    return results, (batch, held)


class _Arena:
    """Where a forked worker keeps the files it hashed, up to :data:`HOLD_BYTES`:
    anonymous mappings of :data:`ARENA_CHUNK` handed out front to back in whole
    blocks, never reused (so the zeros after each file stay zeros).

    Each chunk is populated when mapped: fresh memory faulted in 4 KiB at a time
    cost about as much as writing from memory saved. Huge pages (MADV_HUGEPAGE)
    were cheaper still on a quiet machine, but stalled in compaction on a busy one
    (docs/performance.md, issue 11).
    """

    def __init__(self) -> None:
        self.map: mmap.mmap | None = None  # the current chunk
        self.view = memoryview(b"")
        self.used = 0  # of the current chunk
        self.mapped = 0  # all chunks

    def take(self, size: int) -> int:
        """Where ``size`` bytes may go in the current chunk (a block boundary), or -1
        when the arena is full."""
        padded = -(-size // BLOCK_SIZE) * BLOCK_SIZE
        if self.map is None or self.used + padded > len(self.map):
            chunk = min(ARENA_CHUNK, HOLD_BYTES)
            if padded > chunk or self.mapped + chunk > HOLD_BYTES:
                return -1
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
            self.map = mmap.mmap(-1, chunk, flags=flags)
            self.view = memoryview(self.map)
            self.used = 0
            self.mapped += chunk
        at = self.used
        self.used += padded
        return at


_ARENA = _Arena()  # a forked worker's own (the builder's process never fills it)


def write_held(fd: int, kept: tuple[list[Task], list], plans: list[list[Segment] | None]) -> None:
    """Write one batch's planned segments into the image ``fd``: held files from
    memory, contiguous ones in one ``pwritev``; the others copied from their source.
    Then check that none of the batch's files changed since the scan."""
    batch, held = kept
    out = _Writer(fd)
    for (node, start, _end), buf, segments in zip(batch, held, plans, strict=True):
        if not segments:
            continue  # nothing placed from this task (its content is stored once, elsewhere)
        if buf is None:
            out.flush()
            copy_segments(node.content, start, segments, fd)
            continue
        for off, length, at in segments:
            out.add(buf[off : off + -(-length // BLOCK_SIZE) * BLOCK_SIZE], at)
    out.flush()
    for node, _start, _end in batch:
        check_unchanged(node.content)


def check_unchanged(content: Content) -> None:
    """Raise if a source file's size or times moved since the scan (it changed
    while the build read it)."""
    if content.stamp is not None:
        st = os.lstat(content.path)
        if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != content.stamp:
            raise OcclumfsError(f"{os.fsdecode(content.path)}: changed during the build")


class _Writer:
    """Buffers writing to consecutive image offsets into one ``pwritev``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.iov: list[memoryview] = []
        self.start = self.end = 0

    def add(self, data: memoryview, at: int) -> None:
        if self.iov and (at != self.end or len(self.iov) >= IOV_MAX):
            self.flush()
        if not self.iov:
            self.start = self.end = at
        self.iov.append(data)
        self.end += len(data)

    def flush(self) -> None:
        iov, at = self.iov, self.start
        self.iov = []
        while iov:
            done = os.pwritev(self.fd, iov, at)
            if done <= 0:
                raise OSError(errno.EIO, "short write to the image")
            at += done
            while iov and done >= len(iov[0]):
                done -= len(iov.pop(0))
            if iov and done:
                iov[0] = iov[0][done:]


def copy_segments(content: Content, start: int, segments: list[Segment], fd: int) -> None:
    """Copy segments of file range [start, ...) of ``content`` into the image ``fd``."""
    src = os.open(content.path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        for off, length, at in segments:
            copy_range(src, fd, content.offset + start + off, at, length)
    finally:
        os.close(src)


def copy_range(src: int, dst: int, src_off: int, dst_off: int, length: int) -> None:
    while length > 0:
        try:
            done = os.copy_file_range(src, dst, length, src_off, dst_off)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            done = 0
        if done == 0:
            buf = os.pread(src, min(length, READ), src_off)
            if not buf:
                raise OcclumfsError("a source file shrank during the build")
            done = os.pwrite(dst, buf, dst_off)
        src_off += done
        dst_off += done
        length -= done
