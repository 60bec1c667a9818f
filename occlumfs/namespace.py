"""The namespace core: names, links and handles over a map of nodes, written once.

MemFS and SEFS keep their inodes in memory as :class:`Node` objects in a dict
by number, and differ only in how a node stores its data and what a change
must record. :class:`Namespace` implements the contract's namespace methods
(lookup, create, mkdir, link, unlink, rmdir, rename, symlink, readlink,
setattr, open/release, xattrs) once over that map; a filesystem subclasses it
and supplies the hooks below.

The node protocol: ``ino``, ``mode``, ``nlink``, ``uid``, ``gid``, ``rdev``,
the three times in nanoseconds, ``target`` (symlinks), ``xattrs``,
``open_count``, and for directories ``entries`` (name -> (ino, cookie), in
cookie order: every insert takes ``next_cookie``) and ``parent``; ``entries``
is None for anything else.

Hooks (all optional except ``_make_node``, ``_attr`` and ``_truncate``):

* ``_make_node(ino, mode, caller)`` -- a new node of the filesystem's kind;
* ``_attr(node)`` -- what ``stat`` shows of it (:func:`attr_of`: a new value each call);
* ``_truncate(node, size)`` -- cut or extend a regular file's data;
* ``_dirtied(node)`` -- the node's own fields changed;
* ``_entry_added(pnode, name, cookie)`` / ``_entry_removed(pnode, name, cookie)``;
* ``_unlinked(node)`` -- its last name went (it may still be open);
* ``_freed(node)`` -- no name and no handle: it was dropped from the map;
* ``_changed()`` -- after every change (SEFS commits on a timer from here).
"""

from __future__ import annotations

import errno
import os
import stat
import time
from types import MappingProxyType

from occlumfs.errors import FSError
from occlumfs.fs import (
    RENAME_NOREPLACE,
    ROOT_INO,
    Attr,
    AttrChanges,
    Caller,
    Filesystem,
    check_rename_target,
    check_xattr_flags,
)

MAX_NAME = 255
MAX_SYMLINK = 4095  # PATH_MAX less its NUL
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 65536

# Shared read-only empty dict: a node's xattrs (and SEFS's per-inode maps) start
# as this and get a real dict on first change, which saves memory per node.
EMPTY: dict = MappingProxyType({})  # type: ignore[assignment]


class Node:
    __slots__ = (
        "atime_ns",
        "ctime_ns",
        "entries",
        "gid",
        "ino",
        "mode",
        "mtime_ns",
        "next_cookie",
        "nlink",
        "open_count",
        "parent",
        "rdev",
        "target",
        "uid",
        "xattrs",
    )

    def __init__(self, ino: int, mode: int, uid: int = 0, gid: int = 0) -> None:
        now = time.time_ns()
        self.ino = ino
        self.mode = mode
        self.nlink = 1
        self.uid = uid
        self.gid = gid
        self.rdev = 0
        self.atime_ns = self.mtime_ns = self.ctime_ns = now
        self.parent = 0
        self.next_cookie = 1
        self.entries: dict[bytes, tuple[int, int]] | None = {} if stat.S_ISDIR(mode) else None
        self.target = b""
        self.xattrs: dict[bytes, bytes] = EMPTY
        self.open_count = 0

    @property
    def is_dir(self) -> bool:
        return self.entries is not None


def attr_of(node: Node, size: int, blocks: int) -> Attr:
    """What ``stat`` shows of ``node``: a new value each call, never the node itself."""
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


def check_name(name: bytes) -> None:
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise FSError(errno.EINVAL)
    if len(name) > MAX_NAME:
        raise FSError(errno.ENAMETOOLONG)


