"""The in-memory SEFS inode: what its records say, plus its buffered blocks.

Shared by the page table (which serialises it), the block I/O (which owns its
block map and buffers) and the filesystem (which owns its names).
"""

from __future__ import annotations

import itertools
import stat
from collections.abc import Callable, ItemsView, Iterable, ValuesView
from dataclasses import dataclass

from occlumfs.namespace import EMPTY, Node
from occlumfs.sefs.format import CHUNK_MASK, CHUNK_SHIFT, ENTRY_SIZE, SLOT_HOLE

__all__ = ["EMPTY", "Inode", "InodeTable", "RecordedInode"]
RESIDENT_INODES = 8192  # clean inodes kept in memory beyond those that must stay
RECENT_INODES = 64  # the most recently used inodes, never dropped


class Inode(Node):
    """A node (occlumfs.namespace) with its size and block map; ``dirty`` buffers its
    plaintext blocks. The maps start as the shared EMPTY and become dicts on first use."""

    __slots__ = ("_entries", "chunks", "committed_slots", "dirty", "present", "size")

    def __init__(self, ino: int, mode: int, uid: int = 0, gid: int = 0) -> None:
        Node.__init__(self, ino, mode, uid, gid)
        self.size = 0
        self.chunks: dict[int, bytearray] = EMPTY  # block map chunks (regular files)
        self.present = 0  # block map entries that are not holes
        self.dirty: dict[int, bytes | bytearray | memoryview] = EMPTY  # plaintext blocks
        # chunk -> the slot each of its blocks had at the last commit (0: not noted)
        self.committed_slots: dict[int, bytearray] = EMPTY

    @classmethod
    def recorded(cls, ino: int, fields: tuple, target: bytes = b"", xattrs: dict = EMPTY) -> Inode:
        """The inode a record states: ``fields`` are its mode, nlink, uid, gid, rdev,
        size, atime, mtime, ctime, parent and next cookie (format.InodeRecord's
        order). Not open, nothing buffered; built without the defaults a new inode
        gets first (a listing builds thousands of them)."""
        node = cls.__new__(cls)
        node.mode, node.nlink, node.uid, node.gid, node.rdev, node.size = fields[:6]
        node.atime_ns, node.mtime_ns, node.ctime_ns, node.parent, node.next_cookie = fields[6:]
        node.ino = ino
        node._entries = {} if stat.S_ISDIR(node.mode) else None
        node.target, node.xattrs = target, xattrs or EMPTY
        node.open_count = node.present = 0
        node.chunks = node.dirty = node.committed_slots = EMPTY
        return node

    # A directory read from its pages gets its entries when they are first used
    # (``_entries`` holds the function that reads them until then): its
    # attributes, which a listing of its parent wants, do not need them.
    @property
    def entries(self) -> dict[bytes, tuple[int, int]] | None:  # type: ignore[override]
        entries = self._entries
        if entries is not None and type(entries) is not dict:
            entries = self._entries = entries()
        return entries

    @entries.setter
    def entries(self, value) -> None:
        self._entries = value

    @property
    def is_dir(self) -> bool:
        return self._entries is not None

    def slot(self, block: int) -> int:
        chunk = self.chunks.get(block >> CHUNK_SHIFT)
        off = (block & CHUNK_MASK) * ENTRY_SIZE
        if chunk is None or off >= len(chunk):
            return SLOT_HOLE
        return chunk[off]


