"""Verified access to the blocks of one image file: the header, the tree, metadata blocks.

Opening reads the header only: its cost does not depend on the image size.
Every later read fetches the blocks it needs with one ``pread`` per contiguous
run, hashes each 4 KiB block and compares it with its level-0 hash; tree blocks
are verified up to the root once and then kept in a bounded cache (the set of
verified tree nodes). Metadata blocks (inode table, heap, seal table) go
through the same tree and are kept, verified and decrypted, in a bounded cache.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections import OrderedDict
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
from occlumfs.merkle.format import (
    BLOCK_SIZE,
    DESCRIPTOR_SIZE,
    HASH_SIZE,
    HASHES_PER_BLOCK,
    INODE,
    INODE_SIZE,
    INODES_PER_BLOCK,
    SEAL_SIZE,
    Descriptor,
    InodeRecord,
    Layout,
    MalformedImageError,
    digest_of,
    header_mac_span,
    parse_digest,
)
from occlumfs.merkle.tree import first_mismatch, hash_blocks

if TYPE_CHECKING:
    from occlumfs.merkle.crypto import ImageKeys
    from occlumfs.merkle.hashers import ReadAhead

TREE_CACHE_BLOCKS = 2048  # 8 MiB of verified tree nodes
META_CACHE_BLOCKS = 8192  # 32 MiB of verified, decrypted metadata blocks
READ_AHEAD_MIN = 32  # data requests of fewer blocks never involve the read-ahead workers


def open_image_file(image: Path) -> int:
    """A read-only descriptor of ``image``; NotFoundError/FormatError when it cannot be one."""
    try:
        # Non-blocking: a FIFO put where the image belongs must not stall the
        # open until some writer comes (it is refused below).
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFoundError(f"{image} does not exist") from None
    except PermissionError:
        raise OcclumfsError(f"{image}: permission denied") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise FormatError(f"{image} is {kind}, not an image")
    os.set_blocking(fd, True)
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
        self.read_ahead: ReadAhead | None = None
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

    def close(self) -> None:
        if self.read_ahead is not None:
            self.read_ahead.close()
            self.read_ahead = None
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

    def read_data(
        self, first_block: int, count: int, what, limit: int = 0, borrow: bool = False
    ) -> bytes | memoryview:
        """File data: ``count`` covered blocks from ``first_block``, verified and opened.

        ``limit`` is the end of the extent the blocks belong to: how far a
        sequential reader may be read ahead. Large sequential requests are read
        ahead and hashed by worker processes (:mod:`occlumfs.merkle.hashers`);
        the rest, and whatever the workers cannot serve, the calling thread
        reads and hashes (threads measured slower: one 4 KiB hash is too short
        for the GIL hand-off it costs; docs/performance.md, issue 11). An
        encrypted run fetches its seals once and opens its blocks in one loop.
        With ``borrow`` the result may be a view of the workers' memory, valid
        until the next call only (:meth:`ReadAhead.read`).
        """
        buf = None
        if count >= READ_AHEAD_MIN and first_block + count <= limit <= self.layout.tree_start:
            ahead = self.read_ahead
            if ahead is None:
                from occlumfs.merkle.hashers import ReadAhead

                ahead = self.read_ahead = ReadAhead(self.fd)
            # Opening copies the plaintext out at once: a borrowed view is safe there.
            borrow = borrow or self.keys is not None
            buf = ahead.read(first_block, count, limit, self.expected_hashes, borrow)
        if buf is None:
            buf = self.read_verified(first_block, count, what)
        if self.keys is None:
            return buf
        plain, bad = self.keys.open_run(first_block, buf, self._seal_run(first_block, count))
        if bad is not None:
            raise IntegrityError(f"{self.path}: {what(first_block + bad)}: seal does not verify")
        return plain

    # -- metadata blocks ---------------------------------------------------------------------
    def _seal_run(self, first_block: int, count: int) -> bytes:
        """The seals of ``count`` consecutive blocks from ``first_block`` (verified)."""
        start = self.layout.seal_start * BLOCK_SIZE + (first_block - 1) * SEAL_SIZE
        return self.meta_bytes(start, count * SEAL_SIZE)

    def open_sealed(self, block_no: int, ciphertext, what) -> bytes:
        plain = self.keys.open(block_no, ciphertext, self._seal_run(block_no, 1))
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
        if length == 0:
            # Nothing to read, nor to verify: an empty directory's entries at the
            # end of the heap may point at the block past it, past the covered
            # ones when the heap is empty (an image of an empty tree).
            return b""
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
