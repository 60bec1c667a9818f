"""A build's file data: hashing each source file's blocks, and copying what is
placed into the image.

Zero blocks are found while hashing (they become holes, never stored), so the
image's data region is only known once every file is hashed. A forked worker
(:mod:`occlumfs.merkle.forkmap`, two rounds) hashes its batches, and once the
builder has placed them copies the same batches into the image and checks that
none of their files changed meanwhile, while the builder writes the metadata and
the tree. (Threads copied no faster than one: each file's open and close holds
the GIL. Two processes do not copy twice as fast either: the kernel serialises
buffered writes to one file.) The copy reads into a buffer and writes runs of
consecutive image offsets with one ``pwrite`` each (:class:`Gatherer`).

Keeping each file's bytes from the hashing to write them from memory was tried
and did not pay: fresh memory costs a page fault (or a populate) per 4 KiB,
about what reading the file again saves (docs/performance.md, issue 11).
"""

from __future__ import annotations

import _thread  # threading.local's own type, without loading threading
import errno
import hashlib
import os
import stat
from collections.abc import Iterator

from occlumfs.errors import OcclumfsError
from occlumfs.merkle.format import BLOCK_SIZE, HASH_SIZE, ZERO_BLOCK
from occlumfs.merkle.source import Content, SourceNode
from occlumfs.merkle.tree import hash_blocks

