"""``occlumfs commit``: a union's changes as a new image layer, read through the contract.

:class:`LayerView` is a read-only filesystem showing what a new layer must
hold so that, stacked on the same lowers, it shows exactly the union's view:

* every entry the upper changed or added, with its data read through the union;
* a whiteout (character device 0/0) for each name the lowers show and the
  union does not;
* a directory whose contents no longer derive from the lowers at its path (made
  over a deleted one, renamed from elsewhere: opaque or redirected in the upper)
  in full, opaque (``trusted.overlay.opaque``) when the lowers hold a directory
  there;
* a directory the lowers hold and nothing changed under: left out.

With ``flatten`` it shows the whole merged view instead (one standalone layer).
:func:`commit_layer` serves the view over FUSE and builds the image from the
mount, so the builder reads plaintext from the page cache, never from a file
on the host's disk.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from occlumfs.errors import FSError
from occlumfs.fs import ROOT_INO, Attr, DirEntry, Filesystem, FsInfo, StatFs, iter_dir
from occlumfs.unionfs import layers as L


@dataclass(eq=False, slots=True)
class _Entry:
    attr: Attr  # as the view shows it (its own inode numbers)
    source: int | None = None  # the union inode with the data, target and xattrs
    opaque: bool = False
    children: dict[bytes, int] = field(default_factory=dict)  # directories: name -> view ino


class LayerView(Filesystem):
    """The layer a union's upper amounts to (or, ``flatten``, the whole union)."""

    def __init__(self, union, *, flatten: bool = False) -> None:
        self.union = union
        self.info = FsInfo(
            name=f"layer-of:{union.info.name}", subtype="occlumfs-layer", read_only=True
        )
        self._entries: dict[int, _Entry] = {}
        self._by_source: dict[int, int] = {}  # union inode -> view inode (hard links)
        root_lowers = () if flatten else union._nodes[ROOT_INO].stack
        root = self._dir_entry(ROOT_INO, union.getattr(ROOT_INO), opaque=False)
        self._fill(root, union._nodes[ROOT_INO], root_lowers, full=flatten, flatten=flatten)

    # -- building the tree ------------------------------------------------------------
    def _new(self, attr: Attr, source: int | None, **kwargs) -> int:
        if source is not None and not attr.is_dir and source in self._by_source:
            ino = self._by_source[source]  # another name of a file already shown
            old = self._entries[ino].attr
            self._entries[ino].attr = L.shown_as(old, ino, old.nlink + 1, old.blocks)
            return ino
        ino = len(self._entries) + ROOT_INO
        shown = L.shown_as(attr, ino, 1 if not attr.is_dir else 2, attr.blocks)
        self._entries[ino] = _Entry(shown, source, **kwargs)
        if source is not None:
            self._by_source[source] = ino
        return ino

    def _dir_entry(self, source: int, attr: Attr, opaque: bool) -> _Entry:
        return self._entries[self._new(attr, source, opaque=opaque)]

    def _lower_names(self, stack) -> dict[bytes, bool]:
        """The names the lowers alone show in a directory stack -> whether each is a dir."""
        shown: dict[bytes, bool] = {}
        hidden: set[bytes] = set()
        for layer, ldir in stack:
            for entry in iter_dir(self.union.lowers[layer], ldir):
                if entry.name in shown or entry.name in hidden:
                    continue
                if L.is_whiteout(entry.attr):
                    hidden.add(entry.name)
                else:
                    shown[entry.name] = entry.attr.is_dir
        return shown

    def _replaced(self, node, lowers) -> bool:
        """Whether directory ``node``'s contents no longer derive from ``lowers``."""
        return node.upper is not None and node.stack != tuple(lowers)

    def _fill(self, into: _Entry, node, lowers, *, full: bool, flatten: bool) -> bool:
        """Put in ``into`` what directory ``node`` needs over ``lowers`` (the
        lowers' own directories at its path); whether anything was."""
        union = self.union
        below = {} if full else self._lower_names(lowers)
        names = [e.name for e in iter_dir(union, node.ino)]
        for name in names:
            child = union._resolve(node, name)
            attr = union._attr(child)
            if child.is_dir:
                child_lowers = (
                    () if full or not below.get(name) else union._lower_child(lowers, name)[0]
                )
                child_lowers = tuple((layer, a.ino) for layer, a in child_lowers)
                replaced = full or name not in below or self._replaced(child, child_lowers)
                entry = self._dir_entry(
                    child.ino, attr, opaque=replaced and not flatten and bool(below.get(name))
                )
                changed = self._fill(
                    entry, child, child_lowers, full=replaced or full, flatten=flatten
                )
                if changed or replaced or child.upper is not None:
                    into.children[name] = self._entry_ino(entry)
                else:
                    self._drop(entry)
            elif full or child.upper is not None or child.indexed or name not in below:
                into.children[name] = self._new(attr, child.ino)
        if not full:
            for name in below.keys() - set(names):
                whiteout = Attr(ino=0, mode=stat.S_IFCHR, mtime_ns=into.attr.mtime_ns)
                into.children[name] = self._new(whiteout, None)
        return bool(into.children)

    def _entry_ino(self, entry: _Entry) -> int:
        return entry.attr.ino

    def _drop(self, entry: _Entry) -> None:
        # Only the last entry made can be a directory left out with all its
        # (also left out) contents: numbering stays dense by popping them.
        ino = entry.attr.ino
        for drop in [i for i in self._entries if i >= ino]:
            source = self._entries.pop(drop).source
            if source is not None and self._by_source.get(source) == drop:
                del self._by_source[source]

    # -- the contract (read side) -----------------------------------------------------------
    def _entry(self, ino: int) -> _Entry:
        entry = self._entries.get(ino)
        if entry is None:
            raise FSError(errno.ENOENT)
        return entry

    def lookup(self, parent: int, name: bytes) -> Attr:
        entry = self._entry(parent)
        if name in (b".", b".."):
            return entry.attr
        ino = entry.children.get(name)
        if ino is None:
            raise FSError(errno.ENOENT)
        return self._entries[ino].attr

    def getattr(self, ino: int) -> Attr:
        return self._entry(ino).attr

    def readlink(self, ino: int) -> bytes:
        return self.union.readlink(self._entry(ino).source)

    def readdir(self, fh: int, offset: int) -> Iterator[DirEntry]:
        names = sorted(self._entry(fh).children)
        for i in range(offset, len(names)):
            yield DirEntry(names[i], self._entries[self._entry(fh).children[names[i]]].attr, i + 1)

    def open(self, ino: int, flags: int) -> int:
        entry = self._entry(ino)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise FSError(errno.EROFS)
        return self.union.open(entry.source, os.O_RDONLY)

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return self.union.read(fh, offset, size)

    def release(self, fh: int) -> None:
        self.union.release(fh)

    def statfs(self) -> StatFs:
        return self.union.statfs()

    def getxattr(self, ino: int, name: bytes) -> bytes:
        entry = self._entry(ino)
        if name == L.OPAQUE_XATTR and entry.opaque:
            return b"y"
        if entry.source is None:
            raise FSError(errno.ENODATA)
        return self.union.getxattr(entry.source, name)

    def listxattr(self, ino: int) -> list[bytes]:
        entry = self._entry(ino)
        names = [] if entry.source is None else self.union.listxattr(entry.source)
        return [*names, L.OPAQUE_XATTR] if entry.opaque else names

    def close(self) -> None:
        self.union.close()


def commit_layer(union, image: Path, *, key: bytes | None = None, flatten: bool = False) -> str:
    """Write ``union``'s changes (all of it with ``flatten``) as image ``image``; its digest.

    ``union`` is closed on return.
    """
    from occlumfs.merkle import build_image
    from occlumfs.mount import serve, umount

    view = LayerView(union, flatten=flatten)
    with tempfile.TemporaryDirectory(prefix="occlumfs-commit-") as scratch:
        mnt = Path(scratch) / "layer"
        mnt.mkdir()
        serve(view, mnt, log_file=Path(scratch) / "server.log")
        try:
            return build_image(mnt, image, key=key)
        finally:
            umount(mnt)
