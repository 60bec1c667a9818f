"""The union's write side: every change lands in the upper (docs/unionfs.md).

* New names go to the upper; a name created over a whiteout replaces it (a
  directory made there is opaque, so the deleted lower one stays deleted).
* Removing a name that a lower shows leaves a whiteout in the upper.
* Renaming an entry that lives below copies only it (a directory without its
  contents) into the upper at the new name, records where a directory's lower
  contents are (a redirect) and leaves a whiteout at the old name.
"""

from __future__ import annotations

import errno
import os
import stat

from occlumfs.errors import FSError
from occlumfs.fs import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_INO,
    Attr,
    AttrChanges,
    Caller,
    check_rename_target,
)
from occlumfs.unionfs import layers as L
from occlumfs.unionfs.nodes import FileHandle, Node


class UnionChanges:
    """Mixin of :class:`occlumfs.unionfs.fs.UnionFS`: the operations that change it."""

    # -- helpers --------------------------------------------------------------------------
    def _maybe(self, pnode, name: bytes):
        """The node at ``name`` in ``pnode``, or None."""
        try:
            return self._resolve(pnode, name)
        except FSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise

    def _check_new_name(self, pnode, name: bytes) -> None:
        if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
            raise FSError(errno.EINVAL)
        if len(name) > 255:
            raise FSError(errno.ENAMETOOLONG)
        if pnode.ino == ROOT_INO and name == L.PRIVATE_DIR:
            raise FSError(errno.EPERM, "the union reserves this name for itself")

    def _lower_shows(self, pnode, name: bytes) -> list:
        """The lower entries at ``name`` under ``pnode`` (none when the upper hides them)."""
        return self._lower_child(pnode.stack, name)[0]

    def _prepare_new(self, parent: int, name: bytes) -> tuple:
        """For a new entry: (parent node, its upper dir, whether a whiteout is in the way)."""
        self._writable()
        pnode = self._dir_node(parent)
        self._check_new_name(pnode, name)
        if self._maybe(pnode, name) is not None:
            raise FSError(errno.EEXIST)
        parent_upper = self.upper_dir(pnode)
        return pnode, parent_upper, self._upper_lookup(parent_upper, name) is not None

    def _make(self, parent: int, name: bytes, make, *, is_dir: bool = False) -> Attr:
        """Create an entry with ``make(upper_parent, name)``, over a whiteout if one is there."""
        pnode, parent_upper, whiteout = self._prepare_new(parent, name)
        if not whiteout:
            made = make(parent_upper, name)
            if made.nlink > 1 and not made.is_dir:  # a link: it shows an existing node
                return self._attr(self._resolve(pnode, name))
            # Nothing below shows at this name: the new entry is upper-only.
            node = Node(made.ino, made.is_dir, pnode.ino, name, upper=made.ino)
            node.lower_path = pnode.lower_path + b"/" + name
            return self._attr(self._remember(node))
        # Build it aside, then put it in the whiteout's place: one rename for a
        # file; a directory (opaque if a lower one is hidden there) needs the
        # whiteout gone first, so both land in one commit.
        work, tmp = self._work_dir(), self._tmp_name()
        made = make(work, tmp)
        if not is_dir:
            self.upper.rename(work, tmp, parent_upper, name)
            return self._attr(self._resolve(pnode, name))
        if self._lower_shows_dir_below(pnode, name):
            self.upper.setxattr(made.ino, L.OPAQUE_XATTR, b"y")
        with self._upper_transaction():
            self.upper.unlink(parent_upper, name)
            self.upper.rename(work, tmp, parent_upper, name)
        return self._attr(self._resolve(pnode, name))

    def _lower_shows_dir_below(self, pnode, name: bytes) -> bool:
        """Whether a lower directory sits at ``name``, hidden only by the upper."""
        found, _ = self._lower_child(pnode.stack, name)
        return bool(found) and found[0][1].is_dir

    def _whiteout(self, parent_upper: int, name: bytes) -> None:
        self.upper.mknod(parent_upper, name, stat.S_IFCHR, 0, Caller())

    def _forget_name(self, node) -> None:
        """``node`` lost the name it was last seen under."""
        if node.is_dir:
            self._nodes.pop(node.ino, None)
        elif node.upper is None:
            # Still open maybe, or changed by the kernel flushing its times:
            # a copy-up now must not bring the name back (see copy_up_meta).
            node.name = None

    # -- attributes -----------------------------------------------------------------------
    def setattr(self, ino: int, changes: AttrChanges, fh: int | None = None) -> Attr:
        self._writable()
        node = self._node(ino)
        if changes.size is not None and not node.is_dir:
            self.copy_up_data(node, limit=changes.size)
        else:
            self.copy_up_meta(node)
        self.upper.setattr(node.upper, changes)
        return self._attr(node)

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self._writable()
        if L.is_private_xattr(name):
            raise FSError(errno.EPERM, "the union reserves this xattr name")
        node = self._node(ino)
        self.upper.setxattr(self.copy_up_meta(node), name, value, flags)

    def removexattr(self, ino: int, name: bytes) -> None:
        self._writable()
        if L.is_private_xattr(name):
            raise FSError(errno.ENODATA)
        node = self._node(ino)
        fs, lino = self._meta_source(node)
        fs.getxattr(lino, name)  # ENODATA before any copy-up
        self.upper.removexattr(self.copy_up_meta(node), name)

    # -- data -----------------------------------------------------------------------------
    def write(self, fh: int, offset: int, data: bytes) -> int:
        self._writable()
        handle = self._handle(fh, FileHandle)
        if handle.layer >= 0:
            raise FSError(errno.EBADF)
        return self.upper.write(handle.fh, offset, data)

    def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handle(fh, FileHandle)
        if handle.layer < 0:
            self.upper.fsync(handle.fh, datasync)

    def fsyncdir(self, fh: int, datasync: bool) -> None:
        if not self.read_only:
            self.upper.fsyncdir(0, datasync)

    # -- new entries ----------------------------------------------------------------------
    def create(
        self, parent: int, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[int, Attr]:
        attr = self._counted(
            self._make(
                parent,
                name,
                lambda p, n: self.upper.mknod(p, n, stat.S_IFREG | (mode & 0o7777), 0, caller),
            )
        )
        return self.open(attr.ino, flags & ~(os.O_TRUNC | os.O_EXCL)), attr

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Attr:
        if stat.S_ISCHR(mode) and rdev == 0:
            # That is how the union spells a whiteout; it cannot also be a user's file.
            raise FSError(errno.EPERM, "a 0/0 character device is a whiteout in a union")
        return self._counted(
            self._make(parent, name, lambda p, n: self.upper.mknod(p, n, mode, rdev, caller))
        )

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Attr:
        return self._counted(
            self._make(parent, name, lambda p, n: self.upper.mkdir(p, n, mode, caller), is_dir=True)
        )

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Attr:
        return self._counted(
            self._make(parent, name, lambda p, n: self.upper.symlink(p, n, target, caller))
        )

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        self._writable()
        node = self._node(ino)
        if node.is_dir:
            raise FSError(errno.EPERM)
        upper_ino = self.copy_up_meta(node)
        self._make(new_parent, new_name, lambda p, n: self.upper.link(upper_ino, p, n))
        return self._counted(self._attr(node))

    # -- removal --------------------------------------------------------------------------
    def unlink(self, parent: int, name: bytes) -> None:
        self._remove(parent, name, want_dir=False)

    def rmdir(self, parent: int, name: bytes) -> None:
        self._remove(parent, name, want_dir=True)

    def _remove(self, parent: int, name: bytes, *, want_dir: bool) -> None:
        self._writable()
        pnode = self._dir_node(parent)
        node = self._resolve(pnode, name)
        if node.is_dir != want_dir:
            raise FSError(errno.ENOTDIR if want_dir else errno.EISDIR)
        if want_dir and not self._is_empty(node):
            raise FSError(errno.ENOTEMPTY)
        below = self._lower_shows(pnode, name)
        parent_upper = self.upper_dir(pnode)
        if self._drops_lower_link(node, parent_upper, name):
            with self._upper_transaction():
                self.count_gone(node)
                self._whiteout(parent_upper, name)
        elif want_dir and node.upper is not None:
            if below or not self._upper_dir_empty(node.upper):
                with self._upper_transaction():
                    self._remove_upper_tree(node.upper)  # only whiteouts are left in it
                    self.upper.rmdir(parent_upper, name)
                    if below:
                        self._whiteout(parent_upper, name)
            else:
                self.upper.rmdir(parent_upper, name)
        elif self._upper_lookup(parent_upper, name) is None:
            self._whiteout(parent_upper, name)  # a lower-only name: below is not empty
        elif below:
            # One step: a whiteout replaces the file.
            work, tmp = self._work_dir(), self._tmp_name()
            self._whiteout(work, tmp)
            self.upper.rename(work, tmp, parent_upper, name)
        else:
            self.upper.unlink(parent_upper, name)
        self._forget_name(node)

    def _upper_dir_empty(self, ino: int) -> bool:
        fh = self.upper.opendir(ino)
        try:
            return next(iter(self.upper.readdir(fh, 0)), None) is None
        finally:
            self.upper.releasedir(fh)

    def _drops_lower_link(self, node, parent_upper: int, name: bytes) -> bool:
        """Whether hiding lower name ``name`` takes a link from a hard-linked lower
        file; if so its copy is made ready (the caller counts the link gone)."""
        if node.is_dir or self._upper_lookup(parent_upper, name) is not None:
            return False
        if node.indexed or (node.upper is None and self._attr(node).nlink > 1):
            self.copy_up_meta(node)
            return True
        return False

    def _is_empty(self, node) -> bool:
        fh = self.opendir(node.ino)
        try:
            return next(iter(self.readdir(fh, 0)), None) is None
        finally:
            self.releasedir(fh)

    # -- rename ---------------------------------------------------------------------------
    def _is_ancestor(self, ino: int, of) -> bool:
        while True:
            if of.ino == ino:
                return True
            if of.ino == ROOT_INO:
                return False
            of = self._nodes[of.parent]

    def _needs_marks(self, node, new_pnode, new_name: bytes) -> bool:
        """Whether moving directory ``node`` to ``new_name`` needs a mark (see _mark_moved)."""
        return bool(node.stack) or self._lower_shows_dir_below(new_pnode, new_name)

    def _mark_moved(self, node) -> None:
        """Mark a directory about to live under another name: its lower
        contents follow it (a redirect); without any, lower directories at its
        new name must not merge in (opaque)."""
        marks = self._private_xattrs(node.upper)
        if node.stack:
            if L.REDIRECT_XATTR not in marks:
                self.upper.setxattr(node.upper, L.REDIRECT_XATTR, node.lower_path)
        elif marks.get(L.OPAQUE_XATTR) != b"y":
            self.upper.setxattr(node.upper, L.OPAQUE_XATTR, b"y")

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        self._writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
            RENAME_NOREPLACE | RENAME_EXCHANGE
        ):
            raise FSError(errno.EINVAL)  # RENAME_WHITEOUT included, as on overlayfs
        opnode, npnode = self._dir_node(old_parent), self._dir_node(new_parent)
        self._check_new_name(npnode, new_name)
        src = self._resolve(opnode, old_name)
        dst = self._maybe(npnode, new_name)
        if src.is_dir and self._is_ancestor(src.ino, npnode):
            raise FSError(errno.EINVAL)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise FSError(errno.ENOENT)
            if dst.is_dir and self._is_ancestor(dst.ino, opnode):
                raise FSError(errno.EINVAL)
            self._exchange(opnode, old_name, src, npnode, new_name, dst)
            return
        if dst is not None and not check_rename_target(
            flags,
            same_inode=dst.ino == src.ino,
            src_is_dir=src.is_dir,
            dst_is_dir=dst.is_dir,
            dst_is_empty=dst.is_dir and self._is_empty(dst),
        ):
            return
        old_below = self._lower_shows(opnode, old_name)
        self.copy_up_meta(src)
        old_upper = self.upper_dir(opnode)
        new_upper = self.upper_dir(npnode)
        dst_link = dst is not None and self._drops_lower_link(dst, new_upper, new_name)
        place = src.indexed and self._upper_lookup(old_upper, old_name) is None
        in_way = self._upper_lookup(new_upper, new_name)
        marks = src.is_dir and self._needs_marks(src, npnode, new_name)
        if in_way is None and not (old_below or marks or place or dst_link):
            self.upper.rename(old_upper, old_name, new_upper, new_name)  # one step
        else:
            with self._upper_transaction():
                if place:
                    self.place_name(src, old_upper, old_name)
                if dst_link:
                    self.count_gone(dst)
                if marks:
                    self._mark_moved(src)
                self._rename_in_upper(src, old_upper, old_name, new_upper, new_name, in_way)
                if old_below:
                    self._whiteout(old_upper, old_name)
        if dst is not None and dst.ino != src.ino:
            self._forget_name(dst)
        src.parent, src.name = npnode.ino, new_name

    def _rename_in_upper(self, src, old_upper, old_name, new_upper, new_name, in_way) -> None:
        """Move ``src`` in the upper, over what is in the way there."""
        if in_way is not None and (in_way.is_dir or src.is_dir) and in_way.is_dir != src.is_dir:
            # A whiteout (or an emptied directory) the upper cannot rename over.
            if in_way.is_dir:
                self._remove_upper_tree(in_way.ino)
                self.upper.rmdir(new_upper, new_name)
            else:
                self.upper.unlink(new_upper, new_name)
        elif in_way is not None and in_way.is_dir:
            self._remove_upper_tree(in_way.ino)
        self.upper.rename(old_upper, old_name, new_upper, new_name)

    def _exchange(self, opnode, old_name, src, npnode, new_name, dst) -> None:
        """RENAME_EXCHANGE: both entries come up, then swap through a private name."""
        if src.ino == dst.ino:
            return
        self.copy_up_meta(src)
        self.copy_up_meta(dst)
        old_upper, new_upper = self.upper_dir(opnode), self.upper_dir(npnode)
        moved = [
            node
            for node, pnode, name in ((src, npnode, new_name), (dst, opnode, old_name))
            if node.is_dir and self._needs_marks(node, pnode, name)
        ]
        work, tmp = self._work_dir(), self._tmp_name()
        with self._upper_transaction():
            for node, parent_upper, name in (
                (src, old_upper, old_name),
                (dst, new_upper, new_name),
            ):
                if node.indexed:
                    self.place_name(node, parent_upper, name)
            for node in moved:
                self._mark_moved(node)
            self.upper.rename(old_upper, old_name, work, tmp)
            self.upper.rename(new_upper, new_name, old_upper, old_name)
            self.upper.rename(work, tmp, new_upper, new_name)
        src.parent, src.name, dst.parent, dst.name = npnode.ino, new_name, opnode.ino, old_name