ZERO_HASH = hashlib.sha256(ZERO_BLOCK).digest()  # the hash of an all-zero block
_ZEROS = memoryview(ZERO_BLOCK)  # sliced without a copy, for a file's last block
SMALL_FILE = 1 << 20
READ = 1 << 20  # bytes read from a source file at a time (hashing)
GATHER = READ  # bytes written to the image per pwrite at most (as fast as 2 MiB)
# Source files a forked worker keeps open from hashing to copying (one open and
# close less a file), at most half of what the process may open.
KEEP_OPEN = max(0, os.sysconf("SC_OPEN_MAX") // 2 - 64)
_kept_count = [0]  # kept open in this process

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


_thread_state = _thread._local()


def _area() -> bytearray:
    """This thread's buffer, for hashing (:func:`_hash_chunk`) and for copying
    (:class:`Gatherer`), which never run at once in one thread: reused, and one
    buffer, because fresh memory costs a page fault per 4 KiB (here ~2 us each:
    1.5 ms of a worker's start when it had a read and a write buffer of 3 MiB)."""
    area = getattr(_thread_state, "area", None)
    if area is None:
        area = _thread_state.area = bytearray(max(READ, GATHER))
    return area


def _hash_buffer(buf: bytearray, got: int, first_block: int, out: list) -> None:
    """Append (first block, hashes of the run) for each run of non-zero blocks of
    ``buf[:got]``, whose first block is file block ``first_block``.

    ``buf`` must have room up to the block boundary after ``got``: a short last
    block is padded with zeros there, as it is stored, and every block is hashed
    by one :func:`hash_blocks` call. An all-zero block (a hole in the image) is
    the block whose hash is :data:`ZERO_HASH`: finding it among the hashes reads
    1/128 of what searching the bytes for zeros did (~5 ms of a stdlib build,
    and the per-block Python of each file's last block, ~4 ms more)."""
    end = -(-got // BLOCK_SIZE) * BLOCK_SIZE
    if end > got:
        buf[got:end] = _ZEROS[: end - got]
    hashes = hash_blocks(memoryview(buf)[:end])
    found = hashes.find(ZERO_HASH)
    if found < 0:
        if hashes:
            out.append((first_block, hashes))
        return
    start = 0  # of the current run of non-zero blocks, in bytes of ``hashes``
    for at in range(found - found % HASH_SIZE, len(hashes), HASH_SIZE):
        if hashes[at : at + HASH_SIZE] == ZERO_HASH:
            if at > start:
                out.append((first_block + start // HASH_SIZE, hashes[start:at]))
            start = at + HASH_SIZE
    if start < len(hashes):
        out.append((first_block + start // HASH_SIZE, hashes[start:]))


def _hash_chunk(
    content: Content, start: int, end: int, kept: list[int] | None = None
) -> list[tuple[int, bytes]]:
    """Hash logical bytes [start, end) of a file: [(first block, hashes of the run)].

    With ``kept``, the open source file is appended to it instead of closed
    while the process may keep more (the copy reads from it later).
    """
    out: list[tuple[int, bytes]] = []
    base = content.offset
    fd = open_source(content.path)
    keep = False
    try:
        area = _area()
        for seg_a, seg_b in _data_segments(fd, base + start, base + end):
            pos = seg_a
            while pos < seg_b:
                want = min(READ, seg_b - pos)
                got = os.preadv(fd, [memoryview(area)[:want]], pos)
                if got != want and got:  # short: the rest, or the error that cut it
                    got += read_fully(fd, memoryview(area)[got:want], pos + got, content.path)
                if got != want and pos + got != base + content.size:
                    raise _changed(content.path)
                _hash_buffer(area, got, (pos - base) // BLOCK_SIZE, out)
                pos += want
        keep = kept is not None and _kept_count[0] < KEEP_OPEN
    except OSError as exc:
        raise source_error(exc, content.path) from None
    finally:
        if keep:
            kept.append(fd)
            _kept_count[0] += 1
        else:
            os.close(fd)
    if kept is not None and not keep:
        kept.append(-1)
    return out


def open_source(path: bytes) -> int:
    """Open the regular file the scan found at ``path``, for reading.

    Whatever was put there since is never followed (a symlink) nor waited on (a
    FIFO, whose open would wait for a writer for ever): reading a FIFO or a
    directory then fails, and :func:`source_error` calls that a change, as the
    check of each file's size and times after reading it calls any other.
    (Checking the type here with fstat cost ~5 % of a build of small files.)"""
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink now
            raise _changed(path) from None
        raise


def _changed(path: bytes) -> OcclumfsError:
    return OcclumfsError(f"{os.fsdecode(path)}: changed during the build")


def source_error(exc: OSError, path: bytes) -> Exception:
    """What to raise for ``exc``, an error reading source file ``path``: a change
    when the file is no longer one (ESPIPE: a FIFO; EISDIR: a directory), else
    ``exc`` naming the file when it names nothing (an error of a read or seek on
    an open file), or the build's report of it would name the image."""
    if exc.errno in (errno.ESPIPE, errno.EISDIR):
        return _changed(path)
    if exc.filename is None:
        exc.filename = os.fsdecode(path)
    return exc


def read_fully(fd: int, buf: memoryview, pos: int, path: bytes) -> int:
    """Read ``len(buf)`` bytes of ``fd`` at ``pos`` into ``buf``: fewer only at end
    of file. A read that stops short (a FUSE file's bad block: the bytes before
    it) is continued, so the read error itself is raised, naming ``path``, not
    taken for a file that shrank."""
    got = 0
    try:
        while got < len(buf):
            n = os.preadv(fd, [buf[got:]], pos + got)
            if n == 0:
                break
            got += n
    except OSError as exc:
        raise source_error(exc, path) from None
    return got


def hash_batch(batch: list[Task]) -> list[Runs]:
    return [_hash_chunk(node.content, start, end) for node, start, end in batch]


def hash_and_keep(batch: list[Task]) -> tuple[list[Runs], tuple[list[Task], list[int]]]:
    """:func:`hash_batch` for fork_map's first round: the runs, and what the second
    (:func:`write_batch`) needs: the batch and its source files, kept open (-1:
    closed, past the process's share of descriptors)."""
    fds: list[int] = []
    return [_hash_chunk(node.content, start, end, fds) for node, start, end in batch], (
        batch,
        fds,
    )


def hash_payload(payload: list[tuple]) -> tuple[list[Runs], tuple[list[Task], list[int]]]:
    """:func:`hash_and_keep` of a batch sent as data: (path, offset, size, stamp,
    start, end) per task."""
    batch = [
        (SourceNode(stat.S_IFREG, content=Content(path, offset, size, stamp)), start, end)
        for path, offset, size, stamp, start, end in payload
    ]
    return hash_and_keep(batch)


def write_batch(
    fd: int, kept: tuple[list[Task], list[int]], plan: tuple[int, list[list[Segment] | None]]
) -> None:
    """Copy one batch's planned segments (their image offsets counted from
    ``plan[0]``) into the image ``fd`` from their source files, then check that
    none of the batch's files changed since the scan."""
    batch, fds = kept
    base, plans = plan
    out = Gatherer(fd)
    try:
        for (node, start, _end), src, segments in zip(batch, fds, plans, strict=True):
            if segments:  # else its content is stored once, from another file
                out.copy(node.content, start, segments, src, base)
        out.flush()
        for (node, _start, _end), src in zip(batch, fds, strict=True):
            check_unchanged(node.content, src)
    finally:
        for src in fds:
            if src >= 0:
                os.close(src)


# Filesystems whose fallocate(2) allocates extents (glibc's posix_fallocate
# elsewhere writes a byte into every block: slow, and on a FUSE mount one
# request a block).
_FALLOCATE_FS = frozenset([b"ext4", b"xfs", b"btrfs", b"tmpfs", b"f2fs"])


def reserve(fd: int, size: int) -> None:
    """Make the image file ``size`` bytes long, its blocks allocated up front
    where the filesystem can (fallocate): the data's buffered writes then skip
    the delayed-allocation reservation of each page (the stdlib's 100 MiB on
    ext4: 41 -> 34 ms of CPU). Every byte is written all the same; a block never
    written reads as zeros either way. Elsewhere: ``ftruncate``, a sparse file."""
    os.ftruncate(fd, size)
    if size and _filesystem_type(fd) in _FALLOCATE_FS:
        os.posix_fallocate(fd, 0, size)


def _filesystem_type(fd: int) -> bytes | None:
    """The type of the filesystem holding ``fd`` (``/proc/self/mountinfo``), or None."""
    st = os.fstat(fd)
    device = b"%d:%d" % (os.major(st.st_dev), os.minor(st.st_dev))
    try:
        with open("/proc/self/mountinfo", "rb") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 2 and fields[2] == device and b"-" in fields:
                    at = fields.index(b"-")
                    return fields[at + 1] if at + 1 < len(fields) else None
    except OSError:
        pass
    return None


def check_unchanged(content: Content, src: int = -1) -> None:
    """Raise if a source file's size or times moved since the scan (it changed
    while the build read it). ``src``: the file as the build opened and read it
    (one path lookup less; a file put in its place after that was not read)."""
    if content.stamp is not None:
        st = os.fstat(src) if src >= 0 else os.lstat(content.path)
        if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != content.stamp:
            raise OcclumfsError(f"{os.fsdecode(content.path)}: changed during the build")


class Gatherer:
    """Writes source bytes to the image through one buffer, a run of consecutive
    image offsets at a time (the zeros padding a file's last block included).

    Why not ``copy_file_range``: within one filesystem it moves a page at a time,
    and the kernel writes a page-sized write into a page-sized folio; one large
    ``pwrite`` fills large folios. Copying the stdlib's 100 MiB: ~40 ms of CPU
    this way, ~68 ms by ``copy_file_range`` per file (docs/performance.md).
    """

    __slots__ = ("buf", "fd", "fill", "start")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = memoryview(_area())[:GATHER]
        self.start = 0  # the image offset of buf[0]
        self.fill = 0

    def copy(
        self, content: Content, start: int, segments: list[Segment], src: int = -1, base: int = 0
    ) -> None:
        """Segments of file range [start, ...) of ``content`` (from ``src`` when open),
        their image offsets counted from ``base``."""
        opened = src < 0
        if opened:
            src = open_source(content.path)
        try:
            for off, length, at in segments:
                self._add(src, content.offset + start + off, length, base + at, content.path)
        except OSError as exc:
            raise source_error(exc, content.path) from None
        finally:
            if opened:
                os.close(src)

    def _add(self, src: int, src_off: int, length: int, at: int, path: bytes) -> None:
        end = self.start + self.fill
        gap = at - end
        if self.fill and 0 <= gap < BLOCK_SIZE and self.fill + gap <= GATHER:
            self.buf[self.fill : self.fill + gap] = ZERO_BLOCK[:gap]  # a last block's tail
            self.fill += gap
        elif at != end or not self.fill:
            self.flush()
            self.start = at
        while length > 0:
            if self.fill == GATHER:
                self.flush()
            take = min(length, GATHER - self.fill)
            got = os.preadv(src, [self.buf[self.fill : self.fill + take]], src_off)
            if got != take and got:  # short: the rest, or the error that cut it
                at = self.fill + got
                got += read_fully(src, self.buf[at : self.fill + take], src_off + got, path)
            if got < take:
                raise _changed(path)
            self.fill += got
            src_off += got
            length -= got

    def flush(self) -> None:
        """Write what is gathered."""
        data = self.buf[: self.fill]
        at = self.start
        while data:
            done = os.pwrite(self.fd, data, at)
            data = data[done:]
            at += done
        self.start += self.fill
        self.fill = 0
