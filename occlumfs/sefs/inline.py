"""Small files' data inline in their inode record (SEFS format version 4).

A regular file of at most INLINE_MAX bytes that has no data block (no block
map entry that is not a hole, nothing buffered) keeps its bytes in its inode
record's ``target`` field, which only symlinks use otherwise
(docs/formats/sefs.md, "Inline data"). It then has no host data file: a
create, a write, a flush and a read of it touch no host file but the sealed
metadata pages (at a commit) and the log (at an fsync), whose record carries
the data like any other field.

The bytes are kept padded with zeros to a multiple of INLINE_PAD (the record,
and so the sealed page and the log entry, tells the host a small file's size
to INLINE_PAD bytes, not to the byte); the inode's ``size`` says how many are
the file's, and bytes past ``len(target)`` up to ``size`` are zeros.

A file goes to blocks when a write or a truncate takes it past INLINE_MAX:
its inline bytes become a buffered write of block 0 (``BlockIO.write``) before
the change itself. A truncate that cuts a file in blocks to at most INLINE_MAX
bytes brings it back inline: its bytes move to the record and its blocks are
dropped (a truncate to 0 drops them all, and the file is inline again from its
next write). Its host data file stays until the file is deleted, as before.
"""

from __future__ import annotations

import stat

from occlumfs.sefs.blocks import BlockIO
from occlumfs.sefs.inode import Inode

INLINE_MAX = 3072  # bytes: a larger file keeps its data in blocks
INLINE_PAD = 64  # inline bytes are stored zero-padded to a multiple of this
# Inline bytes added since the last commit, at most: they stay in memory (their
# inodes cannot leave it) and go to the host only with the next commit's pack,
# for which the store keeps this much disk room free.
PENDING_MAX = 2 << 20


def padded(data: bytes | bytearray) -> bytes:
    """``data`` with zeros up to the next multiple of INLINE_PAD (nothing when empty)."""
    return bytes(data) + bytes(-len(data) % INLINE_PAD)


def in_blocks(node: Inode) -> bool:
    """Whether ``node`` keeps data in blocks (mapped or buffered ones)."""
    return bool(node.present or node.dirty)


def problems(node: Inode, inline_allowed: bool) -> list[str]:
    """What is wrong with regular file ``node``'s inline data (fsck), each one line."""
    data = node.target
    if not data:
        return []
    if not inline_allowed:
        return ["inline data in a store of a version without it"]
    out = []
    if node.present:
        out.append("has both inline data and data blocks")
    if node.size > INLINE_MAX:
        out.append(f"inline data in a file of {node.size} bytes (more than {INLINE_MAX})")
    if len(data) % INLINE_PAD or len(data) > len(padded(bytes(node.size))):
        out.append(f"inline data of {len(data)} bytes is not the padded size")
    elif data[node.size :].strip(b"\0"):
        out.append("inline data has bytes past the end of the file")
    return out


class InlineData:
    """Reads and writes of inline files, and their moves to blocks, for SefsFS."""

    def __init__(self, io: BlockIO) -> None:
        self._io = io
        self.pending = 0  # inline bytes added since the last commit (SefsFS resets it)

    def fits(self, node: Inode, offset: int, size: int) -> bool:
        """Whether a write of ``size`` bytes at ``offset`` would keep ``node`` inline
        and the inline bytes added since the commit within PENDING_MAX."""
        end = offset + size
        if node.present or node.dirty or end > INLINE_MAX or node.size > INLINE_MAX:
            return True  # not an inline write: write() says so
        return self.pending + end - len(node.target) <= PENDING_MAX

    def write(self, node: Inode, offset: int, data: bytes) -> bool:
        """Write ``data`` at ``offset`` into ``node``'s inline bytes; False when the
        write is one for the blocks (the file already has some, or this one takes
        it past INLINE_MAX: its inline bytes are then moved to block 0 first).
        The caller updates the size and marks the inode changed."""
        end = offset + len(data)
        if node.present or node.dirty:
            return False
        if end > INLINE_MAX or node.size > INLINE_MAX:
            self.spill(node)
            return False
        old = node.target
        if offset >= len(old):
            new = old + bytes(offset - len(old)) + data
        else:
            new = old[:offset] + data + old[end:]
        node.target = padded(new)
        self.pending += len(node.target) - len(old)
        return True

    def spill(self, node: Inode) -> None:
        """Move ``node``'s inline bytes to a buffered write of block 0."""
        data = node.target[: node.size]
        if data.strip(b"\0"):
            self._io.write(node, 0, data)  # may fail (ENOSPC): the node stays as it was
        node.target = b""

    def truncate(self, node: Inode, size: int) -> bool:
        """Cut or extend ``node`` when it is inline, or cut a file in blocks to at most
        INLINE_MAX bytes (its bytes move inline, its blocks are dropped); False when the
        blocks' truncate should do it (the file stays in blocks, or grows past
        INLINE_MAX: moved first)."""
        if not stat.S_ISREG(node.mode):
            return False
        if not node.target:
            return self._shrink(node, size)
        if size > INLINE_MAX:
            self.spill(node)
            return False
        if size < len(node.target):
            node.target = padded(node.target[:size])
        node.size = size
        return True

    def _shrink(self, node: Inode, size: int) -> bool:
        """Bring a file in blocks cut to ``size`` (0 < size <= INLINE_MAX) back inline."""
        if not 0 < size <= INLINE_MAX or size >= node.size or not in_blocks(node):
            return False
        data = padded(bytes(self._io.read(node, 0, 0)[:size]).rstrip(b"\0"))
        if self.pending + len(data) > PENDING_MAX:
            return False  # stays in blocks: the inline bytes waiting for a commit are bounded
        self._io.truncate(node, 0)  # every block dropped (the committed slots are noted)
        node.target = data
        node.size = size
        self.pending += len(data)
        return True

    @staticmethod
    def read(node: Inode, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of an inline file (zeros past its stored bytes)."""
        end = min(offset + size, node.size)
        if offset >= end:
            return b""
        data = node.target[offset:end]
        return data + bytes(end - offset - len(data))
