"""The in-memory SEFS inode: what its records say, plus its buffered blocks.

Shared by the page table (which serialises it), the block I/O (which owns its
block map and buffers) and the filesystem (which owns its names).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from occlumfs.namespace import EMPTY, Node
from occlumfs.sefs.format import CHUNK_MASK, CHUNK_SHIFT, ENTRY_SIZE, SLOT_HOLE

__all__ = ["EMPTY", "Inode", "RecordedInode"]


class Inode(Node):
    """A node (occlumfs.namespace) with its size and block map; ``dirty`` buffers its
    plaintext blocks. The maps start as the shared EMPTY and become dicts on first use."""

    __slots__ = ("chunks", "committed_slots", "dirty", "present", "size")

    def __init__(self, ino: int, mode: int, uid: int = 0, gid: int = 0) -> None:
        Node.__init__(self, ino, mode, uid, gid)
        self.size = 0
        self.chunks: dict[int, bytearray] = EMPTY  # block map chunks (regular files)
        self.present = 0  # block map entries that are not holes
        self.dirty: dict[int, bytes | bytearray | memoryview] = EMPTY  # plaintext blocks
        self.committed_slots: dict[int, int] = EMPTY

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
