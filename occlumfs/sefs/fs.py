"""SefsFS: the writable, encrypted, tamper- and rollback-evident filesystem object.

The metadata (inodes, directory entries, block maps) is persisted as records
spread over encrypted pages; inodes are read from their pages when first used
and dropped from memory again when clean (:class:`InodeTable`); file data
stays on the host and is read and decrypted per request. See docs/formats/sefs.md for the
layout and the commit protocol. The work is shared out by room:

* :mod:`occlumfs.sefs.inode` -- the in-memory inode;
* :mod:`occlumfs.sefs.load` -- head, root and pages into inodes, at open;
* :mod:`occlumfs.sefs.pages` -- the page table: records, pages and the commit;
* :mod:`occlumfs.sefs.blocks` -- file data: buffering, block crypto, host I/O;
* :mod:`occlumfs.sefs.statewriter` -- the trusted state's writes, off the request path;
* :mod:`occlumfs.namespace` -- names, links and handles, shared with MemFS;
* this module -- the rest of the contract (:class:`occlumfs.fs.Filesystem`):
  attributes, listings, reads and writes, statfs, and when to commit.

A directory's ``entries`` dict is in cookie order (every insert takes the
next cookie and goes to the end), so a listing resumes by bisection.
"""

from __future__ import annotations

import bisect
import errno
import os
import stat
import time
from collections.abc import Iterator

from occlumfs.errors import FSError, IntegrityError
from occlumfs.fs import ROOT_INO, Attr, Caller, DirEntry, FsInfo, StatFs
from occlumfs.namespace import Namespace, attr_of
from occlumfs.sefs import format as fmt
from occlumfs.sefs.blocks import BlockIO
from occlumfs.sefs.format import BLOCK_SIZE
from occlumfs.sefs.held import HeldWrites
from occlumfs.sefs.inline import PENDING_MAX, InlineData, problems
from occlumfs.sefs.inode import Inode, InodeTable, RecordedInode
from occlumfs.sefs.journal import Dirty, Journal
from occlumfs.sefs.keys import INLINE_VERSION, LOG_VERSION, Keys
from occlumfs.sefs.load import (
    load_all,
    materialise,
    materialise_many,
    open_root,
    remove_leftovers,
)
from occlumfs.sefs.pages import PageTable
from occlumfs.sefs.state import DirLock, TrustedState
from occlumfs.sefs.statewriter import StateWriter
from occlumfs.sefs.storage import Storage

COMMIT_INTERVAL = 10.0  # seconds a change may wait for a commit unless fsync asks sooner
DIRTY_RECORDS_MAX = 8192  # changed records a commit waits for at most (they stay in memory)
RESERVE_BLOCKS = 256  # free blocks kept for the next commit's pack, beyond the live packs' size
READDIR_FETCH = 128  # children a listing reads in together (one pass over their pages)
READAHEAD_KB = 1024  # kernel read-ahead of a mount (KiB): the largest READ libfuse takes


class _DirHandle:
    __slots__ = ("cookies", "ino", "names", "stamp")

    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.stamp = -1
        self.cookies: list[int] = []
        self.names: list[bytes] = []


