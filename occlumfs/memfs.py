"""MemFS: an in-memory writable filesystem, the reference implementation of the contract.

Nothing persists. It exists so the contract, the FUSE adapter and the
conformance suite have one simple, obviously-correct subject, and so UnionFS
can be exercised with a scratch upper layer.
"""

from __future__ import annotations

import bisect
import errno
import stat
from collections.abc import Iterator

from occlumfs.errors import FSError
from occlumfs.fs import BLOCK_SIZE, ROOT_INO, Attr, Caller, DirEntry, FsInfo, StatFs
from occlumfs.namespace import Namespace, Node, attr_of


class _SparseData:
    """File contents as a map of 4 KiB blocks: holes cost nothing, so a file of
    terabytes with a few written blocks is a few blocks of memory."""

    __slots__ = ("blocks", "size")

    def __init__(self) -> None:
        self.blocks: dict[int, bytearray] = {}
        self.size = 0

    def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        out = bytearray(end - offset)
        first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        for index in range(first, last + 1):
            block = self.blocks.get(index)
            if block is None:
                continue  # a hole: already zeros in `out`
            base = index * BLOCK_SIZE
            lo, hi = max(offset, base), min(end, base + BLOCK_SIZE)
            out[lo - offset : hi - offset] = block[lo - base : hi - base]
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        view = memoryview(data)
        pos = offset
        while pos < end:
            index, within = divmod(pos, BLOCK_SIZE)
            take = min(BLOCK_SIZE - within, end - pos)
            block = self.blocks.get(index)
            if block is None:
                block = self.blocks[index] = bytearray(BLOCK_SIZE)
            block[within : within + take] = view[pos - offset : pos - offset + take]
            pos += take
        self.size = max(self.size, end)

    def truncate(self, size: int) -> None:
        if size < self.size:
            # Blocks wholly past the end go; the tail of the last one is zeroed
            # so that growing again later reads zeros, not stale bytes.
            keep = -(-size // BLOCK_SIZE)
            for index in [i for i in self.blocks if i >= keep]:
                del self.blocks[index]
            within = size % BLOCK_SIZE
            tail = self.blocks.get(size // BLOCK_SIZE)
            if within and tail is not None:
                tail[within:] = bytes(BLOCK_SIZE - within)
        self.size = size

    def clear(self) -> None:
        self.blocks.clear()
        self.size = 0

    @property
    def allocated(self) -> int:
        return len(self.blocks) * BLOCK_SIZE


class _Node(Node):
    """A node (occlumfs.namespace) with its data, and a directory's cookie index:
    ``cookies`` lists its entries' cookies in increasing order (removed ones
    included until the next compaction) so that resuming a listing at a cookie
    is a bisection, not a scan; ``by_cookie`` maps them back to names."""

    __slots__ = ("by_cookie", "cookies", "data")

    def __init__(self, ino: int, mode: int, uid: int = 0, gid: int = 0) -> None:
        Node.__init__(self, ino, mode, uid, gid)
        self.data = _SparseData()  # regular files
        self.by_cookie: dict[int, bytes] = {}
        self.cookies: list[int] = []


class MemFS(Namespace):
    def __init__(self, name: str = "memfs") -> None:
        self.info = FsInfo(name=name, subtype="occlumfs-mem")
        root = _Node(ROOT_INO, stat.S_IFDIR | 0o755)
        root.nlink = 2
        root.parent = ROOT_INO
        self._nodes: dict[int, _Node] = {ROOT_INO: root}  # type: ignore[assignment]
        self._next_ino = ROOT_INO + 1
        self._handles: dict[int, int] = {}  # fh -> ino
        self._next_fh = 1

    # -- namespace hooks (occlumfs.namespace) ------------------------------------
    def _make_node(self, ino: int, mode: int, caller: Caller) -> _Node:
        return _Node(ino, mode, caller.uid, caller.gid)

    def _attr(self, node: _Node) -> Attr:
        if stat.S_ISREG(node.mode):
            size, blocks = node.data.size, node.data.allocated // 512
        else:
            size, blocks = len(node.target), 0
        return attr_of(node, size, blocks)

    def _truncate(self, node: _Node, size: int) -> None:
        node.data.truncate(size)

    def _entry_added(self, pnode: _Node, name: bytes, cookie: int) -> None:
        pnode.by_cookie[cookie] = name
        pnode.cookies.append(cookie)

    def _entry_removed(self, pnode: _Node, name: bytes, cookie: int) -> None:
        del pnode.by_cookie[cookie]
        if len(pnode.cookies) > 2 * len(pnode.entries) + 64:
            # A new list, so that a listing in progress keeps its own.
            pnode.cookies = [c for c in pnode.cookies if c in pnode.by_cookie]

    # -- the rest of the contract ------------------------------------------------
    def readdir(self, fh: int, offset: int) -> Iterator[DirEntry]:
        node = self._dir(fh)
        cookies = node.cookies
        for index in range(bisect.bisect_right(cookies, offset), len(cookies)):
            name = node.by_cookie.get(cookies[index])
            if name is not None:
                yield DirEntry(name, self.getattr(node.entries[name][0]), cookies[index])

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return self._handle(fh).data.read(offset, size)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        node = self._handle(fh)
        node.data.write(offset, data)
        if self._stamp_writes:  # else the kernel keeps the times
            self._touch(node)
        return len(data)

    def statfs(self) -> StatFs:
        used = sum(n.data.allocated for n in self._nodes.values()) // BLOCK_SIZE
        total = max(used * 2, 1 << 18)
        return StatFs(
            blocks=total,
            bfree=total - used,
            bavail=total - used,
            files=len(self._nodes) + (1 << 20),
            ffree=1 << 20,
        )

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Attr:
        if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            raise FSError(errno.EINVAL)
        if not stat.S_IFMT(mode):
            mode |= stat.S_IFREG
        node = self._new(parent, name, mode, caller)
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            node.rdev = rdev
        return self._attr(node)
