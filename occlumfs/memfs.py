"""MemFS: an in-memory writable filesystem, the reference implementation of the contract.

Nothing persists. It exists so the contract, the FUSE adapter and the
conformance suite have one simple, obviously-correct subject, and so UnionFS
can be exercised with a scratch upper layer.
"""

from __future__ import annotations

import bisect
import errno
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from occlumfs.errors import FSError
from occlumfs.fs import (
    BLOCK_SIZE,
    RENAME_NOREPLACE,
    ROOT_INO,
    Attr,
    AttrChanges,
    Caller,
    DirEntry,
    Filesystem,
    FsInfo,
    StatFs,
    check_rename_target,
    check_xattr_flags,
)


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


@dataclass
class _Node:
    attr: Attr
    data: _SparseData = field(default_factory=_SparseData)  # regular files
    target: bytes = b""  # symlinks
    # Directories: name -> (ino, cookie). Cookies grow with every insertion, so
    # a listing resumes correctly across batches and survives removals.
    # `cookies` lists them in increasing order (removed ones included until the
    # next compaction) so that resuming at a cookie is a bisection, not a scan.
    entries: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    by_cookie: dict[int, bytes] = field(default_factory=dict)
    cookies: list[int] = field(default_factory=list)
    next_cookie: int = 1
    parent: int = ROOT_INO
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    open_count: int = 0


