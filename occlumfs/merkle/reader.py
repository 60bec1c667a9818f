"""Serve an image as a read-only :class:`Filesystem`, verifying lazily.

Blocks come verified from :class:`~occlumfs.merkle.blocks.ImageReader`; this
module decodes records, directories, extents and xattrs from them, checking
every rule of docs/formats/image.md *Validation* as it goes. Nothing is
decoded ahead of use, so memory stays flat for any number of files.

File data is never cached here: the kernel page cache keeps it (the image is
immutable), and a block read again from the host is verified again.
"""

from __future__ import annotations

import errno
import os
import stat
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from occlumfs.errors import FSError
from occlumfs.fs import ROOT_INO, Attr, DirEntry, Filesystem, FsInfo, StatFs
from occlumfs.merkle.blocks import ImageReader
from occlumfs.merkle.format import (
    BLOCK_SIZE,
    DIRENT,
    DIRENT_SIZE,
    EXTENT,
    EXTENT_SIZE,
    NAME_MAX,
    SYMLINK_MAX,
    XATTR_HEAD,
    XATTR_LIST_MAX,
    XATTR_VALUE_MAX,
    InodeRecord,
    MalformedImageError,
    blocks_for,
    name_problem,
    unpack_xattrs,
)

NAME_CACHE = 65536  # inode -> (parent, name), only to name paths in error messages
# A directory of up to SMALL_DIR entries is decoded and checked whole on first
# use and kept, up to LISTED_NAMES names over all directories; lookups in it are
# a bisect. Larger ones are searched in place, O(log n) blocks per lookup.
SMALL_DIR = 1024
LISTED_NAMES = 65536
CACHE_TIMEOUT = 24 * 3600.0
# Kernel read-ahead wanted on a mount of an image (FUSE's default: 128 KiB). The
# image never changes, so reading far ahead has no coherence cost.
READAHEAD_KB = 4096
_KINDS = frozenset(
    {
        stat.S_IFDIR,
        stat.S_IFREG,
        stat.S_IFLNK,
        stat.S_IFCHR,
        stat.S_IFBLK,
        stat.S_IFIFO,
        stat.S_IFSOCK,
    }
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


def _attr(ino: int, rec: InodeRecord) -> Attr:
    kind = stat.S_IFMT(rec.mode)
    if kind == stat.S_IFREG:
        blocks = rec.aux * (BLOCK_SIZE // 512)
    elif kind == stat.S_IFDIR:
        blocks = rec.size // 512
    else:
        blocks = 0
    return Attr(
        ino=ino,
        mode=rec.mode,
        nlink=rec.nlink,
        uid=rec.uid,
        gid=rec.gid,
        size=rec.size,
        rdev=rec.aux if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0,
        blocks=blocks,
        atime_ns=rec.mtime_ns,
        mtime_ns=rec.mtime_ns,
        ctime_ns=rec.mtime_ns,
    )


class ImageFS(Filesystem):
    """A verified image, read-only, through the filesystem contract."""

    def __init__(self, reader: ImageReader) -> None:
        self.reader = reader
        self.info = FsInfo(
            name=f"occlumfs:{reader.path}",
            subtype="occlumfs-image",
            read_only=True,
            immutable=True,
            cache_timeout=CACHE_TIMEOUT,
            has_xattrs=reader.desc.has_xattrs,
            readahead_kb=READAHEAD_KB,
        )
        self._names: dict[int, tuple[int, bytes]] = {}
        self._last_extent: dict[int, tuple[int, int, int]] = {}
        self._listings: OrderedDict[int, tuple[list[bytes], list[int]]] = OrderedDict()
        self._listed = 0

    @property
    def digest(self) -> str:
        return self.reader.digest

    def unpinned_warning(self) -> str | None:
        """What to tell a user who opened this image without pinning its digest."""
        reader = self.reader
        if reader.pinned:
            return None
        if reader.keys is None:
            return (
                f"no digest pinned: {reader.path} is a plain image, authenticated by nothing; "
                "whoever can write it can change everything it serves"
            )
        return (
            f"no digest pinned: {reader.path} is authenticated by its key, but any other "
            "image built with the same key (an older one too) would be accepted in its place"
        )

    def close(self) -> None:
        self.reader.close()

    # -- records -------------------------------------------------------------------------------
    def record(self, ino: int) -> InodeRecord:
        """The stored record of ``ino``, checked for a known type and a link count."""
        rec = self.reader.inode(ino)
        if stat.S_IFMT(rec.mode) not in _KINDS or rec.nlink < 1:
            raise MalformedImageError(
                f"{self.reader.path}: inode {ino} has a bad type or link count"
            )
        return rec

    def _dir_record(self, ino: int) -> InodeRecord:
        rec = self.record(ino)
        if not stat.S_ISDIR(rec.mode):
            raise FSError(errno.ENOTDIR)
        return rec

    def _remember(self, ino: int, parent: int, name: bytes) -> None:
        names = self._names
        if len(names) >= NAME_CACHE:
            # Dropping them all is O(1) amortised; the names only help messages.
            names.clear()
        names[ino] = (parent, name)

    def path_of(self, ino: int) -> str:
        """The path of ``ino`` as far as lookups have seen it, for error messages."""
        parts = []
        seen = 0
        while ino != ROOT_INO and seen < 4096:
            known = self._names.get(ino)
            if known is None:
                parts.append(f"<inode {ino}>")
                break
            ino, name = known
            parts.append(os.fsdecode(name))
            seen += 1
        return "/" + "/".join(reversed(parts))

    def _entries(self, rec: InodeRecord, first: int, count: int) -> list[tuple[int, int, int]]:
        raw = self.reader.heap(rec.ref + first * DIRENT_SIZE, count * DIRENT_SIZE)
        return list(DIRENT.iter_unpack(raw))

    def _name(self, name_len: int, name_off: int) -> bytes:
        if not 1 <= name_len <= NAME_MAX:
            raise MalformedImageError(f"{self.reader.path}: directory entry with a bad name length")
        return self.reader.heap(name_off, name_len)

    def _entry(self, rec: InodeRecord, index: int) -> tuple[int, bytes]:
        ((child, name_len, name_off),) = self._entries(rec, index, 1)
        return child, self._name(name_len, name_off)

    def _check_name(self, parent: int, name: bytes, previous: bytes | None) -> None:
        """Malformed unless ``name`` is a valid name sorting strictly after ``previous``.

        Names are stored sorted and unique; a NUL, a '/', '.', '..' or a
        duplicate would let the kernel see two different entries as one name.
        """
        problem = name_problem(name)
        if problem is not None:
            raise MalformedImageError(
                f"{self.reader.path}: directory {parent} holds a name that {problem}"
            )
        if previous is not None and name <= previous:
            raise MalformedImageError(
                f"{self.reader.path}: directory {parent}: names out of order or duplicated"
            )

    def _check_neighbours(self, parent: int, rec: InodeRecord, index: int) -> None:
        """A lookup's match must be a valid name, strictly between its neighbours."""
        first = max(0, index - 1)
        batch = self._entries(rec, first, min(rec.count, index + 2) - first)
        previous = None
        for name in self._batch_names(batch):
            self._check_name(parent, name, previous)
            previous = name

    def _listing(self, ino: int, rec: InodeRecord) -> tuple[list[bytes], list[int]] | None:
        """Names and inode numbers of a small directory, checked once and kept (bounded)."""
        listing = self._listings.get(ino)
        if listing is not None or rec.count > SMALL_DIR:
            return listing
        batch = self._entries(rec, 0, rec.count) if rec.count else []
        names = self._batch_names(batch) if batch else []
        previous = None
        for name in names:
            self._check_name(ino, name, previous)
            previous = name
        while self._listings and self._listed + len(names) > LISTED_NAMES:
            self._listed -= len(self._listings.popitem(last=False)[1][0])
        listing = self._listings[ino] = (names, [e[0] for e in batch])
        self._listed += len(names)
        return listing

    def _batch_names(self, batch: list[tuple[int, int, int]]) -> list[bytes]:
        """The names of consecutive entries; a builder puts them side by side: one fetch."""
        lo = min(e[2] for e in batch)
        hi = max(e[2] + e[1] for e in batch)
        if hi - lo > len(batch) * NAME_MAX:
            return [self._name(name_len, name_off) for _, name_len, name_off in batch]
        blob = self.reader.heap(lo, hi - lo)
        return [
            blob[name_off - lo : name_off - lo + name_len]
            if 1 <= name_len <= NAME_MAX
            else self._name(name_len, name_off)
            for _, name_len, name_off in batch
        ]

    def _child_attr(self, parent: int, child: int) -> Attr:
        if not 1 <= child <= self.reader.desc.inode_count:
            raise MalformedImageError(
                f"{self.reader.path}: directory {parent} names inode {child}, "
                "beyond the inode table"
            )
        rec = self.record(child)
        # Directories form a tree numbered in pre-order: a subdirectory has a
        # larger inode number than its parent and names it. This rules out cycles.
        if stat.S_ISDIR(rec.mode) and (child <= parent or rec.aux != parent):
            raise MalformedImageError(
                f"{self.reader.path}: directory inode {child} is linked from a wrong parent"
            )
        return _attr(child, rec)

    # -- read side -----------------------------------------------------------------------------
    def getattr(self, ino: int) -> Attr:
        return _attr(ino, self.record(ino))

    def lookup(self, parent: int, name: bytes) -> Attr:
        rec = self._dir_record(parent)
        if name == b".":
            return _attr(parent, rec)
        if name == b"..":
            up = rec.aux if parent != ROOT_INO else ROOT_INO
            if up > parent or (parent != ROOT_INO and up == parent):
                raise MalformedImageError(
                    f"{self.reader.path}: directory {parent} has a bad parent"
                )
            return self.getattr(up)
        if len(name) > NAME_MAX:
            raise FSError(errno.ENAMETOOLONG)
        if rec.count * DIRENT_SIZE > self.reader.heap_bytes:
            raise MalformedImageError(f"{self.reader.path}: directory {parent} overruns the heap")
        listing = self._listing(parent, rec)
        if listing is not None:
            names, inos = listing
            i = bisect_left(names, name)
            if i == len(names) or names[i] != name:
                raise FSError(errno.ENOENT)
            self._remember(inos[i], parent, name)
            return self._child_attr(parent, inos[i])
        lo, hi = 0, rec.count
        while lo < hi:
            mid = (lo + hi) // 2
            child, here = self._entry(rec, mid)
            if here == name:
                self._check_neighbours(parent, rec, mid)
                self._remember(child, parent, name)
                return self._child_attr(parent, child)
            if here < name:
                lo = mid + 1
            else:
                hi = mid
        raise FSError(errno.ENOENT)

    def opendir(self, ino: int) -> int:
        self._dir_record(ino)
        return ino

    def readdir(self, fh: int, offset: int) -> Iterator[DirEntry]:
        rec = self._dir_record(fh)
        if rec.count * DIRENT_SIZE > self.reader.heap_bytes:
            raise MalformedImageError(f"{self.reader.path}: directory {fh} overruns the heap")
        for index, child, name in self._children(fh, rec, max(0, offset)):
            attr = self._child_attr(fh, child)
            self._remember(child, fh, name)
            yield DirEntry(name, attr, index + 1)

    def _children(self, ino: int, rec: InodeRecord, index: int) -> Iterator[tuple[int, int, bytes]]:
        """(index, inode, name) of the entries of a directory from ``index`` on, names checked."""
        listing = self._listing(ino, rec)
        if listing is not None:
            names, inos = listing
            for i in range(index, len(names)):
                yield i, inos[i], names[i]
            return
        previous = self._entry(rec, index - 1)[1] if 0 < index <= rec.count else None
        while index < rec.count:
            batch = self._entries(rec, index, min(256, rec.count - index))
            for (child, _, _), name in zip(batch, self._batch_names(batch), strict=True):
                self._check_name(ino, name, previous)
                previous = name
                yield index, child, name
                index += 1

    def readlink(self, ino: int) -> bytes:
        rec = self.record(ino)
        if not stat.S_ISLNK(rec.mode):
            raise FSError(errno.EINVAL)
        if rec.count != rec.size or rec.count > SYMLINK_MAX:
            raise MalformedImageError(f"{self.reader.path}: symlink {ino} has a bad length")
        return self.reader.heap(rec.ref, rec.count)

    def open(self, ino: int, flags: int) -> int:
        rec = self.record(ino)
        if flags & _WRITE_FLAGS:
            raise FSError(errno.EROFS)
        if stat.S_ISDIR(rec.mode):
            raise FSError(errno.EISDIR)
        if not stat.S_ISREG(rec.mode):
            raise FSError(errno.EINVAL)
        return ino

    def _extent(self, rec: InodeRecord, index: int) -> tuple[int, int, int]:
        return EXTENT.unpack(self.reader.heap(rec.ref + index * EXTENT_SIZE, EXTENT_SIZE))

    def extents(self, rec: InodeRecord) -> Iterator[tuple[int, int, int]]:
        """(file block, data block, count) of each extent of a regular file, as stored."""
        if rec.count * EXTENT_SIZE > self.reader.heap_bytes:
            raise MalformedImageError(f"{self.reader.path}: extent list overruns the heap")
        raw = self.reader.heap(rec.ref, rec.count * EXTENT_SIZE)
        return EXTENT.iter_unpack(raw)

    def _first_extent(self, ino: int, rec: InodeRecord, block: int) -> int:
        """Index of the last extent starting at or before file block ``block`` (or 0)."""
        last = self._last_extent.get(ino)
        if last is not None:
            i, first, count = last
            if first <= block < first + count and i < rec.count:
                return i
        lo, hi = 0, rec.count
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._extent(rec, mid)[0] <= block:
                lo = mid
            else:
                hi = mid
        return lo

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return self._read(fh, offset, size, False)

    def read_for_reply(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        # Large sequential reads come as a view of the hashing workers' slot
        # (no 1 MiB copy): the FUSE reply is written before the next request.
        return self._read(fh, offset, size, True)

    def _read(self, fh: int, offset: int, size: int, borrow: bool) -> bytes | memoryview:
        ino = fh
        rec = self.record(ino)
        if not stat.S_ISREG(rec.mode):
            raise FSError(errno.EINVAL)
        if offset < 0:
            raise FSError(errno.EINVAL)
        end = min(offset + size, rec.size)
        if offset >= end or size <= 0:
            return b""
        first_block = offset // BLOCK_SIZE
        end_block = blocks_for(end)
        if rec.count == 0:
            return bytes(end - offset)
        if rec.count * EXTENT_SIZE > self.reader.heap_bytes:
            raise MalformedImageError(f"{self.reader.path}: file inode {ino} overruns the heap")
        pieces: list[tuple[int, bytes | memoryview]] = []
        i = self._first_extent(ino, rec, first_block)
        data_blocks = self.reader.desc.data_blocks
        data_start = self.reader.layout.data_start
        covered_to = 0
        while i < rec.count:
            e_first, e_data, e_count = self._extent(rec, i)
            if e_first >= end_block:
                break
            # Sorted and disjoint, so a request visits at most one extent per
            # block it asks for, whatever a crafted count says.
            if e_data + e_count > data_blocks or e_count == 0 or e_first < covered_to:
                raise MalformedImageError(f"{self.reader.path}: file inode {ino}: bad extent")
            covered_to = e_first + e_count
            a = max(first_block, e_first)
            b = min(end_block, e_first + e_count)
            if a < b:
                self._last_extent[ino] = (i, e_first, e_count)
                block = data_start + e_data + (a - e_first)
                limit = data_start + e_data + e_count
                if borrow and pieces:
                    # The next read may give the slot the last piece lies in back
                    # to a worker: keep its bytes first.
                    pieces[-1] = (pieces[-1][0], bytes(pieces[-1][1]))
                pieces.append((a, self.read_data(ino, block, a, b - a, limit, borrow)))
            i += 1
        if len(self._last_extent) > 1024:
            self._last_extent.clear()
        lo = offset - first_block * BLOCK_SIZE
        if (
            len(pieces) == 1
            and pieces[0][0] == first_block
            and len(pieces[0][1]) == (end_block - first_block) * BLOCK_SIZE
        ):
            return pieces[0][1][lo : lo + end - offset]
        out = bytearray((end_block - first_block) * BLOCK_SIZE)
        for a, data in pieces:
            at = (a - first_block) * BLOCK_SIZE
            out[at : at + len(data)] = data
        return bytes(out[lo : lo + end - offset])

    def read_data(
        self,
        ino: int,
        block_no: int,
        file_block: int,
        count: int,
        limit: int = 0,
        borrow: bool = False,
    ) -> bytes | memoryview:
        """``count`` data blocks from absolute block ``block_no`` (file block ``file_block``
        of ``ino``), verified and, for an encrypted image, opened; ``limit``: the
        extent's end (absolute), how far a sequential reader may be read ahead;
        ``borrow``: see :meth:`ImageReader.read_data`."""

        def what(bad: int) -> str:
            off = (file_block + bad - block_no) * BLOCK_SIZE
            return f"{self.path_of(ino)}: data at offset {off} (image block {bad})"

        return self.reader.read_data(block_no, count, what, limit, borrow)

    def statfs(self) -> StatFs:
        desc = self.reader.desc
        return StatFs(blocks=desc.image_blocks, bfree=0, bavail=0, files=desc.inode_count, ffree=0)

    def _xattrs(self, ino: int) -> list[tuple[bytes, bytes]]:
        rec = self.record(ino)
        if rec.xattr_count == 0 or not self.reader.desc.has_xattrs:
            return []
        if rec.xattr_count > XATTR_LIST_MAX // 2:
            raise MalformedImageError(f"{self.reader.path}: inode {ino} has too many xattrs")
        limit = min(
            self.reader.heap_bytes - rec.xattr_ref,
            rec.xattr_count * (XATTR_HEAD.size + 255 + XATTR_VALUE_MAX),
        )
        if limit <= 0:
            raise MalformedImageError(f"{self.reader.path}: inode {ino}: xattrs beyond the heap")
        return unpack_xattrs(self._xattr_bytes(rec, limit), rec.xattr_count)

    def _xattr_bytes(self, rec: InodeRecord, limit: int) -> bytes:
        # Decode incrementally: the list is small, the heap may be large.
        want = min(limit, 4096)
        while True:
            raw = self.reader.heap(rec.xattr_ref, want)
            try:
                unpack_xattrs(raw, rec.xattr_count)
                return raw
            except MalformedImageError:
                if want >= limit:
                    raise
                want = min(limit, want * 4)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if not self.reader.desc.has_xattrs:
            self.record(ino)
            raise FSError(errno.ENODATA)
        for n, v in self._xattrs(ino):
            if n == name:
                return v
        raise FSError(errno.ENODATA)

    def listxattr(self, ino: int) -> list[bytes]:
        return [n for n, _ in self._xattrs(ino)]


def open_image_fs(image: Path, *, digest: str | None, key: bytes | None) -> ImageFS:
    return ImageFS(ImageReader(Path(image), digest=digest, key=key))