class SefsFS(Namespace):
    """A mounted (or offline-opened) SEFS directory."""

    def __init__(
        self,
        storage: Storage,
        keys: Keys,
        *,
        name: str = "sefs",
        read_only: bool = False,
        trusted_state: TrustedState | None = None,
        lock: DirLock | None = None,
        tolerant: bool = False,
        commit_interval: float = COMMIT_INTERVAL,
        _new: bool = False,
    ) -> None:
        # 1 MiB kernel read-ahead: a sequential reader's READs arrive 1 MiB at a time
        # instead of 128 KiB, an eighth of the requests (docs/performance.md).
        self.info = FsInfo(
            name=name, subtype="occlumfs-sefs", read_only=read_only, readahead_kb=READAHEAD_KB
        )
        self.storage = storage
        self.read_only = read_only
        self.problems: list[tuple[int | None, str]] = []  # (ino, what), found in tolerant mode
        self._state = trusted_state
        self._lock = lock
        self._commit_interval = commit_interval
        # fsck (tolerant) holds every inode; a mount reads them from their pages on demand.
        self._nodes = InodeTable(  # type: ignore[assignment]
            None if tolerant else lambda ino: materialise(self._pages, ino),
            self._pinned,
            load_many=None if tolerant else lambda inos: materialise_many(self._pages, inos),
        )
        self._pages = PageTable(storage, keys.meta, keys.head_mac, keys.fs_id, self._nodes)
        self._pages.dirty = self._dirty_keys = Dirty()
        # Version 3: an fsync's blocks go to the log and wait in memory for the commit.
        self._held = HeldWrites(storage) if keys.version >= LOG_VERSION else None
        data_storage: Storage = self._held or storage  # type: ignore[assignment]
        self._journal = (
            Journal(data_storage, keys, self._pages, self._nodes)
            if keys.version >= LOG_VERSION
            else None
        )
        self._io = BlockIO(
            data_storage,
            keys.data,
            keys.fs_id,
            self._nodes,
            self._dirty_keys,
            self.path_of,
            self._room,
        )
        # Version 4: small files' data lives in their inode records (occlumfs.sefs.inline).
        self._inline = InlineData(self._io) if keys.version >= INLINE_VERSION else None
        self._next_ino = ROOT_INO + 1
        self._handles: dict[int, int] = {}
        self._dir_handles: dict[int, _DirHandle] = {}
        self._next_fh = 1
        self._last_commit = time.monotonic()
        self._state_writer = StateWriter(trusted_state)
        if _new:
            root = Inode(ROOT_INO, stat.S_IFDIR | 0o755)
            root.nlink = 2
            root.parent = ROOT_INO
            self._nodes[ROOT_INO] = root
            self._dirty_keys.add(fmt.inode_key(ROOT_INO))
        elif tolerant:
            self._next_ino = load_all(
                self._pages,
                self._nodes,
                keys,
                state=trusted_state,
                tolerant=tolerant,
                problems=self.problems,
            )
        else:
            self._next_ino = open_root(self._pages, keys, trusted_state)
            if self._nodes.get(ROOT_INO) is None:
                raise IntegrityError("metadata: the root directory is missing")
        if not _new:
            replayed = None
            if self._journal is not None:
                replayed = self._journal.replay(trusted_state, self._io.write)
                self._next_ino = max(self._next_ino, replayed or 0)
            if not read_only and not tolerant:
                remove_leftovers(self._pages, self._nodes, self._next_ino)
                if self._journal is not None:
                    self._journal.remove_leftovers()
                if replayed is not None:
                    self._io.measure()
                    self.commit()  # the log's entries become a commit: the log is stale
                    self._journal.discard_stale()  # type: ignore[union-attr]
        if not read_only:
            self._io.measure()
        self._first_new_ino = self._next_ino  # inodes from here on were made since the commit

    # == lifecycle ==========================================================================
    def started_serving(self) -> None:
        if self._lock is not None:
            self._lock.write_pid()

    def close(self) -> None:
        try:
            if not self.read_only:
                self.commit()
                if self._journal is not None:
                    self._journal.discard_stale()  # the next open has no log to read
        finally:
            try:
                self._state_writer.drain()  # the last commit's state is written
            finally:
                self.storage.close()
                if self._lock is not None:
                    self._lock.release()

    # == committing =========================================================================
    def commit(self) -> None:
        """Make every change so far durable under a new root (docs/formats/sefs.md)."""
        if self.read_only:
            return
        self._io.flush_all()
        if self._held is not None:  # the blocks fsyncs logged go to their slots now
            self._held.write_out(self._io.written())
        if not self._dirty_keys:
            if self._inline is not None:
                self._inline.pending = 0
            return
        try:
            self._pages.commit(self._next_ino, self._io.written())
        except BaseException:
            if self._journal is not None:
                self._journal.broken = True  # the log may follow either head: commit next time
            raise
        self._nodes.committed()
        self._io.committed()
        self._first_new_ino = self._next_ino
        if self._held is not None:
            self._held.passed.clear()  # all of their inodes are older than that now
        if self._inline is not None:
            self._inline.pending = 0
        if self._journal is not None:
            self._journal.reset()
        self._last_commit = time.monotonic()
        if self._state is not None:
            self._state_writer.submit(self._pages.counter, self._pages.root_tag)
        self._pages.discard_dead_packs()
        self._io.discard_doomed()
        self._io.measure()

    def _room(self) -> int | None:
        """Blocks the store's disk can still take, less a reserve for the next commit
        (a compaction rewrites every live page): bounds the buffered blocks."""
        host = self.storage.statvfs()
        if host is None:
            return None
        free = host.f_bavail * host.f_frsize // BLOCK_SIZE
        reserve = RESERVE_BLOCKS + sum(self._pages.pack_sizes.values()) // BLOCK_SIZE
        if self._inline is not None:  # ...and the inline bytes it may have to write
            reserve += PENDING_MAX // BLOCK_SIZE
        return max(free - reserve, 0)

    def _pinned(self) -> set[int]:
        """The inodes with a record changed since the commit: they must stay in memory."""
        return {int.from_bytes(key[1:9], "big") for key in self._dirty_keys}

    # == namespace hooks (occlumfs.namespace): what a change must record ===================
    def _changed(self) -> None:
        """After a change: commit when changes have waited long enough."""
        if (
            len(self._dirty_keys) > DIRTY_RECORDS_MAX
            or time.monotonic() - self._last_commit >= self._commit_interval
        ):
            self.commit()

    def _make_node(self, ino: int, mode: int, caller: Caller) -> Inode:
        return Inode(ino, mode, caller.uid, caller.gid)

    def _truncate(self, node: Inode, size: int) -> None:
        if size > fmt.MAX_FILE_SIZE:
            raise FSError(errno.EFBIG)
        if self._inline is None or not self._inline.truncate(node, size):
            self._io.truncate(node, size)

    def _dirtied(self, node: Inode) -> None:
        self._dirty_keys.add(fmt.inode_key(node.ino))

    def _entry_added(self, pnode: Inode, name: bytes, cookie: int) -> None:
        self._dirty_keys.add(fmt.entry_key(pnode.ino, name))

    _entry_removed = _entry_added  # either way the entry's record changed

    def _unlinked(self, node: Inode) -> None:
        # Its records leave the committed tree with the next commit.
        for c in node.chunks:
            self._dirty_keys.add(fmt.map_key(node.ino, c))

    def _freed(self, node: Inode) -> None:
        held = self._held
        if held is None:
            self._io.forget(node)
            return
        names = [fmt.data_name(node.ino, slot) for slot in (fmt.SLOT_A, fmt.SLOT_B)]
        # An inode made since the last commit whose blocks were never written to the
        # host (inline, or only held) has no data file to delete.
        on_host = node.ino < self._first_new_ino or not held.passed.isdisjoint(names)
        self._io.forget(node, on_host)
        held.forget(names)  # its held blocks will never be written

    # == offline inspection (fsck) ==========================================================
    def path_of(self, ino: int) -> str:
        """A path of ``ino`` for messages (a search of the directories in memory:
        only used when reporting)."""
        if ino == ROOT_INO:
            return "/"
        for parent in self._nodes.values():
            if parent.is_dir:
                for name, (child, _) in parent.entries.items():
                    if child == ino:
                        head = self.path_of(parent.ino) if parent.ino != ROOT_INO else ""
                        return f"{head}/{os.fsdecode(name)}"
        node = self._nodes.peek(ino)
        return f"<inode {ino}{', unlinked' if node is not None and not node.nlink else ''}>"

    def recorded(self) -> dict[int, RecordedInode]:
        """Every inode as its records state it, by number: a snapshot for fsck."""
        inos = {ino for ino, _ in self._nodes.items()}
        if not self._nodes.complete:  # and those only in the committed pages
            inos.update(int.from_bytes(k[1:], "big") for k, _ in self._pages.scan(b"i", b"j"))
        out = {}
        for ino in sorted(inos):
            node = self._nodes.get(ino)
            if node is not None:
                entries = node.entries.items() if node.is_dir else ()
                out[ino] = RecordedInode(
                    ino,
                    node.mode,
                    node.nlink,
                    node.parent,
                    node.target,
                    tuple((name, child) for name, (child, _) in entries),
                )
        return out

    def verify_file(self, ino: int) -> Iterator[str]:
        """Problems with ``ino``'s inline data and stored blocks (fsck): each one line."""
        node = self._nodes[ino]
        for what in problems(node, self._inline is not None):
            yield f"{self.path_of(ino)}: {what}"
        yield from self._io.verify(node)

    # == read side =========================================================================
    def _attr(self, node: Inode) -> Attr:
        if node.is_dir:
            size = 0
            blocks = 0
        elif not node.target:
            size = node.size
            extra = sum(1 for b in node.dirty if not node.slot(b)) if node.dirty else 0
            blocks = (node.present + extra) * (BLOCK_SIZE // 512)
        elif stat.S_ISREG(node.mode):  # its data inline in its record: what that holds
            size = node.size
            blocks = -(-len(node.target) // 512)
        else:
            size = len(node.target)
            blocks = 0
        return attr_of(node, size, blocks)

    def opendir(self, ino: int) -> int:
        self._dir(ino)
        fh = self._next_fh
        self._next_fh += 1
        self._dir_handles[fh] = _DirHandle(ino)
        return fh

    def readdir(self, fh: int, offset: int) -> Iterator[DirEntry]:
        handle = self._dir_handles.get(fh)
        if handle is None:
            raise FSError(errno.EBADF)
        node = self._nodes.get(handle.ino)
        if node is None or not node.is_dir:
            return
        entries = node.entries
        if handle.stamp != node.next_cookie:
            # Entries were added since the last snapshot (removals need none: they are
            # skipped below). Cookie order is dict order, so the lists are sorted.
            handle.names = list(entries)
            handle.cookies = [cookie for _, cookie in entries.values()]
            handle.stamp = node.next_cookie
        names, cookies = handle.names, handle.cookies
        nodes, first = self._nodes, bisect.bisect_right(cookies, offset)
        for i in range(first, len(names)):
            if not (i - first) % READDIR_FETCH:  # the next children, read in together
                batch = (entries.get(name) for name in names[i : i + READDIR_FETCH])
                nodes.fetch(entry[0] for entry in batch if entry is not None)
            entry = entries.get(names[i])
            if entry is None or entry[1] != cookies[i]:
                continue
            yield DirEntry(names[i], self._attr(nodes[entry[0]]), entry[1])

    def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    def read(self, fh: int, offset: int, size: int) -> bytes:
        ino = self._handles.get(fh)
        if ino is None:
            raise FSError(errno.EBADF)
        node = self._nodes[ino]
        end = offset + size
        if end > node.size:
            end = node.size
        if offset >= end:
            return b""
        if node.target:  # inline (version 4): no host file
            return self._inline.read(node, offset, size)  # type: ignore[union-attr]
        first = offset // BLOCK_SIZE
        last = (end - 1) // BLOCK_SIZE
        data = self._io.read(node, first, last)
        start = offset - first * BLOCK_SIZE
        if start == 0 and len(data) == end - offset:
            return data
        return bytes(memoryview(data)[start : start + end - offset])

    def statfs(self) -> StatFs:
        host = self.storage.statvfs()
        # Inodes in use: all in memory (fsck) or at most every one made so far.
        files = len(self._nodes) if self._nodes.complete else self._next_ino - 1
        if host is None:
            total = 1 << 20
            return StatFs(
                blocks=total, bfree=total, bavail=total, files=files + (1 << 20), ffree=1 << 20
            )
        scale = host.f_frsize / BLOCK_SIZE
        ffree = host.f_ffree if host.f_files else 1 << 20
        return StatFs(
            blocks=int(host.f_blocks * scale),
            bfree=int(host.f_bfree * scale),
            bavail=int(host.f_bavail * scale),
            files=files + ffree,
            ffree=ffree,
        )

    # == write side ========================================================================
    def write(self, fh: int, offset: int, data: bytes) -> int:
        self._writable()
        node = self._handle(fh)
        size = len(data)
        if size == 0:
            return 0
        if offset + size > fmt.MAX_FILE_SIZE:  # as the kernel does at a file system's limit:
            if offset >= fmt.MAX_FILE_SIZE:  # what fits is written, the rest refused
                raise FSError(errno.EFBIG)
            size = fmt.MAX_FILE_SIZE - offset
            data = data[:size]
        inline = self._inline
        if inline is not None and not inline.fits(node, offset, size):
            self.commit()  # bounds the inline bytes in memory; a full disk fails this write
        try:
            self._store(node, offset, data)
        except FSError as exc:
            # A full disk may be full of files already deleted: their data goes at
            # the next commit. Commit now, as ext4 frees at unlink, and try again
            # (a failed write left nothing of itself behind).
            if exc.errno != errno.ENOSPC or not self._io.freeing:
                raise
            self.commit()
            self._io.wait_freed()
            self._store(node, offset, data)
        if offset + size > node.size:
            node.size = offset + size
        if self._stamp_writes:
            self._touch(node)
        else:  # the kernel keeps the times (and sends them with setattr)
            self._dirtied(node)
        self._changed()
        return size

    def _store(self, node: Inode, offset: int, data: bytes) -> None:
        """Buffer ``data`` at ``offset``: inline in the file's record while it fits."""
        if self._inline is None or not self._inline.write(node, offset, data):
            self._io.write(node, offset, data)

    def flush(self, fh: int) -> None:
        """On close: write the file's buffered blocks out, so that a full disk fails the
        close at the latest. (The commit still waits for fsync or the timer.)"""
        node = self._handle(fh)
        self._io.flush(node)  # ...and waits for blocks being written behind

    def fsync(self, fh: int, datasync: bool) -> None:
        self.sync()

    def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.sync()

    def sync(self) -> None:
        """Make every change so far durable: one log entry (one host barrier) when the
        store has a log and the change is small, else a commit (docs/formats/sefs.md)."""
        journal = self._journal
        if journal is None or self.read_only:
            self.commit()
            return
        held = self._held
        held.holding = True  # type: ignore[union-attr]
        try:
            self._io.flush_all()  # small writes stay in memory: the log entry holds them
        finally:
            held.holding = False  # type: ignore[union-attr]
        logged = journal.append(self._next_ino) if self._dirty_keys else False
        if logged is None:
            self.commit()  # too much for the log, or it is unusable: a checkpoint
        elif logged and self._state is not None:
            self._state_writer.submit(
                self._pages.counter, self._pages.root_tag, journal.seq, journal.prev
            )

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Attr:
        if stat.S_IFMT(mode) not in (
            stat.S_IFREG,
            stat.S_IFIFO,
            stat.S_IFCHR,
            stat.S_IFBLK,
            stat.S_IFSOCK,
        ):
            raise FSError(errno.EINVAL)
        node = self._new(parent, name, mode, caller)
        node.rdev = rdev
        self._changed()
        return self._attr(node)
