"""Build an image from a directory or a tar archive, reproducibly and in parallel.

The build runs in passes so that the output depends only on the tree:

1. scan the source into memory (metadata only) and number the inodes in
   depth-first pre-order of byte-sorted names (root = 1; a hard link takes the
   number of its first occurrence);
2. hash every regular file in ``jobs`` forked processes (or, where this
   process may not fork, threads: the per-block Python work holds the GIL),
   skipping holes and all-zero blocks, which become holes in the image;
3. place each distinct content once in the data region, in inode order;
4. serialise the inode table and the heap, then write the data (written by the
   processes that hashed it, from the bytes they still hold, or copied, or
   sealed in parallel for an encrypted image), the seal table, the Merkle tree
   and last the header (with its MAC under the image key when encrypted), into
   a temporary file renamed over the target.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import stat
import struct
from collections.abc import Callable

from occlumfs.errors import FormatError, NotFoundError, OcclumfsError
from occlumfs.merkle.filedata import (
    Gatherer,
    Segment,
    Task,
    check_unchanged,
    hash_and_keep,
    hash_batch,
    write_batch,
)
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
    INODE,
    SEAL_SIZE,
    Descriptor,
    Layout,
    dir_size,
    name_problem,
    pack_xattrs,
)
from occlumfs.merkle.source import Content, SourceNode, scan_directory, scan_tar
from occlumfs.merkle.tree import build_levels, hash_blocks, pad_block

BATCH_BYTES = 4 << 20
BATCH_FILES = 256
CHUNK = 8 << 20  # one hashing task reads at most this much of a file


class _Hashed:
    """A file's non-zero blocks: runs of (first file block, count) and their hashes."""

    __slots__ = ("hashes", "runs")

    def __init__(self) -> None:
        self.runs: list[list[int]] = []
        self.hashes: list[bytes] = []

    def add(self, first: int, hashes: bytes) -> None:
        count = len(hashes) // HASH_SIZE
        if self.runs and self.runs[-1][0] + self.runs[-1][1] == first:
            self.runs[-1][1] += count
        else:
            self.runs.append([first, count])
        self.hashes.append(hashes)


