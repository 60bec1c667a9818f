"""Build an image from a directory or a tar archive, reproducibly and in parallel.

The build runs in passes so that the output depends only on the tree:

1. scan the source into memory (metadata only) and number the inodes in
   depth-first pre-order of byte-sorted names (root = 1; a hard link takes the
   number of its first occurrence);
2. hash every regular file in ``jobs`` forked processes (or, where this
   process may not fork, threads: the per-block Python work holds the GIL),
   skipping holes and all-zero blocks, which become holes in the image. A
   plain directory build scans in that same order and hands each batch of
   files to a worker as soon as it is scanned (:class:`_Stream`), so hashing
   runs while the scan goes on;
3. place each distinct content once in the data region, in inode order, as
   its last hash comes in (during a streamed scan too), and serialise the inode
   table and the heap once the tree is numbered (:mod:`occlumfs.merkle.placement`);
4. write the data (copied by the processes that hashed it, or copied, or
   sealed in parallel for an encrypted image), the seal table, the Merkle tree
   and last the header (with its MAC under the image key when encrypted), into
   a temporary file (its blocks allocated up front where the filesystem can:
   :func:`~occlumfs.merkle.filedata.reserve`) renamed over the target.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import hashlib
import os
from collections.abc import Callable

from occlumfs.errors import NotFoundError, OcclumfsError, UsageError
from occlumfs.interrupts import ended_like_ctrl_c
from occlumfs.merkle.filedata import (
    Gatherer,
    Task,
    check_unchanged,
    hash_and_keep,
    hash_batch,
    hash_payload,
    open_source,
    read_fully,
    reserve,
    write_batch,
)
from occlumfs.merkle.forkmap import MAX_ITEMS, can_fork, fork_map
from occlumfs.merkle.format import (
    BLOCK_SIZE,
    DESCRIPTOR_SIZE,
    FLAG_ENCRYPTED,
    FLAG_XATTRS,
    HASH_SIZE,
    SEAL_SIZE,
    Descriptor,
    Layout,
)
from occlumfs.merkle.placement import Metadata, Placed, Placement, placed_segments
from occlumfs.merkle.source import Numbering, SourceNode, number_tree, scan_directory, scan_tar
from occlumfs.merkle.streampool import StreamPool
from occlumfs.merkle.tree import build_levels, hash_blocks, pad_block

BATCH_BYTES = 4 << 20
BATCH_FILES = 256
CHUNK = 8 << 20  # one hashing task reads at most this much of a file


def pathlib_form(path: str) -> bool:
    """Whether ``str(Path(path))`` is ``path`` itself: no empty or ``.`` component
    (``a//b``, ``./a``, ``a/``), so messages read the same without loading pathlib."""
    if path == ".":
        return True
    parts = path.split("/")
    if path.startswith("/"):
        parts = parts[1:]  # a leading "//" keeps an empty part: pathlib's
    return all(part not in ("", ".") for part in parts)


def path_text(path: str | os.PathLike) -> str:
    """``str(Path(path))``, without loading pathlib (~10 ms) for a plain string."""
    if isinstance(path, str) and pathlib_form(path):
        return path
    from pathlib import Path

    return str(Path(path))


def missing(path: str | os.PathLike) -> bool:
    """``not Path(path).exists() and not Path(path).is_symlink()``, without pathlib:
    nothing there (a dangling symlink is there); other errors are raised, as there."""
    try:
        os.lstat(path)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
            return True
        raise
    return False


def build_image(
    source: str | os.PathLike,
    image: str | os.PathLike,
    *,
    key: bytes | None = None,
    source_date_epoch: int | None = None,
    jobs: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> str:
    raw_image = os.fspath(image)
    if raw_image.endswith("/") or os.path.basename(raw_image) in ("", ".", ".."):
        # `out/` means a directory (and would write, or replace, a file `out`).
        raise UsageError(f"{raw_image!r} names no file for IMAGE")
    source, image = path_text(source), path_text(image)
    if missing(source):
        raise NotFoundError(f"{source} does not exist")
    jobs = jobs or os.cpu_count() or 1
    image_dir = os.path.dirname(image) or "."
    if not os.path.isdir(image_dir):  # else the error would name the scratch file
        raise NotFoundError(f"{image}: no such directory {image_dir}")
    with _cycle_collector_off(), ended_like_ctrl_c():
        try:
            builder = _Builder(key, source_date_epoch, jobs, progress)
            if os.path.isdir(source):
                if _within(image_dir, source):
                    # Nothing is created before the scan: an image written inside
                    # SRC must not find its scratch file (or a new mtime) in the tree.
                    builder.numbering = scan_directory(source)[1]
                    return builder.write(image)
                return builder.write(image, source)  # scanned (and hashed) once it is open
            import tempfile  # only a tar source needs a scratch directory

            with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=image_dir) as scratch:
                builder.numbering = number_tree(scan_tar(source, os.path.join(scratch, "spool")))
                return builder.write(image)
        except OcclumfsError:
            raise
        except OSError as exc:
            # Unreadable source files, a full or read-only target: one line, no traceback.
            where = os.fsdecode(exc.filename) if exc.filename else image
            if _is_scratch(where, image):
                where = image  # the user named the image, not our scratch beside it
            raise OcclumfsError(f"mkimage: {where}: {exc.strerror or exc}") from None


SCRATCH_PREFIX = ".occlumfs-build-"  # a tar build's scratch directory, beside the image


def _scratch_file(image: str) -> str:
    """The image's own scratch file (beside it, until it is renamed over the image)."""
    return os.path.join(os.path.dirname(image), f".{os.path.basename(image)}.tmp-{os.getpid()}")


def _is_scratch(path: str, image: str) -> bool:
    """Whether ``path`` is the build's scratch file or scratch directory (or in it)."""
    scratch_dir = os.path.join(os.path.dirname(image) or ".", SCRATCH_PREFIX)
    return path == _scratch_file(image) or path.startswith(scratch_dir)


@contextlib.contextmanager
def _cycle_collector_off():
    """Python's cycle collector paused for a build: the scan makes ~10 objects a
    file and no cycles, and each collection walks all of them (in a forked
    worker, writing to pages it shares with the builder): ~5 ms of a stdlib build."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _within(path: str, root: str) -> bool:
    """Whether directory ``path`` is ``root`` or below it (by device and inode,
    so symlinks and bind mounts count as what they show)."""
    top = os.stat(root)
    at = os.path.realpath(path)
    while True:
        try:
            st = os.stat(at)
        except OSError:
            st = None  # not there (yet): its parent decides
        if st is not None and (st.st_dev, st.st_ino) == (top.st_dev, top.st_ino):
            return True
        parent = os.path.dirname(at)
        if parent == at:
            return False
        at = parent


class _Builder:
    def __init__(self, key, source_date_epoch, jobs, progress) -> None:
        self.keys = None
        if key is not None:
            from occlumfs.merkle.crypto import ImageKeys  # only encrypted builds pay for it

            self.keys = ImageKeys(key)
        self.clamp_ns = None if source_date_epoch is None else source_date_epoch * 1_000_000_000
        self.jobs = jobs
        self._pool = None
        self._checked = False
        self.progress = progress

    @property
    def numbering(self) -> Numbering:
        return self.order, self.ino_of, self.links

    @numbering.setter
    def numbering(self, numbering: Numbering) -> None:
        self.order, self.ino_of, self.links = numbering

    # -- pass 2: hashing -------------------------------------------------------------
    def _batches(self) -> list[list[Task]]:
        tasks = []
        for node in self.order:
            if node.content is None:
                continue
            size = node.content.size
            for start in range(0, size, CHUNK):
                tasks.append((node, start, min(size, start + CHUNK)))
        # Small files travel in batches: one hand-off per few MiB, not per file.
        batches: list[list[Task]] = []
        batch_bytes = 0
        for task in tasks:
            if not batches or batch_bytes >= BATCH_BYTES or len(batches[-1]) >= BATCH_FILES:
                batches.append([])
                batch_bytes = 0
            batches[-1].append(task)
            batch_bytes += task[2] - task[1]
        return batches

    def _map(self, func: Callable, batches: list) -> list:
        """``[func(b) for b in batches]`` in forked processes when this process may
        fork, else in the thread pool: per-file Python work (hashing 4 KiB at a
        time, a copy's open/close) holds the GIL, so two threads are no faster
        than one (docs/performance.md, issue 11)."""
        if self._may_fork(batches):
            return fork_map(func, batches, self.jobs)
        if self.jobs == 1 or len(batches) <= 1:
            return [func(batch) for batch in batches]
        return list(self._threads().map(func, batches))

    def _may_fork(self, batches: list) -> bool:
        return self.jobs > 1 and 1 < len(batches) <= MAX_ITEMS and can_fork()

    def _threads(self):
        """The build's thread pool, started on first use (a forked build needs none)."""
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.jobs, thread_name_prefix="mkimage")
        return self._pool

    # -- writing ---------------------------------------------------------------------------
    def write(self, image: str, source: str | None = None) -> str:
        """Write the image of the numbered tree, or of directory ``source``
        (scanned here: the scan leaves out the scratch file)."""
        tmp = _scratch_file(image)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                desc = self._scan_and_write(fd, source) if source else self._write_into(fd)
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
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return desc.digest()

    def _check_unchanged(self) -> None:
        if self._checked:
            return  # by the workers that wrote the data, after writing it
        for node in self.order:
            if node.content is not None:
                check_unchanged(node.content)

    def _lay_out(self, fd: int, placement: Placement) -> tuple:
        """Once every file is placed (and so every inode serialised): placed contents,
        the table, the heap, the layout."""
        placed, of_node = placement.placed, placement.of_node
        assert placement.done
        table, heap = bytes(placement.meta.table), bytes(placement.meta.heap)
        data_blocks = sum(len(p.hashes) // HASH_SIZE for p in placed)
        layout = Layout.compute(len(self.order), len(heap), data_blocks, self.keys is not None)
        reserve(fd, layout.image_blocks * BLOCK_SIZE)
        return placed, of_node, table, heap, layout

    def _scan_and_write(self, fd: int, source: str) -> Descriptor:
        if self.keys is not None or self.jobs == 1 or not can_fork():
            self.numbering = scan_directory(source)[1]
            return self._write_into(fd)
        stream = _Stream(self, fd)
        try:
            self.numbering = scan_directory(source, stream.add)[1]
            if stream.pool is None:  # at most one batch: no workers needed
                return self._write_into(fd)
            return stream.finish()
        finally:
            stream.close()

    def _write_into(self, fd: int) -> Descriptor:
        batches = self._batches()
        placement = Placement(batches, self.progress, CHUNK)
        placement.number(self.order, Metadata(self.ino_of, self.links, self.clamp_ns))
        if self.keys is None and self._may_fork(batches):
            # The hashing processes copy the data too, once it is placed (files
            # are placed as their hashes come in); meanwhile this process writes
            # the rest, which depends on the data's hashes only.
            done = []

            def plan(mapped: list) -> list:
                parts = self._lay_out(fd, placement)
                done.append(parts)
                # Each batch: the data region's offset, and where each of its
                # tasks' bytes go in the region (worked out as files were placed).
                base, where = parts[4].data_start * BLOCK_SIZE, placement.segments
                return [(base, [where.get((id(t[0]), t[1])) for t in b]) for b in batches]

            fork_map(
                hash_and_keep,
                batches,
                self.jobs,
                plan=plan,
                finish=functools.partial(write_batch, fd),
                on_result=placement.add,
                meanwhile=lambda: done.append(self._write_the_rest(fd, *done[0])),
            )
            self._checked = True
            return done[1]
        for index, runs in enumerate(self._map(hash_batch, batches)):
            placement.add(index, runs)
        parts = self._lay_out(fd, placement)
        if self.keys is None:
            self._copy_data(fd, parts[4], parts[0])
        return self._write_the_rest(fd, *parts)

    def _write_the_rest(self, fd: int, placed, _of_node, table, heap, layout) -> Descriptor:
        """Everything but the plain data: table, heap, seals (and the sealed data),
        tree and header."""
        encrypted = self.keys is not None
        data_blocks = layout.seal_start - layout.data_start
        # Level 0 of the tree, already padded to whole blocks: no copies of it
        # (~850 KB for the stdlib: fresh memory costs a page fault a 4 KiB).
        leaves = bytearray(layout.tree.counts[0] * BLOCK_SIZE)
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
            at = (layout.data_start - 1) * HASH_SIZE
            for p in placed:
                leaves[at : at + len(p.hashes)] = p.hashes
                at += len(p.hashes)

        levels, root = build_levels(leaves, layout.tree)
        os.pwritev(fd, levels, layout.tree_start * BLOCK_SIZE)
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

    def _copy_data(self, fd, layout: Layout, placed: list[Placed]) -> None:
        """Copy each placed content from its source file, in the thread pool."""
        batches: list[list[Placed]] = [[]]
        batch_bytes = 0
        for p in placed:
            # Small contents travel in batches: one pool hand-off per few MiB.
            if batch_bytes >= BATCH_BYTES or len(batches[-1]) >= BATCH_FILES:
                batches.append([])
                batch_bytes = 0
            batches[-1].append(p)
            batch_bytes += p.content.size

        def copy(batch: list[Placed]) -> None:
            out = Gatherer(fd)
            for p in batch:
                whole = (None, 0, p.content.size)
                out.copy(p.content, 0, placed_segments(p, whole, layout.data_start))
            out.flush()

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
            buf = bytearray(n * BLOCK_SIZE)  # zeros past the file's end, as stored
            src = open_source(p.content.path)
            try:
                at = p.content.offset + first * BLOCK_SIZE
                read_fully(src, memoryview(buf)[:want], at, p.content.path)
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


class _Stream:
    """A forked build that hashes while the scan goes on (streampool.py): the
    scan hands over each regular file in inode order; each full batch goes to a
    worker at once, the first one starting the workers; once every file is
    placed, the workers copy what they hashed while this process writes the rest."""

    def __init__(self, builder: _Builder, fd: int) -> None:
        self.builder = builder
        self.fd = fd
        self.pool: StreamPool | None = None
        self.batches: list[list[Task]] = []
        self.batch: list[Task] = []
        self.batch_bytes = 0
        # Files are placed as their hashes come in, while the scan goes on: by
        # the last hash only the inodes are left to serialise.
        self.placement = Placement(self.batches, builder.progress, CHUNK)

    def add(self, node: SourceNode) -> None:
        size = node.content.size
        for start in range(0, size, CHUNK):
            end = min(size, start + CHUNK)
            self.batch.append((node, start, end))
            self.batch_bytes += end - start
            if self.batch_bytes >= BATCH_BYTES or len(self.batch) >= BATCH_FILES:
                self._send()

    def _send(self) -> None:
        if self.pool is None:
            finish = functools.partial(write_batch, self.fd)
            self.pool = StreamPool(hash_payload, finish, self.builder.jobs, self.placement.add)
        index = len(self.batches)
        self.batches.append(self.batch)
        payload = []  # what a worker needs of each task, as plain data
        for node, start, end in self.batch:
            c = node.content
            payload.append((c.path, c.offset, c.size, c.stamp, start, end))
        self.pool.submit(index, payload, self.batch_bytes)
        self.batch, self.batch_bytes = [], 0

    def finish(self) -> Descriptor:
        b, pool, batches, placement = self.builder, self.pool, self.batches, self.placement
        if self.batch:
            self._send()
        placement.number(b.order, Metadata(b.ino_of, b.links, b.clamp_ns))
        pool.gather()
        parts = b._lay_out(self.fd, placement)
        base, where = parts[4].data_start * BLOCK_SIZE, placement.segments
        pool.send_plans(lambda i: (base, [where.get((id(t[0]), t[1])) for t in batches[i]]))
        desc = b._write_the_rest(self.fd, *parts)
        pool.wait()
        b._checked = True
        return desc

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
