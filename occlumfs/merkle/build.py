"""Build an image from a directory or a tar archive, reproducibly and in parallel.

The build runs in passes so that the output depends only on the tree:

1. scan the source into memory (metadata only) and number the inodes in
   depth-first pre-order of byte-sorted names (root = 1; a hard link takes the
   number of its first occurrence);
2. hash every regular file in a pool of ``jobs`` threads (hashlib releases
   the GIL while it hashes a block; the per-block Python work does not, so on
   a small machine the gain is modest), skipping holes and all-zero blocks,
   which become holes in the image;
3. place each distinct content once in the data region, in inode order;
4. serialise the inode table and the heap, then write the data (copied, or
   sealed in parallel for an encrypted image), the seal table, the Merkle tree
   and last the header (with its MAC under the image key when encrypted), into
   a temporary file renamed over the target.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from occlumfs.errors import FormatError, NotFoundError, OcclumfsError
from occlumfs.merkle.forkmap import MAX_ITEMS, can_fork, fork_map
from occlumfs.merkle.format import (
    BLOCK_SIZE,
    DESCRIPTOR_SIZE,
    DIRENT,
    DIRENT_SIZE,
    EXTENT,
    FLAG_ENCRYPTED,
    FLAG_XATTRS,
    HASH_SIZE,
    SEAL_SIZE,
    ZERO_BLOCK,
    Descriptor,
    InodeRecord,
    Layout,
    dir_size,
    name_problem,
    pack_xattrs,
)
from occlumfs.merkle.source import Content, SourceNode, scan_directory, scan_tar
from occlumfs.merkle.tree import build_levels, hash_blocks, pad_block

ZERO_RUN = bytes(64)
SMALL_FILE = 1 << 20
BATCH_BYTES = 4 << 20
BATCH_FILES = 256
CHUNK = 8 << 20  # one hashing task reads at most this much of a file
READ = 1 << 20


@dataclass(slots=True)
class _Hashed:
    """A file's non-zero blocks: runs of (first file block, count) and their hashes."""

    runs: list[list[int]] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)

    def add(self, first: int, hashes: bytes) -> None:
        count = len(hashes) // HASH_SIZE
        if self.runs and self.runs[-1][0] + self.runs[-1][1] == first:
            self.runs[-1][1] += count
        else:
            self.runs.append([first, count])
        self.hashes.append(hashes)


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


def _hash_buffer(buf: bytes | bytearray, got: int, first_block: int, out: list) -> None:
    """Append (first block, hashes of the run) for each run of non-zero blocks of
    ``buf[:got]``, whose first block is file block ``first_block``."""
    mv = memoryview(buf)[:got]
    run_first = first_block
    run: list[bytes] = []
    first_off = 0
    full = got - got % BLOCK_SIZE
    if full and buf.find(ZERO_RUN, 0, full) < 0:
        # No all-zero block can hide in a buffer without 64 zeros in a row:
        # hash its whole blocks as one run, without copies.
        run.append(hash_blocks(mv[:full]))
        first_off = full
    for off in range(first_off, got, BLOCK_SIZE):
        n = min(BLOCK_SIZE, got - off)
        zeros = ZERO_BLOCK if n == BLOCK_SIZE else ZERO_BLOCK[:n]
        if buf.startswith(zeros, off, off + n):  # an all-zero block becomes a hole
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


def _hash_batch(batch: list[tuple[SourceNode, int, int]]) -> list[list[tuple[int, bytes]]]:
    return [_hash_chunk(node.content, start, end) for node, start, end in batch]


@dataclass(slots=True)
class _Placed:
    """A distinct content in the data region."""

    content: Content
    data_block: int  # first block, relative to the data region
    runs: list[list[int]]
    hashes: bytes
    heap_ref: int = -1


def _number_inodes(root: SourceNode) -> tuple[list[SourceNode], dict[int, int], dict[int, int]]:
    """Inodes in depth-first pre-order of sorted names; ino and link count by node id.

    Depth first is the order `find`, `tar` and `cp -r` visit a tree, and file
    data is laid out in inode order, so such a walk reads the image front to
    back (the host's read-ahead then works for it).
    """
    order = [root]
    ino_of = {id(root): 1}
    links = {id(root): 2}
    stack = [(root, iter(sorted(root.children)))]
    while stack:
        node, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            continue
        child = node.children[name]
        if child.is_dir:
            links[id(node)] += 1
        if id(child) not in ino_of:
            ino_of[id(child)] = len(order) + 1
            order.append(child)
            links[id(child)] = 2 if child.is_dir else 1
            if child.is_dir:
                stack.append((child, iter(sorted(child.children))))
        elif not child.is_dir:
            links[id(child)] += 1
        else:
            raise FormatError("a directory appears twice in the source tree")
    return order, ino_of, links


