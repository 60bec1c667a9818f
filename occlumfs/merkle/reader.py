"""Open an image and serve it as a read-only :class:`Filesystem`, verifying lazily.

Opening reads the header only: its cost does not depend on the image size.
Every later read fetches the blocks it needs with one ``pread`` per contiguous
run, hashes each 4 KiB block and compares it with its level-0 hash; tree blocks
are verified up to the root once and then kept in a bounded cache (the set of
verified tree nodes). Metadata blocks (inode table, heap, seal table) go
through the same tree and are kept, verified and decrypted, in a bounded cache;
nothing is decoded ahead of use, so memory stays flat for any number of files.

File data is never cached here: the kernel page cache keeps it (the image is
immutable), and a block read again from the host is verified again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections import OrderedDict
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING

from occlumfs.errors import (
    FormatError,
    FSError,
    IntegrityError,
    NotFoundError,
    OcclumfsError,
    WrongKeyError,
)
from occlumfs.fs import ROOT_INO, Attr, DirEntry, Filesystem, FsInfo, StatFs
from occlumfs.merkle.format import (
    BLOCK_SIZE,
    DESCRIPTOR_SIZE,
    DIRENT,
    DIRENT_SIZE,
    EXTENT,
    EXTENT_SIZE,
    HASH_SIZE,
    HASHES_PER_BLOCK,
    INODE,
    INODE_SIZE,
    INODES_PER_BLOCK,
    NAME_MAX,
    SEAL_SIZE,
    SEALS_PER_BLOCK,
    SYMLINK_MAX,
    XATTR_HEAD,
    XATTR_LIST_MAX,
    XATTR_VALUE_MAX,
    Descriptor,
    InodeRecord,
    Layout,
    MalformedImageError,
    blocks_for,
    digest_of,
    header_mac_span,
    name_problem,
    parse_digest,
    unpack_xattrs,
)
from occlumfs.merkle.tree import first_mismatch, hash_blocks

if TYPE_CHECKING:
    from occlumfs.merkle.crypto import ImageKeys

log = logging.getLogger("occlumfs.merkle")

TREE_CACHE_BLOCKS = 2048  # 8 MiB of verified tree nodes
META_CACHE_BLOCKS = 8192  # 32 MiB of verified, decrypted metadata blocks
NAME_CACHE = 65536  # inode -> (parent, name), only to name paths in error messages
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


def open_image_file(image: Path) -> int:
    """A read-only descriptor of ``image``; NotFoundError/FormatError when it cannot be one."""
    try:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFoundError(f"{image} does not exist") from None
    except PermissionError:
        raise OcclumfsError(f"{image}: permission denied") from None
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise FormatError(f"{image} is a directory, not an image")
    return fd


def read_header(image: Path, fd: int | None = None) -> tuple[bytes, int]:
    """The header block and the file size; NotFoundError/FormatError if not an image."""
    own = fd is None
    if own:
        fd = open_image_file(image)
    try:
        header = os.pread(fd, BLOCK_SIZE, 0)
        size = os.fstat(fd).st_size
    finally:
        if own:
            os.close(fd)
    if len(header) < DESCRIPTOR_SIZE:
        raise FormatError(f"{image}: too short to be an occlumfs image")
    return header, size


class ImageReader:
    """Verified access to the blocks of one image file."""

    def __init__(self, image: Path, *, digest: str | None, key: bytes | None) -> None:
        self.path = Path(image)
        # One descriptor for the header and every later read: what was checked
        # is what gets served, even if the path is replaced meanwhile.
        self.fd = open_image_file(self.path)
        try:
            self._check_header(digest, key)
        except BaseException:
            os.close(self.fd)
            raise
        # Evicted oldest first (an OrderedDict pops its first item in O(1);
        # a dict's first item gets slower to find the more were deleted).
        self._tree: OrderedDict[int, bytes] = OrderedDict()
        self._meta: OrderedDict[int, bytes] = OrderedDict()
        self.heap_base = self.layout.heap_start * BLOCK_SIZE
        self.heap_bytes = self.desc.heap_bytes
        # Data, tree and metadata are read as three sequential streams; each
        # gets its own open file (same inode, reopened through /proc) so the
        # kernel's read-ahead follows each instead of seeing random access.
        self._tree_fd = self._reopen()
        self._meta_fd = self._reopen()
        with contextlib.suppress(OSError):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def _reopen(self) -> int:
        try:
            return os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return os.dup(self.fd)

    def _check_header(self, digest: str | None, key: bytes | None) -> None:
        image = self.path
        header, size = read_header(image, self.fd)
        raw = header[:DESCRIPTOR_SIZE]
        self.digest = digest_of(raw)
        # A pinned digest is checked before anything else is believed.
        if digest is not None and parse_digest(digest) != self.digest:
            pinned = parse_digest(digest)
            raise IntegrityError(
                f"{image}: digest mismatch: expected {pinned}, image has {self.digest}"
            )
        try:
            self.desc = Descriptor.parse(raw)
        except FormatError as exc:
            raise FormatError(f"{image}: {exc}") from None
        mac_start, mac_end = header_mac_span(self.desc)
        if any(header[mac_end:]):
            raise IntegrityError(f"{image}: header: non-zero bytes after the descriptor")
        self.layout = Layout.of(self.desc)
        if size != self.desc.image_blocks * BLOCK_SIZE:
            raise IntegrityError(
                f"{image}: size is {size} bytes, the header says "
                f"{self.desc.image_blocks * BLOCK_SIZE}: truncated or extended"
            )
        self.pinned = digest is not None
        self.keys: ImageKeys | None = None
        if self.desc.encrypted:
            from occlumfs.merkle.crypto import ImageKeys  # only encrypted images pay for it

            if key is None:
                raise WrongKeyError(f"{image} is encrypted: give its key with --key-file")
            keys = ImageKeys(key, self.desc.version)
            if not keys.matches(self.desc.key_check):
                raise WrongKeyError(f"wrong key for {image}")
            if self.desc.version < 2:
                # Version 1 seals blocks but not the header: blocks spliced from
                # other images with the same key, under a recomputed tree, would
                # open. Only a pinned digest authenticates such an image.
                if not self.pinned:
                    raise IntegrityError(
                        f"{image}: a format version 1 encrypted image is not authenticated "
                        "by its key; pin its digest or rebuild it"
                    )
            elif not keys.header_mac_matches(raw, header[mac_start:mac_end]):
                raise IntegrityError(
                    f"{image}: header is not authenticated by this key: "
                    "the image was altered after it was built"
                )
            self.keys = keys

    @property
    def authenticated(self) -> bool:
        """Whether something other than the image itself vouches for it (a pin or the key)."""
        return self.pinned or self.keys is not None

    def close(self) -> None:
        if self.fd >= 0:
            for fd in (self.fd, self._tree_fd, self._meta_fd):
                os.close(fd)
            self.fd = -1

    def _pread(self, length: int, offset: int, fd: int | None = None) -> bytes:
        data = os.pread(self.fd if fd is None else fd, length, offset)
        if len(data) != length:
            raise IntegrityError(f"{self.path}: short read at offset {offset}: image truncated")
        return data

    # -- the tree --------------------------------------------------------------------------
    def tree_block(self, level: int, index: int) -> bytes:
        """Tree block (level, index), verified up to the root."""
        block_no = self.layout.tree_block(level, index)
        cached = self._tree.get(block_no)
        if cached is not None:
            return cached
        raw = self._pread(BLOCK_SIZE, block_no * BLOCK_SIZE, self._tree_fd)
        parent = self.layout.tree.parent(level, index)
        if parent is None:
            expected = self.desc.root_hash
        else:
            p_level, p_index, off = parent
            expected = self.tree_block(p_level, p_index)[off : off + HASH_SIZE]
        if sha256(raw).digest() != expected:
            raise IntegrityError(
                f"{self.path}: merkle tree level {level} block {index} "
                f"(image offset {block_no * BLOCK_SIZE}) failed verification"
            )
        if len(self._tree) >= TREE_CACHE_BLOCKS:
            self._tree.popitem(last=False)
        self._tree[block_no] = raw
        return raw

    def expected_hashes(self, first_block: int, count: int) -> bytes:
        """Level-0 hashes of absolute blocks first_block .. first_block + count - 1."""
        covered = first_block - 1
        parts = []
        while count > 0:
            index, off = divmod(covered, HASHES_PER_BLOCK)
            take = min(count, HASHES_PER_BLOCK - off)
            parts.append(self.tree_block(0, index)[off * HASH_SIZE : (off + take) * HASH_SIZE])
            covered += take
            count -= take
        return b"".join(parts) if len(parts) != 1 else parts[0]

    def read_verified(self, first_block: int, count: int, what, fd: int | None = None) -> bytes:
        """``count`` covered blocks from ``first_block``, each checked against the tree.

        ``what(block_no)`` describes a block for the error message.
        """
        if first_block < 1 or first_block + count > self.layout.tree_start:
            raise MalformedImageError(f"{self.path}: reference beyond the covered blocks")
        buf = self._pread(count * BLOCK_SIZE, first_block * BLOCK_SIZE, fd)
        # One thread: the per-block Python work holds the GIL, and handing it
        # to a helper every 4 KiB measured slower than hashing here alone.
        bad = first_mismatch(hash_blocks(buf), self.expected_hashes(first_block, count))
        if bad is not None:
            raise IntegrityError(f"{self.path}: {what(first_block + bad)} failed verification")
        return buf

    # -- metadata blocks ---------------------------------------------------------------------
    def _seal(self, block_no: int) -> bytes:
        seal_block = self.layout.seal_start + (block_no - 1) // SEALS_PER_BLOCK
        raw = self.meta_block(seal_block)
        off = (block_no - 1) % SEALS_PER_BLOCK * SEAL_SIZE
        return raw[off : off + SEAL_SIZE]

    def open_sealed(self, block_no: int, ciphertext, what) -> bytes:
        plain = self.keys.open(block_no, ciphertext, self._seal(block_no))
        if plain is None:
            raise IntegrityError(f"{self.path}: {what(block_no)}: seal does not verify")
        return plain

    def _describe_meta(self, block_no: int) -> str:
        return (
            f"{self.layout.region_of(block_no)} block {block_no} "
            f"(image offset {block_no * BLOCK_SIZE})"
        )

    def meta_block(self, block_no: int) -> bytes:
        """A verified (and decrypted) inode-table, heap or seal-table block."""
        cached = self._meta.get(block_no)
        if cached is not None:
            return cached
        raw = self.read_verified(block_no, 1, self._describe_meta, self._meta_fd)
        if self.keys is not None and block_no < self.layout.seal_start:
            raw = self.open_sealed(block_no, raw, self._describe_meta)
        if len(self._meta) >= META_CACHE_BLOCKS:
            self._meta.popitem(last=False)
        self._meta[block_no] = raw
        return raw

    def meta_bytes(self, offset: int, length: int) -> bytes:
        """``length`` bytes at absolute byte ``offset`` of the metadata regions."""
        block_no, off = divmod(offset, BLOCK_SIZE)
        if off + length <= BLOCK_SIZE:
            return self.meta_block(block_no)[off : off + length]
        parts = []
        while length > 0:
            take = min(length, BLOCK_SIZE - off)
            parts.append(self.meta_block(block_no)[off : off + take])
            length -= take
            block_no += 1
            off = 0
        return b"".join(parts)

    def heap(self, ref: int, length: int) -> bytes:
        if ref < 0 or length < 0 or ref + length > self.heap_bytes:
            raise MalformedImageError(f"{self.path}: metadata reference beyond the heap")
        return self.meta_bytes(self.heap_base + ref, length)

    def inode(self, ino: int) -> InodeRecord:
        if not 1 <= ino <= self.desc.inode_count:
            raise FSError(errno.ENOENT)
        block, slot = divmod(ino - 1, INODES_PER_BLOCK)
        # Records never straddle blocks: one cached block, one C-level unpack.
        raw = self.meta_block(self.layout.inode_start + block)
        return _make_record(INODE.unpack_from(raw, slot * INODE_SIZE))


def _make_record(fields: tuple) -> InodeRecord:
    return tuple.__new__(InodeRecord, fields)


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

    def _check_neighbours(self, parent: int, rec: InodeRecord, index: int, name: bytes) -> None:
        """A lookup's match must be a valid name, strictly between its neighbours."""
        before = self._entry(rec, index - 1)[1] if index > 0 else None
        self._check_name(parent, name, before)
        if index + 1 < rec.count:
            self._check_name(parent, self._entry(rec, index + 1)[1], name)

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
        lo, hi = 0, rec.count
        if rec.count * DIRENT_SIZE > self.reader.heap_bytes:
            raise MalformedImageError(f"{self.reader.path}: directory {parent} overruns the heap")
        while lo < hi:
            mid = (lo + hi) // 2
            child, here = self._entry(rec, mid)
            if here == name:
                self._check_neighbours(parent, rec, mid, name)
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
        index = max(0, offset)
        heap = self.reader.heap
        previous = self._entry(rec, index - 1)[1] if 0 < index <= rec.count else None
        while index < rec.count:
            batch = self._entries(rec, index, min(256, rec.count - index))
            # A builder puts a directory's names side by side: fetch them at once.
            lo = min(e[2] for e in batch)
            hi = max(e[2] + e[1] for e in batch)
            blob = heap(lo, hi - lo) if hi - lo <= len(batch) * NAME_MAX else None
            for child, name_len, name_off in batch:
                if blob is None or not 1 <= name_len <= NAME_MAX:
                    name = self._name(name_len, name_off)
                else:
                    name = blob[name_off - lo : name_off - lo + name_len]
                self._check_name(fh, name, previous)
                previous = name
                attr = self._child_attr(fh, child)
                self._remember(child, fh, name)
                index += 1
                yield DirEntry(name, attr, index)

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
        pieces: list[tuple[int, bytes]] = []
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
                pieces.append(
                    (a, self.read_data(ino, data_start + e_data + (a - e_first), a, b - a))
                )
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

    def read_data(self, ino: int, block_no: int, file_block: int, count: int) -> bytes:
        """``count`` data blocks from absolute block ``block_no`` (file block ``file_block``
        of ``ino``), verified and, for an encrypted image, opened."""

        def what(bad: int) -> str:
            off = (file_block + bad - block_no) * BLOCK_SIZE
            return f"{self.path_of(ino)}: data at offset {off} (image block {bad})"

        data = self.reader.read_verified(block_no, count, what)
        if self.reader.keys is None:
            return data
        mv = memoryview(data)
        return b"".join(
            [
                self.reader.open_sealed(
                    block_no + i, mv[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE], what
                )
                for i in range(count)
            ]
        )

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
