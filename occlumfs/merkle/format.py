"""The image format (version 2; version 1 is still read) as pure functions: no I/O, no FUSE.

docs/formats/image.md is the specification; this module is its executable
form. An image is a sequence of 4 KiB blocks::

    block 0            header: the descriptor, the header MAC (encrypted), then zeros
    inode table        INODE_SIZE bytes per inode, inode n at index n - 1
    metadata heap      directory entries, names, extents, symlink targets, xattrs
    data               unique file contents, each starting on a block boundary
    seal table         (encrypted images) nonce and tag of every sealed block
    merkle tree        SHA-256 of every block from 1 up to the tree, level 0 first

Everything here validates what it parses and raises :class:`FormatError` with
one line naming the field; callers bound every count by the image size before
allocating anything.
"""

from __future__ import annotations

import errno
import hashlib
import stat
import struct
from collections import namedtuple

from occlumfs.errors import FormatError, FSError

# One block size for the contract and the format (the goldens pin it at 4096),
# from occlumfs.units: `occlumfs mkimage` does not load the contract (occlumfs.fs).
from occlumfs.units import BLOCK_SIZE

MAGIC = b"OCCLUMIM"
VERSION = 2  # what the builder writes
READABLE_VERSIONS = (1, 2)  # 1: no header MAC (an unpinned encrypted v1 image is refused)
HASH_SIZE = 32
HASHES_PER_BLOCK = BLOCK_SIZE // HASH_SIZE  # 128
SEAL_SIZE = 32  # nonce (12) + tag (16) + 4 zero bytes
SEALS_PER_BLOCK = BLOCK_SIZE // SEAL_SIZE
FLAG_ENCRYPTED = 1
FLAG_XATTRS = 2  # some inode has xattrs; without it a mount tells the kernel not to ask
KNOWN_FLAGS = FLAG_ENCRYPTED | FLAG_XATTRS
HASH_SHA256 = 1
ZERO_BLOCK = bytes(BLOCK_SIZE)
NAME_MAX = 255
SYMLINK_MAX = 4095
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 65536
XATTR_LIST_MAX = 65536  # total bytes of one inode's names, as Linux limits listxattr
MAX_BLOCKS = 1 << 40  # 4 PiB: beyond any real image, keeps products in range


class MalformedImageError(FormatError, FSError):
    """The image is well sealed but its metadata is inconsistent (a crafted image).

    Through a mount this answers EIO like any other stored-data failure.
    """

    def __init__(self, message: str) -> None:
        FSError.__init__(self, errno.EIO, message)

    def __str__(self) -> str:
        return f"malformed image: {self.strerror}"


# -- layers: overlayfs' conventions, served through the filesystem contract ---------
#
# An image is a layer of a union: a *whiteout* (a name deleted from the layers
# below) is a character device 0/0, and an *opaque* directory (whose entries
# in the layers below are hidden) carries this xattr with this value. A tar
# source is read as an OCI layer, whose archive spells them as entry names.
WHITEOUT_RDEV = 0
OPAQUE_XATTR = b"trusted.overlay.opaque"
OPAQUE_VALUE = b"y"
OCI_WHITEOUT_PREFIX = b".wh."
OCI_OPAQUE_MARKER = b".wh..wh..opq"


def is_whiteout(mode: int, rdev: int) -> bool:
    """Whether an entry of this mode and device number is a whiteout."""
    return stat.S_ISCHR(mode) and rdev == WHITEOUT_RDEV


def name_problem(name: bytes) -> str | None:
    """Why ``name`` cannot be a directory entry (None when it can).

    A name is 1..NAME_MAX bytes without ``/`` or NUL and is not ``.`` or ``..``:
    anything else would be cut short or reinterpreted by the kernel (a NUL ends
    a name in every system call), so two entries could look like one.
    """
    if not name:
        return "empty"
    if len(name) > NAME_MAX:
        return f"longer than {NAME_MAX} bytes"
    if b"\0" in name:
        return "contains a NUL byte"
    if b"/" in name:
        return "contains '/'"
    if name in (b".", b".."):
        return f"is {name.decode()!r}"
    return None