class InodeTable:
    """The filesystem's inodes by number, as a dict would give them.

    With a ``load`` function, an inode missing from memory is read from its
    records (``load(ino)``, None when there is none) on first use, and the least
    recently used ones are dropped again beyond ``limit`` -- only those that
    would read back unchanged: not open, no buffered blocks or slots in use,
    and no record changed since the commit (``pinned()`` names those inodes).
    A node is only dropped when another is read in or made, and never one of the last
    ``RECENT_INODES`` used: a request modifies only inodes it used last (the
    namespace fetches again what a long walk, like rename's ancestry check,
    could have pushed out), so no request holds a node that was dropped.
    Inodes removed since the commit stay removed (their records are still in
    the committed pages until the next commit: :meth:`committed` forgets them).
    Without ``load`` every inode is in memory (fsck's whole load).
    """

    def __init__(
        self,
        load: Callable[[int], Inode | None] | None = None,
        pinned: Callable[[], set[int]] = set,
        limit: int = RESIDENT_INODES,
        load_many: Callable[[list[int]], dict[int, Inode]] | None = None,
    ) -> None:
        self._nodes: dict[int, Inode] = {}  # least recently used first
        self._load = load
        self._load_many = load_many
        self._pinned = pinned
        self._gone: set[int] = set()
        self.limit = limit
        self._check_at = limit
        self.loaded = 0  # inodes read from records (for measurements)

    def get(self, ino: int, default: Inode | None = None) -> Inode | None:
        nodes = self._nodes
        node = nodes.pop(ino, None)
        if node is not None:
            nodes[ino] = node  # most recently used: to the end
            return node
        if self._load is None or ino in self._gone:
            return default
        node = self._load(ino)
        if node is None:
            return default
        self.loaded += 1
        nodes[ino] = node
        if len(nodes) > self._check_at:
            self._evict()
        return node

    def fetch(self, inos: Iterable[int]) -> None:
        """Read in together those of ``inos`` not in memory (``load_many``, one pass
        over their pages): a listing's children, before it asks for each."""
        nodes, gone = self._nodes, self._gone
        missing = sorted({ino for ino in inos if ino not in nodes and ino not in gone})
        if not missing or self._load_many is None:
            return
        found = self._load_many(missing)
        self.loaded += len(found)
        nodes.update(found)
        if len(nodes) > self._check_at:
            self._evict()

    def __getitem__(self, ino: int) -> Inode:
        node = self.get(ino)
        if node is None:
            raise KeyError(ino)
        return node

    def __setitem__(self, ino: int, node: Inode) -> None:
        nodes = self._nodes
        nodes[ino] = node
        self._gone.discard(ino)
        if len(nodes) > self._check_at and self._load is not None:
            self._evict()

    def __delitem__(self, ino: int) -> None:
        del self._nodes[ino]
        if self._load is not None:
            self._gone.add(ino)

    def pop(self, ino: int, default: Inode | None = None) -> Inode | None:
        """Remove inode ``ino`` (in memory or not) until the next commit."""
        node = self._nodes.pop(ino, default)
        if self._load is not None:
            self._gone.add(ino)
        return node

    def __contains__(self, ino: int) -> bool:
        return self.get(ino) is not None

    def __len__(self) -> int:
        """The inodes in memory (all of them without ``load``)."""
        return len(self._nodes)

    @property
    def complete(self) -> bool:
        """Whether every inode is in memory."""
        return self._load is None

    def peek(self, ino: int) -> Inode | None:
        """The inode if it is in memory; nothing is read or reordered."""
        return self._nodes.get(ino)

    def values(self) -> ValuesView[Inode]:
        return self._nodes.values()

    def items(self) -> ItemsView[int, Inode]:
        return self._nodes.items()

    def committed(self) -> None:
        """A commit dropped the records of the inodes removed since the last one."""
        self._gone.clear()

    def _evict(self) -> None:
        nodes = self._nodes
        keep = self.limit * 3 // 4
        pinned = self._pinned()
        drop = []
        # The most recently used stay whatever the limit: a request's own inodes.
        for ino, node in itertools.islice(nodes.items(), max(len(nodes) - RECENT_INODES, 0)):
            if len(nodes) - len(drop) <= keep:
                break
            if (
                not node.open_count
                and not node.dirty
                and node.committed_slots is EMPTY
                and ino not in pinned
            ):
                drop.append(ino)
        for ino in drop:
            del nodes[ino]
        # What must stay does not count: look again once a quarter more came in,
        # or as many as must stay (naming them costs a pass over the changed
        # records: a burst of creations between commits pays it rarely).
        self._check_at = max(self.limit, len(nodes) + max(self.limit // 4, len(pinned)))


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