def build_image(
    source: Path,
    image: Path,
    *,
    key: bytes | None = None,
    source_date_epoch: int | None = None,
    jobs: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> str:
    source, image = Path(source), Path(image)
    if not source.exists() and not source.is_symlink():
        raise NotFoundError(f"{source} does not exist")
    jobs = jobs or os.cpu_count() or 1
    image_dir = image.parent if str(image.parent) else Path(".")
    try:
        if source.is_dir():
            # Nothing is created before the scan: an image written inside SRC
            # must not find its own scratch files in the tree.
            tree = scan_directory(source)
            return _Builder(tree, key, source_date_epoch, jobs, progress).write(image)
        import tempfile  # only a tar source needs a scratch directory

        with tempfile.TemporaryDirectory(prefix=".occlumfs-build-", dir=image_dir) as scratch:
            tree = scan_tar(source, Path(scratch) / "spool")
            return _Builder(tree, key, source_date_epoch, jobs, progress).write(image)
    except OcclumfsError:
        raise
    except OSError as exc:
        # Unreadable source files, a full or read-only target: one line, no traceback.
        where = os.fsdecode(exc.filename) if exc.filename else str(image)
        raise OcclumfsError(f"mkimage: {where}: {exc.strerror or exc}") from None


class _Builder:
    def __init__(self, tree, key, source_date_epoch, jobs, progress) -> None:
        self.keys = None
        if key is not None:
            from occlumfs.merkle.crypto import ImageKeys  # only encrypted builds pay for it

            self.keys = ImageKeys(key)
        self.clamp_ns = None if source_date_epoch is None else source_date_epoch * 1_000_000_000
        self.jobs = jobs
        self._pool = None
        self.progress = progress
        self.order, self.ino_of, self.links = _number_inodes(tree)

    # -- pass 2: hashing -------------------------------------------------------------
    def _hash_files(self) -> dict[int, _Hashed]:
        files = [n for n in self.order if n.content is not None]
        tasks = []
        for node in files:
            size = node.content.size
            for start in range(0, size, CHUNK):
                tasks.append((node, start, min(size, start + CHUNK)))
        # Small files travel in batches: one pool hand-off per few MiB, not per file.
        batches: list[list[tuple[SourceNode, int, int]]] = []
        batch_bytes = 0
        for task in tasks:
            if not batches or batch_bytes >= BATCH_BYTES or len(batches[-1]) >= BATCH_FILES:
                batches.append([])
                batch_bytes = 0
            batches[-1].append(task)
            batch_bytes += task[2] - task[1]
        results: dict[int, _Hashed] = {id(n): _Hashed() for n in files}
        mapped = self._map(_hash_batch, batches)
        for batch, batch_runs in zip(batches, mapped, strict=True):
            for (node, start, end), runs in zip(batch, batch_runs, strict=True):
                hashed = results[id(node)]
                for first, hashes in runs:
                    hashed.add(first, hashes)
                if self.progress is not None:
                    self.progress(end - start)
        return results

    def _map(self, func: Callable, batches: list) -> list:
        """``[func(b) for b in batches]`` in forked processes when this process may
        fork, else in the thread pool: per-file Python work (hashing 4 KiB at a
        time, a copy's open/close) holds the GIL, so two threads are no faster
        than one (docs/performance.md, issue 11)."""
        if self.jobs > 1 and len(batches) > 1 and len(batches) <= MAX_ITEMS and can_fork():
            return fork_map(func, batches, self.jobs)
        return list(self._threads().map(func, batches))

    def _threads(self):
        """The build's thread pool, started on first use (a forked build needs none)."""
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.jobs, thread_name_prefix="mkimage")
        return self._pool

    # -- pass 3: placement -------------------------------------------------------------
    def _place(self, hashed: dict[int, _Hashed]) -> tuple[list[_Placed], dict[int, _Placed]]:
        placed: list[_Placed] = []
        by_content: dict[bytes, _Placed] = {}
        of_node: dict[int, _Placed] = {}
        next_block = 0
        for node in self.order:
            if node.content is None:
                continue
            h = hashed[id(node)]
            hashes = b"".join(h.hashes)
            ident = hashlib.sha256(
                struct.pack("<Q", node.content.size)
                + b"".join(struct.pack("<QQ", a, n) for a, n in h.runs)
                + hashes
            ).digest()
            known = by_content.get(ident)
            if known is None:
                known = by_content[ident] = _Placed(node.content, next_block, h.runs, hashes)
                placed.append(known)
                next_block += len(hashes) // HASH_SIZE
            of_node[id(node)] = known
        return placed, of_node

    # -- pass 4: metadata ----------------------------------------------------------------
    def _metadata(self, of_node: dict[int, _Placed]) -> tuple[bytes, bytes]:
        heap = bytearray()
        table = bytearray()
        parent_of = {1: 1}
        for ino, node in enumerate(self.order, start=1):
            mtime = node.mtime_ns
            if self.clamp_ns is not None and mtime > self.clamp_ns:
                mtime = self.clamp_ns
            rec = dict(
                mode=node.mode,
                nlink=self.links[id(node)],
                uid=node.uid,
                gid=node.gid,
                size=0,
                mtime_ns=mtime,
            )
            kind = stat.S_IFMT(node.mode)
            if kind == stat.S_IFDIR:
                names = sorted(node.children)
                rec["aux"] = parent_of[ino]
                rec["ref"] = len(heap)
                rec["count"] = len(names)
                name_off = rec["ref"] + DIRENT_SIZE * len(names)
                entries = bytearray()
                for name in names:
                    problem = name_problem(name)
                    if problem is not None:
                        raise FormatError(f"a name in the source {problem}: {name[:80]!r}")
                    child_ino = self.ino_of[id(node.children[name])]
                    if node.children[name].is_dir:
                        parent_of[child_ino] = ino
                    entries += DIRENT.pack(child_ino, len(name), name_off)
                    name_off += len(name)
                heap += entries
                heap += b"".join(names)
                rec["size"] = dir_size(len(names), name_off - rec["ref"] - len(entries))
            elif kind == stat.S_IFREG:
                placed = of_node[id(node)]
                rec["size"] = node.content.size
                rec["count"] = len(placed.runs)
                rec["aux"] = len(placed.hashes) // HASH_SIZE
                if placed.heap_ref < 0:
                    placed.heap_ref = len(heap)
                    block = placed.data_block
                    for first, count in placed.runs:
                        heap += EXTENT.pack(first, block, count)
                        block += count
                rec["ref"] = placed.heap_ref if placed.runs else 0
            elif kind == stat.S_IFLNK:
                rec["size"] = rec["count"] = len(node.target)
                rec["ref"] = len(heap)
                heap += node.target
            elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                rec["aux"] = node.rdev
            if node.xattrs:
                rec["xattr_count"] = len(node.xattrs)
                rec["xattr_ref"] = len(heap)
                heap += pack_xattrs(node.xattrs)
            table += InodeRecord(**rec).pack()
        return bytes(table), bytes(heap)

    # -- writing ---------------------------------------------------------------------------
    def write(self, image: Path) -> str:
        tmp = image.with_name(f".{image.name}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                desc = self._write_into(fd)
            finally:
                if self._pool is not None:
                    self._pool.shutdown()
            # No fsync: readers only ever see a complete image (the rename is
            # atomic), and an image a power cut left half-written on disk fails
            # verification like any other damage; `sync` makes it durable.
            os.close(fd)
            fd = -1
            self._check_unchanged()
            os.replace(tmp, image)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return desc.digest()

    def _check_unchanged(self) -> None:
        for node in self.order:
            c = node.content
            if c is not None and c.stamp is not None:
                st = os.lstat(c.path)
                if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != c.stamp:
                    raise OcclumfsError(f"{os.fsdecode(c.path)}: changed during the build")

    def _write_into(self, fd: int) -> Descriptor:
        hashed = self._hash_files()
        placed, of_node = self._place(hashed)
        table, heap = self._metadata(of_node)
        data_blocks = sum(len(p.hashes) // HASH_SIZE for p in placed)
        encrypted = self.keys is not None
        layout = Layout.compute(len(self.order), len(heap), data_blocks, encrypted)
        os.ftruncate(fd, layout.image_blocks * BLOCK_SIZE)
        leaves = bytearray(layout.covered_blocks * HASH_SIZE)
        seals = bytearray((layout.seal_start - 1) * SEAL_SIZE) if encrypted else None

        self._write_plain_region(fd, layout.inode_start, pad_block(table), leaves, seals)
        self._write_plain_region(fd, layout.heap_start, pad_block(heap), leaves, seals)
        if encrypted:
            self._seal_data(fd, layout, placed, leaves, seals)
            seal_bytes = pad_block(bytes(seals))
            os.pwrite(fd, seal_bytes, layout.seal_start * BLOCK_SIZE)
            at = (layout.seal_start - 1) * HASH_SIZE
            leaves[at : at + layout.seal_blocks * HASH_SIZE] = hash_blocks(seal_bytes)
        else:
            self._copy_data(fd, layout, placed, leaves)

        levels, root = build_levels(bytes(leaves), layout.tree)
        os.pwrite(fd, b"".join(levels), layout.tree_start * BLOCK_SIZE)
        desc = Descriptor(
            flags=(FLAG_ENCRYPTED if encrypted else 0)
            | (FLAG_XATTRS if any(n.xattrs for n in self.order) else 0),
            image_blocks=layout.image_blocks,
            inode_count=len(self.order),
            heap_bytes=len(heap),
            data_blocks=data_blocks,
            sealed_blocks=layout.seal_start - 1 if encrypted else 0,
            root_hash=root,
            key_check=self.keys.key_check if encrypted else bytes(32),
        )
        header = desc.pack()
        assert len(header) == DESCRIPTOR_SIZE
        if encrypted:
            header += self.keys.header_mac(header)
        os.pwrite(fd, header + bytes(BLOCK_SIZE - len(header)), 0)
        return desc

    def _write_plain_region(self, fd, first_block, data: bytes, leaves, seals) -> None:
        if not data:
            return
        if self.keys is not None:
            out = bytearray()
            for i in range(len(data) // BLOCK_SIZE):
                block_no = first_block + i
                ct, seal = self.keys.seal(block_no, data[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])
                seals[(block_no - 1) * SEAL_SIZE : block_no * SEAL_SIZE] = seal
                out += ct
            data = bytes(out)
        os.pwrite(fd, data, first_block * BLOCK_SIZE)
        at = (first_block - 1) * HASH_SIZE
        leaves[at : at + len(data) // BLOCK_SIZE * HASH_SIZE] = hash_blocks(data)

    def _copy_data(self, fd, layout: Layout, placed: list[_Placed], leaves) -> None:
        """Copy each placed content file to file, in workers (as the hashing)."""
        at = (layout.data_start - 1) * HASH_SIZE
        batches: list[list[_Placed]] = [[]]
        batch_bytes = 0
        for p in placed:
            leaves[at : at + len(p.hashes)] = p.hashes
            at += len(p.hashes)
            # Small contents travel in batches: one pool hand-off per few MiB.
            if batch_bytes >= BATCH_BYTES or len(batches[-1]) >= BATCH_FILES:
                batches.append([])
                batch_bytes = 0
            batches[-1].append(p)
            batch_bytes += p.content.size

        def copy(batch: list[_Placed]) -> None:
            for p in batch:
                _copy_placed(p, fd, layout.data_start + p.data_block)

        self._map(copy, batches)

    def _seal_data(self, fd, layout: Layout, placed, leaves, seals) -> None:
        tasks = []
        for p in placed:
            block = layout.data_start + p.data_block
            hash_at = 0
            for first, count in p.runs:
                for k in range(0, count, CHUNK // BLOCK_SIZE):
                    n = min(count - k, CHUNK // BLOCK_SIZE)
                    tasks.append((p, first + k, block + k, n, hash_at + k * HASH_SIZE))
                block += count
                hash_at += count * HASH_SIZE

        def seal(task) -> None:
            p, first, block, n, hash_at = task
            want = min(n * BLOCK_SIZE, p.content.size - first * BLOCK_SIZE)
            src = os.open(p.content.path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                buf = pad_block(os.pread(src, want, p.content.offset + first * BLOCK_SIZE))
            finally:
                os.close(src)
            out = bytearray()
            for i in range(n):
                plain = buf[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
                plain_hash = p.hashes[hash_at + i * HASH_SIZE : hash_at + (i + 1) * HASH_SIZE]
                if hashlib.sha256(plain).digest() != plain_hash:
                    raise OcclumfsError(f"{os.fsdecode(p.content.path)}: changed during the build")
                ct, entry = self.keys.seal(block + i, plain, plain_hash)
                seals[(block + i - 1) * SEAL_SIZE : (block + i) * SEAL_SIZE] = entry
                out += ct
            os.pwrite(fd, out, block * BLOCK_SIZE)
            leaves[(block - 1) * HASH_SIZE : (block - 1 + n) * HASH_SIZE] = hash_blocks(out)

        for _ in self._threads().map(seal, tasks):
            pass


def _copy_placed(p: _Placed, fd: int, block: int) -> None:
    """Copy the runs of one placed content from its source file to ``block`` on."""
    src = os.open(p.content.path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        for first, count in p.runs:
            src_off = p.content.offset + first * BLOCK_SIZE
            length = min(count * BLOCK_SIZE, p.content.size - first * BLOCK_SIZE)
            _copy_range(src, fd, src_off, block * BLOCK_SIZE, length)
            block += count
    finally:
        os.close(src)


def _copy_range(src: int, dst: int, src_off: int, dst_off: int, length: int) -> None:
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