def blocks_for(nbytes: int) -> int:
    """How many whole blocks hold ``nbytes`` bytes."""
    return -(-nbytes // BLOCK_SIZE)


# -- the descriptor ----------------------------------------------------------------

_DESCRIPTOR = struct.Struct("<8sIIIIQQQQQQQQI32s32s")
DESCRIPTOR_SIZE = _DESCRIPTOR.size
# Version 2, encrypted: HMAC-SHA256 of the descriptor under a subkey of the
# image key, right after the descriptor. It is not part of the digest (it is a
# function of the descriptor and the key), so it adds nothing to a pin; it is
# what authenticates an encrypted image nobody pinned.
HEADER_MAC_SIZE = 32


class Descriptor(
    namedtuple(
        "Descriptor",
        "flags image_blocks inode_count heap_bytes data_blocks sealed_blocks root_hash"
        " key_check version",
        defaults=(VERSION,),
    )
):
    """The header's content. Its SHA-256 is the image digest.

    ``image_blocks`` is the whole file, header and tree included;
    ``sealed_blocks`` the blocks with a seal-table entry and ``key_check``
    zeros when the image is not encrypted.
    """

    __slots__ = ()

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & FLAG_ENCRYPTED)

    @property
    def has_xattrs(self) -> bool:
        return bool(self.flags & FLAG_XATTRS)

    def pack(self) -> bytes:
        layout = Layout.of(self)
        return _DESCRIPTOR.pack(
            MAGIC,
            self.version,
            self.flags,
            BLOCK_SIZE,
            HASH_SHA256,
            self.image_blocks,
            self.inode_count,
            self.heap_bytes,
            self.data_blocks,
            self.sealed_blocks,
            layout.seal_blocks,
            layout.tree_blocks,
            layout.covered_blocks,
            layout.tree.levels,
            self.root_hash,
            self.key_check,
        )

    def digest(self) -> str:
        return digest_of(self.pack())

    @classmethod
    def parse(cls, raw: bytes) -> Descriptor:
        """Parse and fully validate a descriptor (the first DESCRIPTOR_SIZE header bytes)."""
        if len(raw) < DESCRIPTOR_SIZE:
            raise FormatError("header: shorter than a descriptor")
        (
            magic,
            version,
            flags,
            block_size,
            hash_alg,
            image_blocks,
            inode_count,
            heap_bytes,
            data_blocks,
            sealed_blocks,
            seal_blocks,
            tree_blocks,
            covered_blocks,
            levels,
            root_hash,
            key_check,
        ) = _DESCRIPTOR.unpack_from(raw)
        if magic != MAGIC:
            raise FormatError("header: not an occlumfs image (bad magic)")
        if version not in READABLE_VERSIONS:
            raise FormatError(
                f"header: format version {version} is not supported "
                f"(this reader knows {', '.join(map(str, READABLE_VERSIONS))})"
            )
        if flags & ~KNOWN_FLAGS:
            raise FormatError(f"header: unknown flags {flags:#x}")
        if block_size != BLOCK_SIZE or hash_alg != HASH_SHA256:
            raise FormatError("header: unsupported block size or hash algorithm")
        if not 1 <= image_blocks <= MAX_BLOCKS:
            raise FormatError("header: image size out of range")
        # Every count must fit in the image before anything is derived from it.
        limit = image_blocks * BLOCK_SIZE
        if not 1 <= inode_count <= limit // INODE_SIZE:
            raise FormatError("header: inode count out of range")
        if heap_bytes > limit or data_blocks > image_blocks or sealed_blocks > image_blocks:
            raise FormatError("header: region size out of range")
        encrypted = bool(flags & FLAG_ENCRYPTED)
        if not encrypted and (sealed_blocks or any(key_check)):
            raise FormatError("header: seals or key check on an unencrypted image")
        if encrypted and not any(key_check):
            raise FormatError("header: encrypted image without a key check value")
        desc = cls(
            flags=flags,
            image_blocks=image_blocks,
            inode_count=inode_count,
            heap_bytes=heap_bytes,
            data_blocks=data_blocks,
            sealed_blocks=sealed_blocks,
            root_hash=root_hash,
            key_check=key_check,
            version=version,
        )
        layout = Layout.of(desc)
        if encrypted and sealed_blocks != layout.seal_start - 1:
            raise FormatError("header: seal count does not cover the sealed regions")
        if (seal_blocks, tree_blocks, covered_blocks, levels) != (
            layout.seal_blocks,
            layout.tree_blocks,
            layout.covered_blocks,
            layout.tree.levels,
        ):
            raise FormatError("header: region sizes are inconsistent")
        if layout.image_blocks != image_blocks:
            raise FormatError("header: regions do not add up to the image size")
        return desc