class MemFS(Filesystem):
    def __init__(self, name: str = "memfs") -> None:
        self.info = FsInfo(name=name, subtype="occlumfs-mem")
        now = time.time_ns()
        root = Attr(ino=ROOT_INO, mode=stat.S_IFDIR | 0o755, nlink=2)
        root.atime_ns = root.mtime_ns = root.ctime_ns = now
        self._nodes: dict[int, _Node] = {ROOT_INO: _Node(attr=root)}
        self._next_ino = ROOT_INO + 1
        self._handles: dict[int, int] = {}  # fh -> ino
        self._next_fh = 1

    # -- helpers ---------------------------------------------------------------
    def _node(self, ino: int) -> _Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise FSError(errno.ENOENT) from None

    def _dir(self, ino: int) -> _Node:
        node = self._node(ino)
        if not node.attr.is_dir:
            raise FSError(errno.ENOTDIR)
        return node

    def _child(self, parent: int, name: bytes) -> _Node:
        entry = self._dir(parent).entries.get(name)
        if entry is None:
            raise FSError(errno.ENOENT)
        return self._nodes[entry[0]]

    @staticmethod
    def _check_name(name: bytes) -> None:
        if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
            raise FSError(errno.EINVAL)
        if len(name) > 255:
            raise FSError(errno.ENAMETOOLONG)

    @staticmethod
    def _touch(attr: Attr, *, mtime: bool = True) -> None:
        now = time.time_ns()
        attr.ctime_ns = now
        if mtime:
            attr.mtime_ns = now

    def _add_entry(self, parent: _Node, name: bytes, ino: int) -> None:
        cookie = parent.next_cookie
        parent.next_cookie += 1
        parent.entries[name] = (ino, cookie)
        parent.by_cookie[cookie] = name
        parent.cookies.append(cookie)
        self._touch(parent.attr)

    def _remove_entry(self, parent: _Node, name: bytes) -> None:
        _, cookie = parent.entries.pop(name)
        del parent.by_cookie[cookie]
        if len(parent.cookies) > 2 * len(parent.entries) + 64:
            # A new list, so that a listing in progress keeps its own.
            parent.cookies = [c for c in parent.cookies if c in parent.by_cookie]
        self._touch(parent.attr)

    def _new(self, parent: int, name: bytes, mode: int, caller: Caller) -> _Node:
        self._check_name(name)
        pnode = self._dir(parent)
        if name in pnode.entries:
            raise FSError(errno.EEXIST)
        now = time.time_ns()
        ino = self._next_ino
        self._next_ino += 1
        attr = Attr(
            ino=ino,
            mode=mode,
            uid=caller.uid,
            gid=caller.gid,
            atime_ns=now,
            mtime_ns=now,
            ctime_ns=now,
        )
        node = _Node(attr=attr, parent=parent)
        if attr.is_dir:
            attr.nlink = 2
            pnode.attr.nlink += 1
        self._nodes[ino] = node
        self._add_entry(pnode, name, ino)
        return node

    def _drop_link(self, node: _Node) -> None:
        if node.attr.is_dir:
            node.attr.nlink = 0  # its "." link goes with its name
        else:
            node.attr.nlink -= 1
        self._touch(node.attr, mtime=False)
        self._maybe_free(node)

    def _maybe_free(self, node: _Node) -> None:
        if node.attr.nlink == 0 and node.open_count == 0:
            self._nodes.pop(node.attr.ino, None)

    # -- read side -------------------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> Attr:
        if name == b"..":
            return self.getattr(self._dir(parent).parent)
        if name == b".":
            return self.getattr(self._dir(parent).attr.ino)
        if len(name) > 255:
            raise FSError(errno.ENAMETOOLONG)
        return self.getattr(self._child(parent, name).attr.ino)

    def getattr(self, ino: int) -> Attr:
        node = self._node(ino)
        attr = node.attr
        if attr.is_reg:
            attr.size = node.data.size
            attr.blocks = node.data.allocated // 512
        else:
            attr.size = len(node.target) if attr.is_lnk else 0
            attr.blocks = 0
        return attr

    def readlink(self, ino: int) -> bytes:
        node = self._node(ino)
        if not node.attr.is_lnk:
            raise FSError(errno.EINVAL)
        return node.target

    def readdir(self, fh: int, offset: int) -> Iterator[DirEntry]:
        node = self._dir(fh)
        cookies = node.cookies
        for index in range(bisect.bisect_right(cookies, offset), len(cookies)):
            name = node.by_cookie.get(cookies[index])
            if name is not None:
                yield DirEntry(name, self.getattr(node.entries[name][0]), cookies[index])

    def open(self, ino: int, flags: int) -> int:
        node = self._node(ino)
        if node.attr.is_dir:
            raise FSError(errno.EISDIR)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY and node.data.size:
            node.data.clear()
            self._touch(node.attr)
        node.open_count += 1
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = ino
        return fh

    def _handle(self, fh: int) -> _Node:
        try:
            return self._nodes[self._handles[fh]]
        except KeyError:
            raise FSError(errno.EBADF) from None

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return self._handle(fh).data.read(offset, size)

    def release(self, fh: int) -> None:
        node = self._handle(fh)
        del self._handles[fh]
        node.open_count -= 1
        self._maybe_free(node)

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

    def getxattr(self, ino: int, name: bytes) -> bytes:
        try:
            return self._node(ino).xattrs[name]
        except KeyError:
            raise FSError(errno.ENODATA) from None

    def listxattr(self, ino: int) -> list[bytes]:
        return list(self._node(ino).xattrs)

    # -- write side ------------------------------------------------------------
    def setattr(self, ino: int, changes: AttrChanges, fh: int | None = None) -> Attr:
        node = self._node(ino)
        attr = node.attr
        if changes.size is not None:
            if attr.is_dir:
                raise FSError(errno.EISDIR)
            if not attr.is_reg:
                raise FSError(errno.EINVAL)
            node.data.truncate(changes.size)
            attr.mtime_ns = time.time_ns()
        changes.apply_to(attr)
        attr.ctime_ns = time.time_ns()
        return self.getattr(ino)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        node = self._handle(fh)
        node.data.write(offset, data)
        self._touch(node.attr)
        return len(data)

    def create(
        self, parent: int, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[int, Attr]:
        node = self._new(parent, name, stat.S_IFREG | (mode & 0o7777), caller)
        return self.open(node.attr.ino, flags & ~os.O_TRUNC), self.getattr(node.attr.ino)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Attr:
        if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            raise FSError(errno.EINVAL)
        if not stat.S_IFMT(mode):
            mode |= stat.S_IFREG
        node = self._new(parent, name, mode, caller)
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            node.attr.rdev = rdev
        return self.getattr(node.attr.ino)

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Attr:
        node = self._new(parent, name, stat.S_IFDIR | (mode & 0o7777), caller)
        return self.getattr(node.attr.ino)

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Attr:
        if not target:
            raise FSError(errno.ENOENT)
        node = self._new(parent, name, stat.S_IFLNK | 0o777, caller)
        node.target = bytes(target)
        return self.getattr(node.attr.ino)

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        node = self._node(ino)
        if node.attr.is_dir:
            raise FSError(errno.EPERM)
        if node.attr.nlink == 0:
            raise FSError(errno.ENOENT)
        self._check_name(new_name)
        pnode = self._dir(new_parent)
        if new_name in pnode.entries:
            raise FSError(errno.EEXIST)
        self._add_entry(pnode, new_name, ino)
        node.attr.nlink += 1
        self._touch(node.attr, mtime=False)
        return self.getattr(ino)

    def unlink(self, parent: int, name: bytes) -> None:
        node = self._child(parent, name)
        if node.attr.is_dir:
            raise FSError(errno.EISDIR)
        self._remove_entry(self._dir(parent), name)
        self._drop_link(node)

    def rmdir(self, parent: int, name: bytes) -> None:
        node = self._child(parent, name)
        if not node.attr.is_dir:
            raise FSError(errno.ENOTDIR)
        if node.entries:
            raise FSError(errno.ENOTEMPTY)
        pnode = self._dir(parent)
        self._remove_entry(pnode, name)
        pnode.attr.nlink -= 1
        self._drop_link(node)

    def _is_ancestor(self, ino: int, of: int) -> bool:
        while True:
            if of == ino:
                return True
            if of == ROOT_INO:
                return False
            of = self._nodes[of].parent

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        if flags & ~RENAME_NOREPLACE:
            raise FSError(errno.EINVAL)
        self._check_name(new_name)
        src = self._child(old_parent, old_name)
        opnode, npnode = self._dir(old_parent), self._dir(new_parent)
        if src.attr.is_dir and self._is_ancestor(src.attr.ino, new_parent):
            raise FSError(errno.EINVAL)
        existing = npnode.entries.get(new_name)
        if existing is not None:
            dst = self._nodes[existing[0]]
            if not check_rename_target(
                flags,
                same_inode=dst is src,
                src_is_dir=src.attr.is_dir,
                dst_is_dir=dst.attr.is_dir,
                dst_is_empty=not dst.entries,
            ):
                return
            if dst.attr.is_dir:
                npnode.attr.nlink -= 1
            self._remove_entry(npnode, new_name)
            self._drop_link(dst)
        self._remove_entry(opnode, old_name)
        self._add_entry(npnode, new_name, src.attr.ino)
        if src.attr.is_dir and opnode is not npnode:
            opnode.attr.nlink -= 1
            npnode.attr.nlink += 1
            src.parent = new_parent
        self._touch(src.attr, mtime=False)

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        node = self._node(ino)
        check_xattr_flags(flags, name in node.xattrs)
        node.xattrs[name] = bytes(value)
        self._touch(node.attr, mtime=False)

    def removexattr(self, ino: int, name: bytes) -> None:
        node = self._node(ino)
        if node.xattrs.pop(name, None) is None:
            raise FSError(errno.ENODATA)
        self._touch(node.attr, mtime=False)
