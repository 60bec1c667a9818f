"""SefsFS: the writable, encrypted, tamper- and rollback-evident filesystem object.

The whole metadata (inodes, directory entries, block maps) is held in memory
and persisted as records spread over encrypted pages; file data stays on the
host and is read and decrypted per request. See docs/formats/sefs.md for the
layout and the commit protocol. The work is shared out by room:

* :mod:`occlumfs.sefs.inode` -- the in-memory inode;
* :mod:`occlumfs.sefs.load` -- head, root and pages into inodes, at open;
* :mod:`occlumfs.sefs.pages` -- the page table: records, pages and the commit;
* :mod:`occlumfs.sefs.blocks` -- file data: buffering, block crypto, host I/O;
* this module -- the contract (:class:`occlumfs.fs.Filesystem`): names,
  attributes, handles, and when to commit.

A directory's ``entries`` dict is in cookie order (every insert takes the
next cookie and goes to the end), so a listing resumes by bisection.
"""

from __future__ import annotations

import bisect
import errno
import os
import stat
import time
from collections.abc import Iterator

from occlumfs.errors import FSError
from occlumfs.fs import (
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
from occlumfs.sefs import format as fmt
from occlumfs.sefs.blocks import BlockIO
from occlumfs.sefs.format import BLOCK_SIZE
from occlumfs.sefs.inode import EMPTY, Inode, RecordedInode
from occlumfs.sefs.keys import Keys
from occlumfs.sefs.load import load, remove_leftovers
from occlumfs.sefs.pages import PageTable
from occlumfs.sefs.state import DirLock, TrustedState
from occlumfs.sefs.storage import Storage

COMMIT_INTERVAL = 10.0  # seconds a change may wait for a commit unless fsync asks sooner
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 65536


class _DirHandle:
    __slots__ = ("cookies", "ino", "names", "stamp")

    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.stamp = -1
        self.cookies: list[int] = []
        self.names: list[bytes] = []


class SefsFS(Filesystem):
    """A mounted (or offline-opened) SEFS directory."""

    def __init__(
        self,
        storage: Storage,
        keys: Keys,
        *,
        name: str = "sefs",
        read_only: bool = False,
        trusted_state: TrustedState | None = None,
        lock: DirLock | None = None,
        tolerant: bool = False,
        commit_interval: float = COMMIT_INTERVAL,
        _new: bool = False,
    ) -> None:
        self.info = FsInfo(name=name, subtype="occlumfs-sefs", read_only=read_only)
        self.storage = storage
        self.read_only = read_only
        self.problems: list[tuple[int | None, str]] = []  # (ino, what), found in tolerant mode
        self._state = trusted_state
        self._lock = lock
        self._commit_interval = commit_interval
        self._inodes: dict[int, Inode] = {}
        self._pages = PageTable(storage, keys.meta, keys.head_mac, keys.fs_id, self._inodes)
        self._dirty_keys = self._pages.dirty
        self._io = BlockIO(
            storage, keys.data, keys.fs_id, self._inodes, self._dirty_keys, self.path_of
        )
        self._next_ino = ROOT_INO + 1
        self._handles: dict[int, int] = {}
        self._dir_handles: dict[int, _DirHandle] = {}
        self._next_fh = 1
        self._last_commit = time.monotonic()
        if _new:
            root = Inode(ROOT_INO, stat.S_IFDIR | 0o755)
            root.nlink = 2
            root.parent = ROOT_INO
            self._inodes[ROOT_INO] = root
            self._dirty_keys.add(fmt.inode_key(ROOT_INO))
        else:
            self._next_ino = load(
                self._pages,
                self._inodes,
                keys,
                state=trusted_state,
                tolerant=tolerant,
                problems=self.problems,
            )
            if not read_only and not tolerant:
                remove_leftovers(self._pages, self._inodes)

    # == lifecycle ==========================================================================
    def started_serving(self) -> None:
        if self._lock is not None:
            self._lock.write_pid()

    def close(self) -> None:
        try:
            if not self.read_only:
                self.commit()
        finally:
            self.storage.close()
            if self._lock is not None:
                self._lock.release()

    # == committing =========================================================================
    def commit(self) -> None:
        """Make every change so far durable under a new root (docs/formats/sefs.md)."""
        if self.read_only:
            return
        self._io.flush_all()
        if not self._dirty_keys:
            return
        self._io.sync_written()
        self._pages.commit(self._next_ino)
        self._io.committed()
        self._last_commit = time.monotonic()
        if self._state is not None:
            self._state.update(self._pages.counter, self._pages.root_tag)
        self._pages.discard_dead_packs()
        self._io.discard_doomed()

    def _changed(self) -> None:
        """After a change: commit when changes have waited long enough."""
        if time.monotonic() - self._last_commit >= self._commit_interval:
            self.commit()

    # == offline inspection (fsck) ==========================================================
    def path_of(self, ino: int) -> str:
        """A path of ``ino`` for messages (a search: only used when reporting)."""
        if ino == ROOT_INO:
            return "/"
        for parent in self._inodes.values():
            if parent.is_dir:
                for name, (child, _) in parent.entries.items():
                    if child == ino:
                        head = self.path_of(parent.ino) if parent.ino != ROOT_INO else ""
                        return f"{head}/{os.fsdecode(name)}"
        return f"<inode {ino}, unlinked>"

    def recorded(self) -> dict[int, RecordedInode]:
        """Every inode as its records state it, by number: a snapshot for fsck."""
        return {
            ino: RecordedInode(
                ino,
                node.mode,
                node.nlink,
                node.parent,
                node.target,
                tuple((name, child) for name, (child, _) in node.entries.items())
                if node.is_dir
                else (),
            )
            for ino, node in sorted(self._inodes.items())
        }

    def verify_file(self, ino: int) -> Iterator[str]:
        """Problems with ``ino``'s stored blocks (fsck): each one line."""
        return self._io.verify(self._inodes[ino])

    # == read side =========================================================================
    def _node(self, ino: int) -> Inode:
        node = self._inodes.get(ino)
        if node is None:
            raise FSError(errno.ENOENT)
        return node

    def _dir(self, ino: int) -> Inode:
        node = self._node(ino)
        if not node.is_dir:
            raise FSError(errno.ENOTDIR)
        return node

    def _attr(self, node: Inode) -> Attr:
        if node.entries is not None:
            size = 0
            blocks = 0
        elif node.target:
            size = len(node.target)
            blocks = 0
        else:
            size = node.size
            extra = sum(1 for b in node.dirty if not node.slot(b)) if node.dirty else 0
            blocks = (node.present + extra) * (BLOCK_SIZE // 512)
        return Attr(
            ino=node.ino,
            mode=node.mode,
            nlink=node.nlink,
            uid=node.uid,
            gid=node.gid,
            size=size,
            rdev=node.rdev,
            blocks=blocks,
            atime_ns=node.atime_ns,
            mtime_ns=node.mtime_ns,
            ctime_ns=node.ctime_ns,
        )

    def lookup(self, parent: int, name: bytes) -> Attr:
        pnode = self._dir(parent)
        if name == b"..":
            return self._attr(self._node(pnode.parent))
        if name == b".":
            return self._attr(pnode)
        entry = pnode.entries.get(name)
        if entry is None:
            raise FSError(errno.ENAMETOOLONG if len(name) > 255 else errno.ENOENT)
        return self._attr(self._inodes[entry[0]])

    def getattr(self, ino: int) -> Attr:
        return self._attr(self._node(ino))

    def readlink(self, ino: int) -> bytes:
        node = self._node(ino)
        if not stat.S_ISLNK(node.mode):
            raise FSError(errno.EINVAL)
        return node.target

    def opendir(self, ino: int) -> int:
        self._dir(ino)
        fh = self._next_fh
        self._next_fh += 1
        self._dir_handles[fh] = _DirHandle(ino)
        return fh

    def readdir(self, fh: int, offset: int) -> Iterator[DirEntry]:
        handle = self._dir_handles.get(fh)
        if handle is None:
            raise FSError(errno.EBADF)
        node = self._inodes.get(handle.ino)
        if node is None or not node.is_dir:
            return
        entries = node.entries
        if handle.stamp != node.next_cookie:
            # Entries were added since the last snapshot (removals need none: they are
            # skipped below). Cookie order is dict order, so the lists are sorted.
            handle.names = list(entries)
            handle.cookies = [cookie for _, cookie in entries.values()]
            handle.stamp = node.next_cookie
        names, cookies = handle.names, handle.cookies
        for i in range(bisect.bisect_right(cookies, offset), len(names)):
            entry = entries.get(names[i])
            if entry is None or entry[1] != cookies[i]:
                continue
            yield DirEntry(names[i], self._attr(self._inodes[entry[0]]), entry[1])

    def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    def open(self, ino: int, flags: int) -> int:
        node = self._node(ino)
        if node.is_dir:
            raise FSError(errno.EISDIR)
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if writing and self.read_only:
            raise FSError(errno.EROFS)
        if writing and flags & os.O_TRUNC and stat.S_ISREG(node.mode):
            self._io.truncate(node, 0)
            node.mtime_ns = node.ctime_ns = time.time_ns()
            self._dirty_keys.add(fmt.inode_key(ino))
        node.open_count += 1
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = ino
        return fh

    def _handle(self, fh: int) -> Inode:
        ino = self._handles.get(fh)
        if ino is None:
            raise FSError(errno.EBADF)
        return self._inodes[ino]

    def read(self, fh: int, offset: int, size: int) -> bytes:
        ino = self._handles.get(fh)
        if ino is None:
            raise FSError(errno.EBADF)
        node = self._inodes[ino]
        end = offset + size
        if end > node.size:
            end = node.size
        if offset >= end:
            return b""
        first = offset // BLOCK_SIZE
        last = (end - 1) // BLOCK_SIZE
        data = self._io.read(node, first, last)
        start = offset - first * BLOCK_SIZE
        if start == 0 and len(data) == end - offset:
            return data
        return bytes(memoryview(data)[start : start + end - offset])

    def release(self, fh: int) -> None:
        node = self._handle(fh)
        del self._handles[fh]
        node.open_count -= 1
        self._maybe_free(node)

    def statfs(self) -> StatFs:
        host = self.storage.statvfs()
        files = len(self._inodes)
        if host is None:
            total = 1 << 20
            return StatFs(
                blocks=total, bfree=total, bavail=total, files=files + (1 << 20), ffree=1 << 20
            )
        scale = host.f_frsize / BLOCK_SIZE
        ffree = host.f_ffree if host.f_files else 1 << 20
        return StatFs(
            blocks=int(host.f_blocks * scale),
            bfree=int(host.f_bfree * scale),
            bavail=int(host.f_bavail * scale),
            files=files + ffree,
            ffree=ffree,
        )

    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self._node(ino).xattrs.get(name)
        if value is None:
            raise FSError(errno.ENODATA)
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        return list(self._node(ino).xattrs)

    # == write side ========================================================================
    def _writable(self) -> None:
        if self.read_only:
            raise FSError(errno.EROFS)

    def _touch(self, node: Inode, mtime: bool = True) -> None:
        now = time.time_ns()
        node.ctime_ns = now
        if mtime:
            node.mtime_ns = now
        self._dirty_keys.add(fmt.inode_key(node.ino))

    def write(self, fh: int, offset: int, data: bytes) -> int:
        self._writable()
        node = self._handle(fh)
        size = len(data)
        if size == 0:
            return 0
        self._io.write(node, offset, data)
        if offset + size > node.size:
            node.size = offset + size
        self._touch(node)
        self._changed()
        return size

    def setattr(self, ino: int, changes: AttrChanges, fh: int | None = None) -> Attr:
        self._writable()
        node = self._node(ino)
        if changes.size is not None:
            if node.is_dir:
                raise FSError(errno.EISDIR)
            if not stat.S_ISREG(node.mode):
                raise FSError(errno.EINVAL)
            self._io.truncate(node, changes.size)
            node.mtime_ns = time.time_ns()
        changes.apply_to(node)
        node.ctime_ns = time.time_ns()
        self._dirty_keys.add(fmt.inode_key(ino))
        self._changed()
        return self._attr(node)

    def fsync(self, fh: int, datasync: bool) -> None:
        self.commit()

    def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.commit()

    @staticmethod
    def _check_name(name: bytes) -> None:
        if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
            raise FSError(errno.EINVAL)
        if len(name) > 255:
            raise FSError(errno.ENAMETOOLONG)

    def _add_entry(self, pnode: Inode, name: bytes, ino: int) -> None:
        pnode.entries[name] = (ino, pnode.next_cookie)
        pnode.next_cookie += 1
        self._dirty_keys.add(fmt.entry_key(pnode.ino, name))
        self._touch(pnode)

    def _remove_entry(self, pnode: Inode, name: bytes) -> None:
        del pnode.entries[name]
        self._dirty_keys.add(fmt.entry_key(pnode.ino, name))
        self._touch(pnode)

    def _new(self, parent: int, name: bytes, mode: int, caller: Caller) -> Inode:
        self._writable()
        self._check_name(name)
        pnode = self._dir(parent)
        if name in pnode.entries:
            raise FSError(errno.EEXIST)
        ino = self._next_ino
        self._next_ino += 1
        node = Inode(ino, mode, caller.uid, caller.gid)
        if node.is_dir:
            node.nlink = 2
            node.parent = parent
            pnode.nlink += 1
        self._inodes[ino] = node
        self._dirty_keys.add(fmt.inode_key(ino))
        self._add_entry(pnode, name, ino)
        return node

    def _drop_link(self, node: Inode) -> None:
        node.nlink = 0 if node.is_dir else node.nlink - 1
        self._touch(node, mtime=False)
        if node.nlink == 0:
            # Its records leave the committed tree with the next commit.
            for c in node.chunks:
                self._dirty_keys.add(fmt.map_key(node.ino, c))
        self._maybe_free(node)

    def _maybe_free(self, node: Inode) -> None:
        if node.nlink or node.open_count:
            return
        del self._inodes[node.ino]
        self._io.forget(node)

    def create(
        self, parent: int, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[int, Attr]:
        node = self._new(parent, name, stat.S_IFREG | (mode & 0o7777), caller)
        fh = self.open(node.ino, flags & ~os.O_TRUNC)
        self._changed()
        return fh, self._attr(node)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Attr:
        if stat.S_IFMT(mode) not in (
            stat.S_IFREG,
            stat.S_IFIFO,
            stat.S_IFCHR,
            stat.S_IFBLK,
            stat.S_IFSOCK,
        ):
            raise FSError(errno.EINVAL)
        node = self._new(parent, name, mode, caller)
        node.rdev = rdev
        self._changed()
        return self._attr(node)

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Attr:
        node = self._new(parent, name, stat.S_IFDIR | (mode & 0o7777), caller)
        self._changed()
        return self._attr(node)

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Attr:
        if not target or len(target) > 4095:
            raise FSError(errno.ENAMETOOLONG if target else errno.ENOENT)
        node = self._new(parent, name, stat.S_IFLNK | 0o777, caller)
        node.target = bytes(target)
        self._changed()
        return self._attr(node)

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        self._writable()
        node = self._node(ino)
        if node.is_dir:
            raise FSError(errno.EPERM)
        self._check_name(new_name)
        pnode = self._dir(new_parent)
        if new_name in pnode.entries:
            raise FSError(errno.EEXIST)
        if node.nlink == 0:
            raise FSError(errno.ENOENT)
        self._add_entry(pnode, new_name, ino)
        node.nlink += 1
        self._touch(node, mtime=False)
        for c in node.chunks:
            self._dirty_keys.add(fmt.map_key(ino, c))
        self._changed()
        return self._attr(node)

    def _child(self, parent: int, name: bytes) -> tuple[Inode, Inode]:
        pnode = self._dir(parent)
        entry = pnode.entries.get(name)
        if entry is None:
            raise FSError(errno.ENOENT)
        return pnode, self._inodes[entry[0]]

    def unlink(self, parent: int, name: bytes) -> None:
        self._writable()
        pnode, node = self._child(parent, name)
        if node.is_dir:
            raise FSError(errno.EISDIR)
        self._remove_entry(pnode, name)
        self._drop_link(node)
        self._changed()

    def rmdir(self, parent: int, name: bytes) -> None:
        self._writable()
        pnode, node = self._child(parent, name)
        if not node.is_dir:
            raise FSError(errno.ENOTDIR)
        if node.entries:
            raise FSError(errno.ENOTEMPTY)
        self._remove_entry(pnode, name)
        pnode.nlink -= 1
        self._drop_link(node)
        self._changed()

    def _is_ancestor(self, ino: int, of: int) -> bool:
        while True:
            if of == ino:
                return True
            if of == ROOT_INO:
                return False
            of = self._inodes[of].parent

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        self._writable()
        if flags & ~RENAME_NOREPLACE:
            raise FSError(errno.EINVAL)
        self._check_name(new_name)
        opnode, src = self._child(old_parent, old_name)
        npnode = self._dir(new_parent)
        if src.is_dir and self._is_ancestor(src.ino, new_parent):
            raise FSError(errno.EINVAL)
        existing = npnode.entries.get(new_name)
        if existing is not None:
            dst = self._inodes[existing[0]]
            if not check_rename_target(
                flags,
                same_inode=dst is src,
                src_is_dir=src.is_dir,
                dst_is_dir=dst.is_dir,
                dst_is_empty=not dst.entries,
            ):
                return
            if dst.is_dir:
                npnode.nlink -= 1
            self._remove_entry(npnode, new_name)
            self._drop_link(dst)
        self._remove_entry(opnode, old_name)
        self._add_entry(npnode, new_name, src.ino)
        if src.is_dir and opnode is not npnode:
            opnode.nlink -= 1
            npnode.nlink += 1
            src.parent = new_parent
        self._touch(src, mtime=False)
        self._changed()

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self._writable()
        node = self._node(ino)
        if not name or len(name) > MAX_XATTR_NAME:
            raise FSError(errno.ERANGE)
        if len(value) > MAX_XATTR_VALUE:
            raise FSError(errno.E2BIG)
        check_xattr_flags(flags, name in node.xattrs)
        if node.xattrs is EMPTY:
            node.xattrs = {}
        node.xattrs[bytes(name)] = bytes(value)
        self._touch(node, mtime=False)
        self._changed()

    def removexattr(self, ino: int, name: bytes) -> None:
        self._writable()
        node = self._node(ino)
        if name not in node.xattrs:
            raise FSError(errno.ENODATA)
        del node.xattrs[name]
        self._touch(node, mtime=False)
        self._changed()
