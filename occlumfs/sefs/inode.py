"""The in-memory SEFS inode: what its records say, plus its buffered blocks.

Shared by the page table (which serialises it), the block I/O (which owns its
block map and buffers) and the filesystem (which owns its names).
"""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass
from types import MappingProxyType

from occlumfs.sefs.format import CHUNK_MASK, CHUNK_SHIFT, ENTRY_SIZE, SLOT_HOLE

# The dicts below start as this shared read-only empty map and are replaced by
# a real dict on first change: most inodes never need them, and 100,000 inodes
# times four empty dicts is 25 MB.
EMPTY: dict = MappingProxyType({})  # type: ignore[assignment]


class Inode:
    __slots__ = (
        "atime_ns",
        "chunks",
        "committed_slots",
        "ctime_ns",
        "dirty",
        "entries",
        "gid",
        "ino",
        "mode",
        "mtime_ns",
        "next_cookie",
        "nlink",
        "open_count",
        "parent",
        "present",
        "rdev",
        "size",
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
        self.size = 0
        self.atime_ns = self.mtime_ns = self.ctime_ns = now
        self.parent = 0
        self.next_cookie = 1
        self.entries: dict[bytes, tuple[int, int]] | None = {} if stat.S_ISDIR(mode) else None
        self.target = b""
        self.xattrs: dict[bytes, bytes] = EMPTY
        self.chunks: dict[int, bytearray] = EMPTY  # block map chunks (regular files)
        self.present = 0  # block map entries that are not holes
        self.dirty: dict[int, bytes | bytearray | memoryview] = EMPTY  # plaintext blocks
        self.committed_slots: dict[int, int] = EMPTY
        self.open_count = 0

    @property
    def is_dir(self) -> bool:
        return self.entries is not None

    def slot(self, block: int) -> int:
        chunk = self.chunks.get(block >> CHUNK_SHIFT)
        off = (block & CHUNK_MASK) * ENTRY_SIZE
        if chunk is None or off >= len(chunk):
            return SLOT_HOLE
        return chunk[off]


@dataclass(frozen=True, slots=True)
class RecordedInode:
    """An inode as its records state it, for offline checks (fsck): a copy, not a view."""

    ino: int
    mode: int
    nlink: int
    parent: int
    target: bytes
    entries: tuple[tuple[bytes, int], ...]  # a directory's (name, inode); () otherwise

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)