def header_mac_span(desc: Descriptor) -> tuple[int, int]:
    """Where the header MAC lies in block 0: (start, end); empty when the image has none.

    Every header byte from ``end`` on must be zero.
    """
    if desc.encrypted and desc.version >= 2:
        return DESCRIPTOR_SIZE, DESCRIPTOR_SIZE + HEADER_MAC_SIZE
    return DESCRIPTOR_SIZE, DESCRIPTOR_SIZE


def digest_of(descriptor_bytes: bytes) -> str:
    return "sha256:" + hashlib.sha256(descriptor_bytes).hexdigest()


def parse_digest(text: str) -> str:
    """Normalise a user-given digest; FormatError if it is not ``sha256:<64 hex>``."""
    text = text.strip().lower()
    hexpart = text.removeprefix("sha256:")
    if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise FormatError(f"not an image digest: {text[:80]!r} (expected sha256:<64 hex digits>)")
    return "sha256:" + hexpart


# -- region layout and tree geometry ----------------------------------------------


class TreeGeometry(namedtuple("TreeGeometry", "leaves counts starts")):
    """Where each level of the Merkle tree lives, for ``leaves`` covered blocks.

    Level 0 holds one hash per covered block; level k+1 one hash per block of
    level k; the top level is a single block whose SHA-256 is the root hash.
    ``counts[k]`` is the number of blocks of level k (level 0 first) and
    ``starts[k]`` the index of level k's first block within the tree region.
    """

    __slots__ = ()

    @classmethod
    def for_leaves(cls, leaves: int) -> TreeGeometry:
        if leaves < 1:
            raise ValueError("a tree covers at least one block")
        counts = []
        n = leaves
        while True:
            n = -(-n // HASHES_PER_BLOCK)
            counts.append(n)
            if n == 1:
                break
        starts = []
        total = 0
        for c in counts:
            starts.append(total)
            total += c
        return cls(leaves, tuple(counts), tuple(starts))

    @property
    def levels(self) -> int:
        return len(self.counts)

    @property
    def blocks(self) -> int:
        return sum(self.counts)

    def parent(self, level: int, index: int) -> tuple[int, int, int] | None:
        """Where the hash of tree block (level, index) is kept: (level, index, byte offset).

        None for the top block, whose hash is the root.
        """
        if level + 1 >= len(self.counts):
            return None
        return level + 1, index // HASHES_PER_BLOCK, (index % HASHES_PER_BLOCK) * HASH_SIZE

    def leaf_slot(self, covered_index: int) -> tuple[int, int]:
        """Level-0 block index and byte offset of covered block ``covered_index``'s hash."""
        return covered_index // HASHES_PER_BLOCK, (covered_index % HASHES_PER_BLOCK) * HASH_SIZE


class Layout(
    namedtuple("Layout", "inode_start heap_start data_start seal_start seal_blocks tree_start tree")
):
    """Absolute block numbers of each region, derived from the descriptor's counts
    (``tree`` is the tree's :class:`TreeGeometry`)."""

    __slots__ = ()

    @classmethod
    def of(cls, desc: Descriptor) -> Layout:
        return cls.compute(desc.inode_count, desc.heap_bytes, desc.data_blocks, desc.encrypted)

    @classmethod
    def compute(
        cls, inode_count: int, heap_bytes: int, data_blocks: int, encrypted: bool
    ) -> Layout:
        inode_start = 1
        heap_start = inode_start + blocks_for(inode_count * INODE_SIZE)
        data_start = heap_start + blocks_for(heap_bytes)
        seal_start = data_start + data_blocks
        sealed = seal_start - 1  # every block from the inode table to the data's end
        seal_blocks = -(-sealed // SEALS_PER_BLOCK) if encrypted else 0
        tree_start = seal_start + seal_blocks
        return cls(
            inode_start,
            heap_start,
            data_start,
            seal_start,
            seal_blocks,
            tree_start,
            TreeGeometry.for_leaves(tree_start - 1),
        )

    @property
    def covered_blocks(self) -> int:
        """Blocks 1 .. tree_start - 1: everything but the header and the tree."""
        return self.tree_start - 1

    @property
    def tree_blocks(self) -> int:
        return self.tree.blocks

    @property
    def image_blocks(self) -> int:
        return self.tree_start + self.tree.blocks

    def tree_block(self, level: int, index: int) -> int:
        """Absolute block number of tree block (level, index)."""
        return self.tree_start + self.tree.starts[level] + index

    def region_of(self, block: int) -> str:
        """A human name for the region holding absolute block ``block``."""
        if block == 0:
            return "header"
        if block < self.heap_start:
            return "inode table"
        if block < self.data_start:
            return "metadata heap"
        if block < self.seal_start:
            return "data"
        if block < self.tree_start:
            return "seal table"
        if block < self.image_blocks:
            for level in reversed(range(self.tree.levels)):
                if block - self.tree_start >= self.tree.starts[level]:
                    return f"merkle tree level {level}"
        return "beyond the image"


# -- inode records ------------------------------------------------------------------

# mode, nlink, uid, gid, size, mtime_ns, aux, ref, count, xattr_count, xattr_ref
INODE = _INODE = struct.Struct("<IIIIQqQQIIQ")
INODE_SIZE = _INODE.size  # 64
assert INODE_SIZE == 64


class InodeRecord(
    namedtuple(
        "InodeRecord",
        "mode nlink uid gid size mtime_ns aux ref count xattr_count xattr_ref",
        defaults=(0, 0, 0, 0, 0),
    )
):
    """One inode as stored.

    ``aux`` is the parent inode for a directory, st_rdev for a device node and
    the number of stored (non-hole) blocks for a regular file. ``ref``/``count``
    locate the payload in the heap: directory entries, extents, or the symlink
    target (``count`` bytes). A tuple, so decoding one is a single C call.
    """

    __slots__ = ()

    def pack(self) -> bytes:
        return _INODE.pack(*self)

    @classmethod
    def unpack(cls, raw: bytes | memoryview, offset: int = 0) -> InodeRecord:
        return cls._make(_INODE.unpack_from(raw, offset))


INODES_PER_BLOCK = BLOCK_SIZE // INODE_SIZE


# A directory entry: inode number, name length, name offset in the heap. Entries
# are sorted by name bytes, so lookup is a binary search and readdir an index.
DIRENT = struct.Struct("<IHxxQ")
DIRENT_SIZE = DIRENT.size  # 16

# An extent: file block, data-region block, block count. Sorted by file block,
# non-overlapping; blocks not covered are holes and read as zeros.
EXTENT = struct.Struct("<QQQ")
EXTENT_SIZE = EXTENT.size  # 24

# An xattr: name length, value length, then the name and value bytes.
XATTR_HEAD = struct.Struct("<HI")


def pack_xattrs(xattrs: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(XATTR_HEAD.pack(len(n), len(v)) + n + v for n, v in sorted(xattrs))


def unpack_xattrs(raw: bytes, count: int) -> list[tuple[bytes, bytes]]:
    """Decode ``count`` xattrs from ``raw``; MalformedImageError if they overrun it."""
    out = []
    pos = 0
    for _ in range(count):
        if pos + XATTR_HEAD.size > len(raw):
            raise MalformedImageError("xattr list overruns its record")
        nlen, vlen = XATTR_HEAD.unpack_from(raw, pos)
        pos += XATTR_HEAD.size
        if nlen == 0 or nlen > XATTR_NAME_MAX or vlen > XATTR_VALUE_MAX:
            raise MalformedImageError("xattr with an impossible name or value size")
        if pos + nlen + vlen > len(raw):
            raise MalformedImageError("xattr list overruns its record")
        out.append((bytes(raw[pos : pos + nlen]), bytes(raw[pos + nlen : pos + nlen + vlen])))
        pos += nlen + vlen
    return out


def xattrs_size(xattrs: list[tuple[bytes, bytes]]) -> int:
    return sum(XATTR_HEAD.size + len(n) + len(v) for n, v in xattrs)


def dir_size(entries: int, name_bytes: int) -> int:
    """st_size of a directory: its entry array and names, rounded up to whole blocks."""
    return max(1, blocks_for(entries * DIRENT_SIZE + name_bytes)) * BLOCK_SIZE