class Namespace(Filesystem):
    """The namespace methods of a writable filesystem whose nodes live in ``_nodes``."""

    _nodes: dict[int, Node]
    _next_ino: int
    _handles: dict[int, int]  # fh -> ino
    _next_fh: int
    _stamp_writes = True  # False once the kernel keeps regular files' times

    def kernel_keeps_file_times(self) -> None:
        self._stamp_writes = False

    # == hooks ==============================================================================
    def _make_node(self, ino: int, mode: int, caller: Caller) -> Node:
        raise NotImplementedError

    def _attr(self, node: Node) -> Attr:
        raise NotImplementedError

    def _truncate(self, node: Node, size: int) -> None:
        raise NotImplementedError

    def _dirtied(self, node: Node) -> None:
        pass

    def _entry_added(self, pnode: Node, name: bytes, cookie: int) -> None:
        pass

    def _entry_removed(self, pnode: Node, name: bytes, cookie: int) -> None:
        pass

    def _unlinked(self, node: Node) -> None:
        pass

    def _freed(self, node: Node) -> None:
        pass

    def _changed(self) -> None:
        pass

    # == helpers ============================================================================
    def _writable(self) -> None:
        if self.info.read_only:
            raise FSError(errno.EROFS)

    def _node(self, ino: int) -> Node:
        node = self._nodes.get(ino)
        if node is None:
            raise FSError(errno.ENOENT)
        return node

    def _dir(self, ino: int) -> Node:
        node = self._node(ino)
        if not node.is_dir:
            raise FSError(errno.ENOTDIR)
        return node

    def _child(self, parent: int, name: bytes) -> tuple[Node, Node]:
        pnode = self._dir(parent)
        entry = pnode.entries.get(name)
        if entry is None:
            raise FSError(errno.ENOENT)
        return pnode, self._nodes[entry[0]]

    def _handle(self, fh: int) -> Node:
        ino = self._handles.get(fh)
        if ino is None:
            raise FSError(errno.EBADF)
        return self._nodes[ino]

    def _touch(self, node: Node, mtime: bool = True) -> None:
        now = time.time_ns()
        node.ctime_ns = now
        if mtime:
            node.mtime_ns = now
        self._dirtied(node)

    def _add_entry(self, pnode: Node, name: bytes, ino: int) -> None:
        cookie = pnode.next_cookie
        pnode.entries[name] = (ino, cookie)
        pnode.next_cookie = cookie + 1
        self._entry_added(pnode, name, cookie)
        self._touch(pnode)

    def _remove_entry(self, pnode: Node, name: bytes) -> None:
        _, cookie = pnode.entries.pop(name)
        self._entry_removed(pnode, name, cookie)
        self._touch(pnode)

    def _new(self, parent: int, name: bytes, mode: int, caller: Caller) -> Node:
        self._writable()
        check_name(name)
        pnode = self._dir(parent)
        if name in pnode.entries:
            raise FSError(errno.EEXIST)
        if pnode.mode & stat.S_ISGID:
            # A setgid directory (the kernel leaves this to the filesystem, as its
            # inode_init_owner does): the new entry takes the directory's group,
            # and a new directory keeps the bit. The kernel already cleared a
            # setgid bit the caller may not set on a new file.
            caller = Caller(caller.uid, pnode.gid, caller.pid)
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        ino = self._next_ino
        self._next_ino += 1
        node = self._make_node(ino, mode, caller)
        if node.is_dir:
            node.nlink = 2
            node.parent = parent
            pnode.nlink += 1
        self._nodes[ino] = node
        self._dirtied(node)
        self._add_entry(pnode, name, ino)
        return node

    def _drop_link(self, node: Node) -> None:
        node.nlink = 0 if node.is_dir else node.nlink - 1  # a directory's "." goes with it
        self._touch(node, mtime=False)
        if node.nlink == 0:
            self._unlinked(node)
        self._maybe_free(node)

    def _maybe_free(self, node: Node) -> None:
        if node.nlink or node.open_count:
            return
        del self._nodes[node.ino]
        self._freed(node)

    def _is_ancestor(self, ino: int, of: int) -> bool:
        while True:
            if of == ino:
                return True
            if of == ROOT_INO:
                return False
            of = self._nodes[of].parent

    # == read side ==========================================================================
    def lookup(self, parent: int, name: bytes) -> Attr:
        pnode = self._dir(parent)
        if name == b"..":
            return self._attr(self._node(pnode.parent))
        if name == b".":
            return self._attr(pnode)
        entry = pnode.entries.get(name)
        if entry is None:
            raise FSError(errno.ENAMETOOLONG if len(name) > MAX_NAME else errno.ENOENT)
        return self._attr(self._nodes[entry[0]])

    def getattr(self, ino: int) -> Attr:
        return self._attr(self._node(ino))

    def readlink(self, ino: int) -> bytes:
        node = self._node(ino)
        if not stat.S_ISLNK(node.mode):
            raise FSError(errno.EINVAL)
        return node.target

    def open(self, ino: int, flags: int) -> int:
        node = self._node(ino)
        if node.is_dir:
            raise FSError(errno.EISDIR)
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if writing:
            self._writable()
            if flags & os.O_TRUNC and stat.S_ISREG(node.mode):
                self._truncate(node, 0)
                self._touch(node)
        node.open_count += 1
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = ino
        return fh

    def release(self, fh: int) -> None:
        node = self._handle(fh)
        del self._handles[fh]
        node.open_count -= 1
        self._maybe_free(node)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self._node(ino).xattrs.get(name)
        if value is None:
            raise FSError(errno.ENODATA)
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        return list(self._node(ino).xattrs)

    # == write side =========================================================================
    def setattr(self, ino: int, changes: AttrChanges, fh: int | None = None) -> Attr:
        self._writable()
        node = self._node(ino)
        if changes.size is not None:
            if node.is_dir:
                raise FSError(errno.EISDIR)
            if not stat.S_ISREG(node.mode):
                raise FSError(errno.EINVAL)
            self._truncate(node, changes.size)
            node.mtime_ns = time.time_ns()
        node.ctime_ns = time.time_ns()
        changes.apply_to(node)  # the kernel's ctime, when it keeps the file's times
        self._dirtied(node)
        self._changed()
        return self._attr(node)

    def create(
        self, parent: int, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[int, Attr]:
        node = self._new(parent, name, stat.S_IFREG | (mode & 0o7777), caller)
        fh = self.open(node.ino, flags & ~os.O_TRUNC)
        self._changed()
        return fh, self._attr(node)

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Attr:
        node = self._new(parent, name, stat.S_IFDIR | (mode & 0o7777), caller)
        self._changed()
        return self._attr(node)

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Attr:
        if not target or len(target) > MAX_SYMLINK:
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
        check_name(new_name)
        pnode = self._dir(new_parent)
        if new_name in pnode.entries:
            raise FSError(errno.EEXIST)
        if node.nlink == 0:
            raise FSError(errno.ENOENT)  # no resurrection of an unlinked inode
        self._add_entry(pnode, new_name, ino)
        node.nlink += 1
        self._touch(node, mtime=False)
        self._changed()
        return self._attr(node)

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

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        self._writable()
        if flags & ~RENAME_NOREPLACE:
            raise FSError(errno.EINVAL)
        check_name(new_name)
        opnode, src = self._child(old_parent, old_name)
        npnode = self._dir(new_parent)
        if src.is_dir and self._is_ancestor(src.ino, new_parent):
            raise FSError(errno.EINVAL)
        if src.is_dir:  # the walk up may have pushed them out of a bounded inode cache
            opnode, src = self._child(old_parent, old_name)
            npnode = self._dir(new_parent)
        existing = npnode.entries.get(new_name)
        if existing is not None:
            dst = self._nodes[existing[0]]
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
