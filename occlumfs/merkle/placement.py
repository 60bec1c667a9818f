"""A build's passes 3 and 4 as the hashes come in: placing each distinct content
in the data region, and the inode table and heap, inode by inode.

Files are placed in inode order (the order of their hashing tasks), each as soon
as its last run is in, even while the scan still numbers the tree; every inode
is serialised once the numbering is known and everything before it is placed.
So when the last hash arrives the metadata is already written out and the data
region's start is known: a forked build hands the copy plans to its workers at
once instead of keeping them idle while this process places ~2,450 files and
serialises ~2,600 inodes (docs/performance.md, issue 11).
"""

from __future__ import annotations

import stat

from occlumfs.errors import FormatError
from occlumfs.merkle.filedata import Segment, Task
from occlumfs.merkle.format import (
    BLOCK_SIZE,
    DIRENT,
    DIRENT_SIZE,
    EXTENT,
    HASH_SIZE,
    INODE,
    dir_size,
    name_problem,
    pack_xattrs,
)
from occlumfs.merkle.source import Content, SourceNode


class Hashed:
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


class Placed:
    """A distinct content in the data region (``data_block``: its first block,
    relative to the data region)."""

    __slots__ = ("content", "data_block", "hashes", "heap_ref", "runs")

    def __init__(self, content: Content, data_block: int, runs: list, hashes: bytes) -> None:
        self.content = content
        self.data_block = data_block
        self.runs = runs
        self.hashes = hashes
        self.heap_ref = -1


class Metadata:
    """The inode table and the heap, one inode at a time in inode order."""

    def __init__(self, ino_of: dict[int, int], links: dict[int, int], clamp_ns: int | None):
        self.ino_of = ino_of
        self.links = links
        self.clamp_ns = clamp_ns
        self.heap = bytearray()
        self.table = bytearray()
        self.parent_of = {1: 1}
        self.xattrs = False  # some inode has xattrs

    def add(self, ino: int, node: SourceNode, placed: Placed | None) -> None:
        """Serialise inode ``ino`` (``placed``: where a regular file's content is)."""
        heap, ino_of = self.heap, self.ino_of
        mtime = node.mtime_ns
        if self.clamp_ns is not None and mtime > self.clamp_ns:
            mtime = self.clamp_ns
        # The InodeRecord fields, packed straight into the table.
        size = aux = ref = count = xattr_count = xattr_ref = 0
        kind = stat.S_IFMT(node.mode)
        if kind == stat.S_IFDIR:
            names = sorted(node.children)
            aux = self.parent_of[ino]
            ref = len(heap)
            count = len(names)
            name_off = ref + DIRENT_SIZE * len(names)
            entries = bytearray()
            for name in names:
                problem = name_problem(name)
                if problem is not None:
                    raise FormatError(f"a name in the source {problem}: {name[:80]!r}")
                child = node.children[name]
                child_ino = ino_of[id(child)]
                if child.children is not None:  # a directory
                    self.parent_of[child_ino] = ino
                entries += DIRENT.pack(child_ino, len(name), name_off)
                name_off += len(name)
            heap += entries
            heap += b"".join(names)
            size = dir_size(len(names), name_off - ref - len(entries))
        elif kind == stat.S_IFREG:
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
            self.xattrs = True
            xattr_count = len(node.xattrs)
            xattr_ref = len(heap)
            heap += pack_xattrs(node.xattrs)
        self.table += INODE.pack(
            node.mode,
            self.links[id(node)],
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


class Placement:
    """Passes 2 and 3 (and 4, into ``meta``) as the hashes come in: each batch's runs
    are taken in batch order and each file is placed with its last run (so a
    forked build places files while its workers still hash, and while a streamed
    scan still goes on); inodes are serialised in inode order once :meth:`number`
    gave the numbering."""

    def __init__(self, batches: list[list[Task]], progress, chunk: int) -> None:
        self.order: list[SourceNode] | None = None  # until number()
        self.meta: Metadata | None = None
        self.chunk = chunk  # the tasks of a file: its bytes [k * chunk, (k + 1) * chunk)
        self.batches = batches  # may still grow (a streamed build)
        self.progress = progress
        self.mapped: list = []
        self.folded = 0  # batches taken
        self.hashed: dict[int, Hashed] = {}  # files with some runs in, not placed yet
        self.placed: list[Placed] = []
        self.by_content: dict[tuple, Placed] = {}
        self.of_node: dict[int, Placed] = {}
        # (id(node), start) of each task of a file whose content is stored from
        # it: where its bytes go, relative to the data region.
        self.segments: dict[tuple[int, int], list[Segment]] = {}
        self.next_block = 0
        self.at = 0  # the next inode to serialise

    def number(self, order: list[SourceNode], meta: Metadata) -> None:
        """The inodes in order (the scan is over): serialise what is placed."""
        self.order, self.meta = order, meta
        self._serialise_ready()  # a tree of empty files has no batches

    @property
    def done(self) -> bool:
        """Every inode placed and serialised."""
        return self.order is not None and self.at == len(self.order)

    def add(self, index: int, batch_runs: list) -> None:
        mapped = self.mapped
        if len(mapped) <= index:
            mapped.extend([None] * (index + 1 - len(mapped)))
        mapped[index] = batch_runs
        hashed = self.hashed
        while self.folded < len(mapped) and mapped[self.folded] is not None:
            batch = self.batches[self.folded]
            for (node, start, end), runs in zip(batch, mapped[self.folded], strict=True):
                h = hashed.get(id(node))
                if h is None:
                    h = hashed[id(node)] = Hashed()
                for first, hashes in runs:
                    h.add(first, hashes)
                if end == node.content.size:
                    self._place(node)  # its last run: files end in inode order
                if self.progress is not None:
                    self.progress(end - start)
            mapped[self.folded] = ()
            self.folded += 1
        if self.order is not None:
            self._serialise_ready()

    def _serialise_ready(self) -> None:
        order, meta, of_node = self.order, self.meta, self.of_node
        while self.at < len(order):
            node = order[self.at]
            placed = None
            if node.content is not None:
                placed = of_node.get(id(node))
                if placed is None:
                    if node.content.size:
                        break  # its hashes are not all in yet
                    placed = self._place(node)  # an empty file: no runs to wait for
            self.at += 1
            meta.add(self.at, node, placed)

    def _place(self, node: SourceNode) -> Placed:
        h = self.hashed.pop(id(node), None) or Hashed()
        hashes = b"".join(h.hashes)
        # Equal size, runs and block hashes: the same content, stored once.
        ident = (node.content.size, tuple(map(tuple, h.runs)), hashes)
        known = self.by_content.get(ident)
        if known is None:
            known = self.by_content[ident] = Placed(node.content, self.next_block, h.runs, hashes)
            self.placed.append(known)
            self.next_block += len(hashes) // HASH_SIZE
            size = node.content.size
            for start in range(0, size, self.chunk):
                task = (node, start, min(size, start + self.chunk))
                self.segments[id(node), start] = placed_segments(known, task, 0)
        self.of_node[id(node)] = known
        return known


def placed_segments(p: Placed, task: Task, data_start: int) -> list[Segment]:
    """The stored runs of ``p`` within the task's byte range [start, end), as segments
    (image offsets counted from block ``data_start``)."""
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