class _Placed:
    """A distinct content in the data region (``data_block``: its first block,
    relative to the data region)."""

    __slots__ = ("content", "data_block", "hashes", "heap_ref", "runs")

    def __init__(self, content: Content, data_block: int, runs: list, hashes: bytes) -> None:
        self.content = content
        self.data_block = data_block
        self.runs = runs
        self.hashes = hashes
        self.heap_ref = -1


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
    source, image = path_text(source), path_text(image)
    if missing(source):
        raise NotFoundError(f"{source} does not exist")
    jobs = jobs or os.cpu_count() or 1
    image_dir = os.path.dirname(image) or "."
    try:
        if os.path.isdir(source):
            # Nothing is created before the scan: an image written inside SRC
            # must not find its own scratch files in the tree.
            tree = scan_directory(source)
            return _Builder(tree, key, source_date_epoch, jobs, progress).write(image)
        import tempfile  # only a tar source needs a scratch directory

        with tempfile.TemporaryDirectory(prefix=".occlumfs-build-", dir=image_dir) as scratch:
            tree = scan_tar(source, os.path.join(scratch, "spool"))
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
        self._checked = False
        self.progress = progress
        self.order, self.ino_of, self.links = _number_inodes(tree)

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

    # -- pass 4: metadata ----------------------------------------------------------------
    def _metadata(self, of_node: dict[int, _Placed]) -> tuple[bytes, bytes]:
        heap = bytearray()
        table = bytearray()
        parent_of = {1: 1}
        links = self.links
        for ino, node in enumerate(self.order, start=1):
            mtime = node.mtime_ns
            if self.clamp_ns is not None and mtime > self.clamp_ns:
                mtime = self.clamp_ns
            # The InodeRecord fields, packed straight into the table.
            size = aux = ref = count = xattr_count = xattr_ref = 0
            kind = stat.S_IFMT(node.mode)
            if kind == stat.S_IFDIR:
                names = sorted(node.children)
                aux = parent_of[ino]
                ref = len(heap)
                count = len(names)
                name_off = ref + DIRENT_SIZE * len(names)
                entries = bytearray()
                for name in names:
                    problem = name_problem(name)
                    if problem is not None:
                        raise FormatError(f"a name in the source {problem}: {name[:80]!r}")
                    child = node.children[name]
                    child_ino = self.ino_of[id(child)]
                    if child.is_dir:
                        parent_of[child_ino] = ino
                    entries += DIRENT.pack(child_ino, len(name), name_off)
                    name_off += len(name)
                heap += entries
                heap += b"".join(names)
                size = dir_size(len(names), name_off - ref - len(entries))
            elif kind == stat.S_IFREG:
                placed = of_node[id(node)]
                size = node.content.size
                count = len(placed.runs)
                aux = len(placed.hashes) // HASH_SIZE
                if placed.heap_ref < 0:
                    placed.heap_ref = len(heap)
                    block = placed.data_block
                    for first, n in placed.runs:
                        heap += EXTENT.pack(first, block, n)
                        block += n
                ref = placed.heap_ref if placed.runs else 0
            elif kind == stat.S_IFLNK:
                size = count = len(node.target)
                ref = len(heap)
                heap += node.target
            elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                aux = node.rdev
            if node.xattrs:
                xattr_count = len(node.xattrs)
                xattr_ref = len(heap)
                heap += pack_xattrs(node.xattrs)
            table += INODE.pack(
                node.mode,
                links[id(node)],
                node.uid,
                node.gid,
                size,
                mtime,
                aux,
                ref,
                count,
                xattr_count,
                xattr_ref,
            )
        return bytes(table), bytes(heap)

    # -- writing ---------------------------------------------------------------------------
    def write(self, image: str) -> str:
        tmp = os.path.join(os.path.dirname(image), f".{os.path.basename(image)}.tmp-{os.getpid()}")
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

    def _lay_out(self, fd: int, placement: _Placement) -> tuple:
        """Pass 4 once every file is placed: placed contents, the table, the heap, the layout."""
        placed, of_node = placement.placed, placement.of_node
        assert len(of_node) == len(placement.hashed)
        table, heap = self._metadata(of_node)
        data_blocks = sum(len(p.hashes) // HASH_SIZE for p in placed)
        layout = Layout.compute(len(self.order), len(heap), data_blocks, self.keys is not None)
        os.ftruncate(fd, layout.image_blocks * BLOCK_SIZE)
        return placed, of_node, table, heap, layout

    def _write_into(self, fd: int) -> Descriptor:
        batches = self._batches()
        placement = _Placement(self.order, batches, self.progress)
        if self.keys is None and self._may_fork(batches):
            # The hashing processes copy the data too, once it is placed (files
            # are placed as their hashes come in); meanwhile this process writes
            # the rest, which depends on the data's hashes only.
            done = []

            def plan(mapped: list) -> list:
                parts = self._lay_out(fd, placement)
                done.append(parts)
                data_start = parts[4].data_start
                return [[_segments(parts[1], task, data_start) for task in b] for b in batches]

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
            at = (layout.data_start - 1) * HASH_SIZE
            hashes = b"".join(p.hashes for p in placed)
            leaves[at : at + len(hashes)] = hashes

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

    def _copy_data(self, fd, layout: Layout, placed: list[_Placed]) -> None:
        """Copy each placed content from its source file, in the thread pool."""
        batches: list[list[_Placed]] = [[]]
        batch_bytes = 0
        for p in placed:
            # Small contents travel in batches: one pool hand-off per few MiB.
            if batch_bytes >= BATCH_BYTES or len(batches[-1]) >= BATCH_FILES:
                batches.append([])
                batch_bytes = 0
            batches[-1].append(p)
            batch_bytes += p.content.size

        def copy(batch: list[_Placed]) -> None:
            out = Gatherer(fd)
            for p in batch:
                whole = (None, 0, p.content.size)
                out.copy(p.content, 0, _placed_segments(p, whole, layout.data_start))
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


class _Placement:
    """Passes 2 and 3 as the hashes come in: each batch's runs are taken in batch
    order, and each file is placed once all its runs are in, in inode order (so a
    forked build places files while its workers still hash)."""

    def __init__(self, order: list[SourceNode], batches: list[list[Task]], progress) -> None:
        self.order = order
        self.batches = batches
        self.progress = progress
        self.mapped: list = [None] * len(batches)
        self.folded = 0  # batches taken
        self.hashed = {id(n): _Hashed() for n in order if n.content is not None}
        # Files with every run in (an empty file has none to wait for).
        self.complete = {id(n) for n in order if n.content is not None and not n.content.size}
        self.placed: list[_Placed] = []
        self.by_content: dict[bytes, _Placed] = {}
        self.of_node: dict[int, _Placed] = {}
        self.next_block = 0
        self.at = 0  # the next inode to place
        self._place_ready()  # a tree of empty files has no batches

    def add(self, index: int, batch_runs: list) -> None:
        self.mapped[index] = batch_runs
        while self.folded < len(self.batches) and self.mapped[self.folded] is not None:
            batch = self.batches[self.folded]
            for (node, start, end), runs in zip(batch, self.mapped[self.folded], strict=True):
                hashed = self.hashed[id(node)]
                for first, hashes in runs:
                    hashed.add(first, hashes)
                if end == node.content.size:
                    self.complete.add(id(node))
                if self.progress is not None:
                    self.progress(end - start)
            self.mapped[self.folded] = ()
            self.folded += 1
        self._place_ready()

    def _place_ready(self) -> None:
        while self.at < len(self.order):
            node = self.order[self.at]
            if node.content is not None:
                if id(node) not in self.complete:
                    break
                self._place(node)
            self.at += 1

    def _place(self, node: SourceNode) -> None:
        h = self.hashed[id(node)]
        hashes = b"".join(h.hashes)
        ident = hashlib.sha256(
            struct.pack("<Q", node.content.size)
            + b"".join(struct.pack("<QQ", a, n) for a, n in h.runs)
            + hashes
        ).digest()
        known = self.by_content.get(ident)
        if known is None:
            known = self.by_content[ident] = _Placed(node.content, self.next_block, h.runs, hashes)
            self.placed.append(known)
            self.next_block += len(hashes) // HASH_SIZE
        self.of_node[id(node)] = known


def _segments(of_node: dict[int, _Placed], task: Task, data_start: int) -> list[Segment] | None:
    """Where the bytes a hashing task read go in the image; None if the task's
    file is not the one its content is copied from (a duplicate)."""
    node = task[0]
    p = of_node[id(node)]
    if p.content is not node.content:
        return None
    return _placed_segments(p, task, data_start)


def _placed_segments(p: _Placed, task: Task, data_start: int) -> list[Segment]:
    """The stored runs of ``p`` within the task's byte range [start, end), as segments."""
    _, start, end = task
    out = []
    block = data_start + p.data_block
    for first, count in p.runs:
        a = max(start, first * BLOCK_SIZE)
        b = min(end, (first + count) * BLOCK_SIZE, p.content.size)
        if a < b:
            out.append((a - start, b - a, (block + a // BLOCK_SIZE - first) * BLOCK_SIZE))
        block += count
    return out
