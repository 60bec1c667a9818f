"""Copy-up: bringing a lower entry into the upper before it changes.

Two steps, each atomic in the upper (docs/unionfs.md, "Copy-up"):

1. *Metadata copy*: the entry is built in the upper's private work directory
   under a private name (type, permission bits, owner, times, user xattrs, its
   origin's inode number and, for a regular file, a reference to the lower data
   bound to that lower's digest, at the lower's size but with no data blocks),
   then renamed into place. A commit of the upper at any moment holds either
   no copy (the lower shows) or the whole one. chmod, chown, utimens and xattr
   changes stop here: no data is copied.
2. *Data copy*, on the first write or truncate: the lower data is written into
   the upper file, skipping all-zero blocks (they stay holes), its times are
   restored, and only then is the reference removed. Until that removal the
   union keeps reading the lower data, so a commit mid-copy is harmless.

A directory's copy is its metadata only: its lower contents keep merging in by
name, or by its redirect once renamed.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from occlumfs.errors import FSError, IntegrityError
from occlumfs.fs import BLOCK_SIZE, ROOT_INO, Attr, AttrChanges, Caller
from occlumfs.unionfs import layers as L

COPY_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(COPY_CHUNK)
_ZERO_BLOCK = bytes(BLOCK_SIZE)


class LayerMismatchError(IntegrityError):
    """The upper was made over other lowers (``occlumfs union rebase`` moves it)."""


class CopyUp:
    """Mixin of :class:`occlumfs.unionfs.fs.UnionFS`: the upper's bookkeeping and copy-up."""

    def _writable(self) -> None:
        if self.read_only:
            raise FSError(errno.EROFS)

    @contextmanager
    def _upper_transaction(self) -> Iterator[None]:
        """Several upper changes that must reach the disk together.

        The upper commits on a timer checked after each change (SEFS: every
        ``commit_interval``, 10 s); committing first means the timer cannot
        fire between the changes, and the next commit holds them all.
        """
        commit = getattr(self.upper, "commit", None)
        if commit is not None and not self.read_only:
            # A commit with nothing to write does not restart the timer: touch
            # the union's private directory so that there is something.
            private = self._private_subdir(L.WORK_DIR)
            self.upper.setattr(private, AttrChanges())
            commit()
        yield

    # -- the upper's private state --------------------------------------------------------
    def _bind_lowers(self) -> None:
        """Check (or, on a fresh upper, record) the lowers' digests; clean the work dir."""
        try:
            recorded = L.unpack_lowers(self.upper.getxattr(ROOT_INO, L.LOWERS_XATTR))
        except FSError as exc:
            if exc.errno != errno.ENODATA:
                raise
            recorded = None
        if recorded is not None:
            difference = L.describe_lowers_difference(recorded, self.digests)
            if difference is not None:
                raise LayerMismatchError(
                    f"{self.info.name}: the upper does not belong on these lowers: {difference}"
                )
        if self.read_only:
            return
        if recorded is None:
            # A fresh upper: the union root looks like the top lower's root.
            top = len(self.lowers) - 1
            self._copy_meta(self.lowers[top], ROOT_INO, self.lowers[top].getattr(ROOT_INO), 1)
            self.upper.setxattr(ROOT_INO, L.LOWERS_XATTR, L.pack_lowers(self.digests))
        self._clean_work()

    def _clean_work(self) -> None:
        """Remove what a crash left in the work directory (unfinished copy-ups)."""
        private = self._upper_lookup(ROOT_INO, L.PRIVATE_DIR)
        work = private and self._upper_lookup(private.ino, L.WORK_DIR)
        if work:
            self._remove_upper_tree(work.ino)

    def _remove_upper_tree(self, dir_ino: int) -> None:
        fh = self.upper.opendir(dir_ino)
        try:
            entries = list(self.upper.readdir(fh, 0))
        finally:
            self.upper.releasedir(fh)
        for entry in entries:
            if entry.attr.is_dir:
                self._remove_upper_tree(entry.attr.ino)
                self.upper.rmdir(dir_ino, entry.name)
            else:
                self.upper.unlink(dir_ino, entry.name)

    def _private_subdir(self, name: bytes) -> int:
        private = self._upper_lookup(ROOT_INO, L.PRIVATE_DIR)
        if private is None:
            private = self.upper.mkdir(ROOT_INO, L.PRIVATE_DIR, 0o700, Caller())
        sub = self._upper_lookup(private.ino, name)
        if sub is None:
            sub = self.upper.mkdir(private.ino, name, 0o700, Caller())
        return sub.ino

    def _work_dir(self) -> int:
        return self._private_subdir(L.WORK_DIR)

    def _index_lookup(self, ino: int) -> Attr | None:
        private = self._upper_lookup(ROOT_INO, L.PRIVATE_DIR)
        index = private and self._upper_lookup(private.ino, L.INDEX_DIR)
        return index and self._upper_lookup(index.ino, L.index_name(ino))

    def count_gone(self, node) -> None:
        """One more lower name of hard-linked ``node`` no longer shows it."""
        gone = int(self.upper.getxattr(node.upper, L.GONE_XATTR))
        self.upper.setxattr(node.upper, L.GONE_XATTR, b"%d" % (gone + 1))

    def place_name(self, node, parent_upper: int, name: bytes) -> None:
        """Give ``node``'s copy the name it shows, ``name``, in the upper."""
        if self._upper_lookup(parent_upper, name) is None:
            self.upper.link(node.upper, parent_upper, name)
            self.count_gone(node)

    def _tmp_name(self) -> bytes:
        self._tmp_counter += 1
        return b"#%d-%d" % (os.getpid(), self._tmp_counter)

    def _move_into_place(self, work: int, tmp: bytes, parent_upper: int, name: bytes) -> None:
        """Rename a finished copy into place, keeping the parent's times (a copy-up
        is no change to the directory the user sees)."""
        before = self.upper.getattr(parent_upper)
        self.upper.rename(work, tmp, parent_upper, name)
        self.upper.setattr(
            parent_upper, AttrChanges(atime_ns=before.atime_ns, mtime_ns=before.mtime_ns)
        )

    def _copy_meta(self, src_fs, src_ino: int, attr: Attr, dst: int) -> None:
        """User xattrs, permission bits, owner and times of ``src_ino`` onto upper ``dst``."""
        for name in src_fs.listxattr(src_ino):
            if not L.is_private_xattr(name):
                self.upper.setxattr(dst, name, src_fs.getxattr(src_ino, name))
        self.upper.setattr(
            dst,
            AttrChanges(
                mode=None if stat.S_ISLNK(attr.mode) else stat.S_IMODE(attr.mode),
                uid=attr.uid,
                gid=attr.gid,
                atime_ns=attr.atime_ns,
                mtime_ns=attr.mtime_ns,
            ),
        )

    # -- copy-up --------------------------------------------------------------------------
    def upper_dir(self, node) -> int:
        """The upper directory of ``node``, copying it (and its parents) up if needed."""
        if node.upper is not None:
            return node.upper
        parent_upper = self.upper_dir(self._nodes[node.parent])
        layer, lino = node.stack[0]
        lower = self.lowers[layer]
        attr = lower.getattr(lino)
        work = self._work_dir()
        tmp = self._tmp_name()
        made = self.upper.mkdir(work, tmp, 0o700, Caller(attr.uid, attr.gid))
        self.upper.setxattr(made.ino, L.ORIGIN_XATTR, L.pack_origin(node.ino))
        self._copy_meta(lower, lino, attr, made.ino)
        self._move_into_place(work, tmp, parent_upper, node.name)
        node.upper = made.ino
        return made.ino

    def copy_up_meta(self, node) -> int:
        """Bring ``node`` into the upper without its data; returns its upper inode."""
        if node.upper is not None:
            return node.upper
        if node.is_dir:
            return self.upper_dir(node)
        # A node whose name is gone (unlinked while open) is copied into the
        # work directory and stays there, nameless, until the next mount.
        detached = node.name is None
        parent_upper = None if detached else self.upper_dir(self._nodes[node.parent])
        layer, lino = node.lower
        lower = self.lowers[layer]
        attr = lower.getattr(lino)
        work = self._work_dir()
        tmp = self._tmp_name()
        caller = Caller(attr.uid, attr.gid)
        if stat.S_ISLNK(attr.mode):
            made = self.upper.symlink(work, tmp, lower.readlink(lino), caller)
        elif stat.S_ISREG(attr.mode):
            made = self.upper.mknod(work, tmp, stat.S_IFREG | 0o600, 0, caller)
            meta = L.pack_metacopy(self.digests[layer], lino)
            self.upper.setxattr(made.ino, L.METACOPY_XATTR, meta)
            if attr.size:
                self.upper.setattr(made.ino, AttrChanges(size=attr.size))
        else:
            made = self.upper.mknod(work, tmp, attr.mode, attr.rdev, caller)
        self.upper.setxattr(made.ino, L.ORIGIN_XATTR, L.pack_origin(node.ino))
        self._copy_meta(lower, lino, attr, made.ino)
        if attr.nlink > 1:
            # Every lower name of it must show this copy: it goes to the index,
            # where lookups of those names find it; no name moves.
            self.upper.setxattr(made.ino, L.GONE_XATTR, b"0")
            self.upper.link(made.ino, self._private_subdir(L.INDEX_DIR), L.index_name(node.ino))
            self.upper.unlink(work, tmp)
            node.indexed = True
        elif not detached:
            self._move_into_place(work, tmp, parent_upper, node.name)
        node.upper = made.ino
        if not stat.S_ISREG(attr.mode):
            node.lower = None
        return made.ino

    def copy_up_data(self, node, limit: int | None = None) -> int:
        """Make ``node`` a full upper file holding its first ``limit`` bytes (all: None)."""
        upper_ino = self.copy_up_meta(node)
        if node.lower is None:
            return upper_ino
        layer, lino = node.lower
        before = self.upper.getattr(upper_ino)
        size = before.size if limit is None else min(limit, before.size)
        if size < before.size:
            self.upper.setattr(upper_ino, AttrChanges(size=size))
        if size:
            self._copy_data(self.lowers[layer], lino, upper_ino, size)
        self.upper.setattr(
            upper_ino, AttrChanges(atime_ns=before.atime_ns, mtime_ns=before.mtime_ns)
        )
        self.upper.removexattr(upper_ino, L.METACOPY_XATTR)
        node.lower = None
        return upper_ino

    def _copy_data(self, lower, lino: int, upper_ino: int, size: int) -> None:
        """Copy the first ``size`` bytes; all-zero blocks are left as holes."""
        src = lower.open(lino, os.O_RDONLY)
        try:
            dst = self.upper.open(upper_ino, os.O_WRONLY)
            try:
                offset = 0
                while offset < size:
                    chunk = lower.read(src, offset, min(COPY_CHUNK, size - offset))
                    if not chunk:
                        break
                    if chunk != _ZERO_CHUNK[: len(chunk)]:
                        self._write_nonzero(dst, offset, chunk)
                    offset += len(chunk)
            finally:
                self.upper.release(dst)
        finally:
            lower.release(src)

    def _write_nonzero(self, dst: int, offset: int, chunk: bytes) -> None:
        view = memoryview(chunk)
        run_start = None
        for pos in range(0, len(chunk), BLOCK_SIZE):
            zero = chunk[pos : pos + BLOCK_SIZE] == _ZERO_BLOCK[: min(BLOCK_SIZE, len(chunk) - pos)]
            if zero and run_start is not None:
                self.upper.write(dst, offset + run_start, view[run_start:pos])
                run_start = None
            elif not zero and run_start is None:
                run_start = pos
        if run_start is not None:
            self.upper.write(dst, offset + run_start, view[run_start:])
