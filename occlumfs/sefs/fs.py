"""SefsFS: the writable, encrypted, tamper- and rollback-evident filesystem object.

The whole metadata (inodes, directory entries, block maps) is held in memory
and persisted as records spread over encrypted pages; file data stays on the
host and is read and decrypted per request. See docs/formats/sefs.md for the
layout and the commit protocol; this module keeps these invariants:

* ``_dirty_keys`` names every record whose value changed since the last
  commit; a commit re-seals exactly the pages holding them.
* A directory's ``entries`` dict is in cookie order (every insert takes the
  next cookie and goes to the end), so a listing resumes by bisection.
* A block's committed slot is never written before the next commit: the slot
  a block had at the last commit is remembered in ``committed_slots`` the
  first time the block is touched, and writes go to the other slot. (A block
  that was a hole at the last commit needs no record: both slots are free.)
* Bytes past ``size`` in the last block are zero (truncate zeroes them), so
  growing a file exposes zeros.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import stat
import struct
import time
from collections.abc import Iterator
from operator import itemgetter
from types import MappingProxyType

from cryptography.exceptions import InvalidTag

from occlumfs.errors import FSError, IntegrityError
from occlumfs.fs import (
    RENAME_NOREPLACE,
    ROOT_INO,
    Attr,
    AttrChanges,
    Caller,
    DirEntry,
    Filesystem,
    FsInfo,
    StatFs,
    check_rename_target,
    check_xattr_flags,
)
from occlumfs.sefs import format as fmt
from occlumfs.sefs.format import BLOCK_SIZE, ENTRY_SIZE, SLOT_A, SLOT_B, SLOT_HOLE
from occlumfs.sefs.keys import Keys
from occlumfs.sefs.state import DirLock, TrustedState
from occlumfs.sefs.storage import Storage

log = logging.getLogger("occlumfs.sefs")

DIRTY_LIMIT_BLOCKS = 8192  # 32 MiB of plaintext buffered before data is written out
COMMIT_INTERVAL = 10.0  # seconds a change may wait for a commit unless fsync asks sooner
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 65536
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_BLOCK_AD = struct.Struct(">QQ")
_WRITE_RUN = 512  # blocks per pwritev (below IOV_MAX)
_STRIDE = BLOCK_SIZE + fmt.TAG_SIZE  # a block's ciphertext and its tag
_SLOT_BYTES = {SLOT_A: bytes((SLOT_A,)), SLOT_B: bytes((SLOT_B,))}
_STRIDE = BLOCK_SIZE + fmt.TAG_SIZE  # a ciphertext block and its tag, as AES-GCM reads them


_EMPTY: dict = MappingProxyType({})  # type: ignore[assignment]


class _Inode:
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
        # The dicts below start as the shared read-only _EMPTY and are replaced
        # by a real dict on first change: most inodes never need them, and
        # 100,000 inodes times four empty dicts is 25 MB.
        self.xattrs: dict[bytes, bytes] = _EMPTY
        self.chunks: dict[int, bytearray] = _EMPTY  # block map chunks (regular files)
        self.present = 0  # block map entries that are not holes
        self.dirty: dict[int, bytes | bytearray | memoryview] = _EMPTY  # plaintext blocks
        self.committed_slots: dict[int, int] = _EMPTY
        self.open_count = 0

    @property
    def is_dir(self) -> bool:
        return self.entries is not None

    def slot(self, block: int) -> int:
        chunk = self.chunks.get(block >> 8)
        off = (block & 255) * ENTRY_SIZE
        if chunk is None or off >= len(chunk):
            return SLOT_HOLE
        return chunk[off]


class _DirHandle:
    __slots__ = ("cookies", "ino", "names", "stamp")

    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.stamp = -1
        self.cookies: list[int] = []
        self.names: list[bytes] = []


class SefsFS(Filesystem):
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
        self.info = FsInfo(name=name, subtype="occlumfs-sefs", read_only=read_only)
        self.storage = storage
        self.read_only = read_only
        self.problems: list[tuple[int | None, str]] = []  # (ino, what), found in tolerant mode
        self._keys = keys
        self._fs_id = keys.fs_id
        self._data_prefix = fmt.data_ad_prefix(keys.fs_id)
        self._state = trusted_state
        self._lock = lock
        self._tolerant = tolerant
        self._commit_interval = commit_interval
        self._inodes: dict[int, _Inode] = {}
        # Pages partition the sorted key space: page i holds the keys in
        # [_starts[i], _starts[i + 1]); _members[i] are its keys, _table[i] its object.
        self._starts: list[bytes] = [b""]
        self._members: list[set[bytes]] = [set()]
        self._table: list[fmt.ObjectRef | None] = [None]
        self._pack_sizes: dict[int, int] = {}
        self._counter = 0
        self._root_tag = b""
        self._next_ino = ROOT_INO + 1
        self._dirty_keys: set[bytes] = set()
        self._dirty_inodes: set[int] = set()  # inodes with buffered plaintext blocks
        self._dirty_blocks = 0
        self._slot_touched: set[int] = set()
        self._written: set[str] = set()  # data files written since the last commit
        self._doomed: set[str] = set()  # data files to delete once a commit drops them
        self._handles: dict[int, int] = {}
        self._dir_handles: dict[int, _DirHandle] = {}
        self._next_fh = 1
        self._last_commit = time.monotonic()
        self._cipher_buf = bytearray(0)  # reused: fresh memory per flush costs page faults
        self._raw_buf = bytearray(0)
        self._raw_view = memoryview(self._raw_buf)
        self.failed_pages: set[int] = set()
        self._expected_entries: dict[int, int] = {}  # directory -> entry count on record
        if _new:
            root = _Inode(ROOT_INO, stat.S_IFDIR | 0o755)
            root.nlink = 2
            root.parent = ROOT_INO
            self._inodes[ROOT_INO] = root
            self._dirty_keys.add(fmt.inode_key(ROOT_INO))
        else:
            self._load()

    # == loading ============================================================================
    def _page_of(self, key: bytes) -> int:
        return bisect.bisect_right(self._starts, key) - 1

    def _open_object(self, packs: dict[int, bytes], ref: fmt.ObjectRef, ad: bytes, what: str):
        data = packs.get(ref.pack)
        if data is None:
            name = fmt.pack_name(ref.pack)
            try:
                data = packs[ref.pack] = self.storage.read(name)
            except FileNotFoundError:
                raise IntegrityError(f"{what}: metadata pack {name} is missing") from None
            self._pack_sizes[ref.pack] = len(data)
        obj = data[ref.offset : ref.offset + ref.length]
        if len(obj) != ref.length or ref.length < fmt.NONCE_SIZE + fmt.TAG_SIZE:
            raise IntegrityError(f"{what}: metadata pack {fmt.pack_name(ref.pack)} is truncated")
        if obj[-fmt.TAG_SIZE :] != ref.tag:
            raise IntegrityError(
                f"{what}: does not match its recorded tag (replaced or rolled back)"
            )
        try:
            return self._keys.meta.decrypt(obj[: fmt.NONCE_SIZE], obj[fmt.NONCE_SIZE :], ad)
        except InvalidTag:
            raise IntegrityError(f"{what}: authentication failed (tampered or moved)") from None

    def _problem(self, ino: int | None, what: str) -> None:
        if not self._tolerant:
            raise IntegrityError(f"metadata inconsistent: inode {ino}: {what}")
        self.problems.append((ino, what))

    def _load(self) -> None:
        try:
            raw = self.storage.read(fmt.HEAD_NAME)
        except FileNotFoundError:
            raise IntegrityError("head: the commit record is missing") from None
        head = fmt.parse_head(raw, self._fs_id, self._keys.head_mac)
        if self._state is not None and not self._state.check(head.counter, head.root.tag):
            # Trust on first use: pin what this machine sees now, so that from here
            # on an older snapshot of the directory is refused.
            self._state.update(head.counter, head.root.tag)
        packs: dict[int, bytes] = {}
        root = fmt.parse_root(
            self._open_object(packs, head.root, fmt.root_ad(self._fs_id, head.counter), "root")
        )
        self._counter = head.counter
        self._root_tag = head.root.tag
        self._next_ino = root.next_ino
        count = len(root.pages)
        self._starts = list(root.first_keys)
        self._members = [set() for _ in range(count)]
        self._table = list(root.pages)
        inode_recs: list[tuple[int, bytes]] = []
        entry_recs: list[tuple[int, int, bytes, int]] = []  # (cookie, parent, name, child)
        map_recs: list[tuple[int, int, bytes]] = []
        for page, ref in enumerate(root.pages):
            what = f"metadata page {page}"
            try:
                first = self._starts[page]
                plain = self._open_object(
                    packs, ref, fmt.page_ad(self._fs_id, ref.pack, first), what
                )
                records = fmt.parse_page(plain)
            except IntegrityError as exc:
                if not self._tolerant:
                    raise
                self.failed_pages.add(page)
                self.problems.append((None, str(exc)))
                continue
            members = self._members[page]
            # The page's range, [low, high): the same test as _page_of(key) == page,
            # since parse_root checked that first keys strictly increase.
            low = self._starts[page]
            high = self._starts[page + 1] if page + 1 < count else None
            for key, value in records:
                if key < low or (high is not None and key >= high):
                    raise IntegrityError(f"{what}: holds a record of another page")
                members.add(key)
                kind, ino, rest = fmt.split_key(key)
                if kind == b"i":
                    inode_recs.append((ino, value))
                elif kind == b"e":
                    child, cookie = fmt.parse_entry(value)
                    entry_recs.append((cookie, ino, rest, child))
                elif kind == b"m" and len(rest) == 8:
                    map_recs.append((ino, int.from_bytes(rest, "big"), value))
                else:
                    raise IntegrityError(f"{what}: unknown record kind")
        del packs
        for ino, value in inode_recs:
            rec = fmt.parse_inode(value)
            node = _Inode(ino, rec.mode, rec.uid, rec.gid)
            node.nlink, node.rdev, node.size = rec.nlink, rec.rdev, rec.size
            node.atime_ns, node.mtime_ns, node.ctime_ns = rec.atime_ns, rec.mtime_ns, rec.ctime_ns
            node.parent, node.next_cookie = rec.parent, rec.next_cookie
            node.target, node.xattrs = rec.target, rec.xattrs or _EMPTY
            self._inodes[ino] = node
            if node.is_dir:
                self._expected_entries[ino] = rec.entry_count
        entry_recs.sort(key=itemgetter(0))  # stable: ties keep key order, as before
        for cookie, parent, name, child in entry_recs:
            pnode = self._inodes.get(parent)
            if pnode is None or not pnode.is_dir:
                self._problem(parent, f"entry {name!r} in a missing directory")
                continue
            pnode.entries[name] = (child, cookie)
        for ino, chunk_no, value in map_recs:
            node = self._inodes.get(ino)
            if node is None or not stat.S_ISREG(node.mode) or len(value) % ENTRY_SIZE:
                self._problem(ino, f"block map chunk {chunk_no} of a missing or non-regular file")
                continue
            chunk = bytearray(value)
            if node.chunks is _EMPTY:
                node.chunks = {}
            node.chunks[chunk_no] = chunk
            node.present += sum(1 for i in range(0, len(chunk), ENTRY_SIZE) if chunk[i])
        if ROOT_INO not in self._inodes:
            raise IntegrityError("metadata: the root directory is missing")
        for node in self._inodes.values():
            if node.is_dir and len(node.entries) != self._expected_entries.get(node.ino, 0):
                self._problem(
                    node.ino,
                    f"directory lists {len(node.entries)} of its "
                    f"{self._expected_entries.get(node.ino, 0)} entries",
                )
        if not self.read_only and not self._tolerant:
            self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Delete what a crash or an interrupted cleanup left: nothing references it."""
        live_packs = {ref.pack for ref in self._table if ref is not None}
        for name in self.storage.listdir(fmt.META_DIR):
            number = fmt.parse_pack_name(name)
            if number is not None and number not in live_packs:
                self.storage.unlink(f"{fmt.META_DIR}/{name}")
                self._pack_sizes.pop(number, None)
        for name in self.storage.listdir(fmt.DATA_DIR):
            ino = fmt.parse_data_name(name)
            node = self._inodes.get(ino) if ino is not None else None
            if ino is not None and (node is None or not stat.S_ISREG(node.mode)):
                self.storage.unlink(f"{fmt.DATA_DIR}/{name}")
        if self.storage.exists(fmt.HEAD_TMP_NAME):
            self.storage.unlink(fmt.HEAD_TMP_NAME)

    # == lifecycle ==========================================================================
    def started_serving(self) -> None:
        if self._lock is not None:
            self._lock.write_pid()

    def close(self) -> None:
        try:
            if not self.read_only:
                self.commit()
        finally:
            self.storage.close()
            if self._lock is not None:
                self._lock.release()

    @property
    def counter(self) -> int:
        return self._counter

    @property
    def root_tag(self) -> bytes:
        return self._root_tag

    # == committing =========================================================================
    def _record(self, key: bytes) -> bytes | None:
        """The current value of record ``key``, or None when it no longer exists."""
        kind, ino, rest = fmt.split_key(key)
        node = self._inodes.get(ino)
        if node is None or node.nlink == 0:
            return None
        if kind == b"i":
            return fmt.pack_inode(
                fmt.InodeRecord(
                    node.mode,
                    node.nlink,
                    node.uid,
                    node.gid,
                    node.rdev,
                    node.size,
                    node.atime_ns,
                    node.mtime_ns,
                    node.ctime_ns,
                    node.parent,
                    node.next_cookie if node.is_dir else 0,
                    len(node.entries) if node.is_dir else 0,
                    node.target,
                    node.xattrs,
                )
            )
        if kind == b"e":
            entry = node.entries.get(rest) if node.is_dir else None
            return None if entry is None else fmt.pack_entry(*entry)
        chunk = node.chunks.get(int.from_bytes(rest, "big"))
        if chunk is None:
            return None
        trimmed = fmt.trim_chunk(chunk)
        return trimmed or None

    def _seal(self, records: list[tuple[bytes, bytes]], first: bytes, counter: int) -> bytes:
        nonce = os.urandom(fmt.NONCE_SIZE)
        ad = fmt.page_ad(self._fs_id, counter, first)
        return nonce + self._keys.meta.encrypt(nonce, fmt.pack_page(records), ad)

    @staticmethod
    def _split(records: list[tuple[bytes, bytes]]) -> list[list[tuple[bytes, bytes]]]:
        """One page's records, cut into pages of about PAGE_SPLIT bytes if too big."""
        total = sum(len(k) + len(v) + 6 for k, v in records)
        if total <= fmt.PAGE_MAX:
            return [records]
        pieces: list[list[tuple[bytes, bytes]]] = [[]]
        size = 0
        for key, value in records:
            grown = len(key) + len(value) + 6
            if pieces[-1] and size + grown > fmt.PAGE_SPLIT:
                pieces.append([])
                size = 0
            pieces[-1].append((key, value))
            size += grown
        return pieces

    def commit(self) -> None:
        """Make every change so far durable under a new root (docs/formats/sefs.md)."""
        if self.read_only:
            return
        self._flush_all()
        if not self._dirty_keys:
            return
        self.storage.sync(sorted(self._written))
        dirty_pages = set()
        for key in self._dirty_keys:
            page = self._page_of(key)
            if self._record(key) is None:
                self._members[page].discard(key)
            else:
                self._members[page].add(key)
            dirty_pages.add(page)
        dirty_pages.update(p for p, ref in enumerate(self._table) if ref is None)
        live = sum(ref.length for ref in self._table if ref is not None)
        if sum(self._pack_sizes.values()) > 2 * live + (1 << 20):
            dirty_pages = set(range(len(self._table)))  # compact: rewrite all, drop old packs
        counter = self._counter + 1
        starts, members, table = list(self._starts), list(self._members), list(self._table)
        pack = bytearray()
        # From the last page down, so that splitting or dropping a page does not
        # move the pages still to be done.
        for page in sorted(dirty_pages, reverse=True):
            records = []
            for key in sorted(members[page]):
                value = self._record(key)
                if value is not None:
                    records.append((key, value))
            if not records and page:
                del starts[page], members[page], table[page]  # its range joins the previous
                continue
            pieces = self._split(records)
            firsts = [starts[page]] + [piece[0][0] for piece in pieces[1:]]
            refs = []
            for piece, first in zip(pieces, firsts, strict=True):
                obj = self._seal(piece, first, counter)
                refs.append(fmt.ObjectRef(counter, len(pack), len(obj), obj[-fmt.TAG_SIZE :]))
                pack += obj
            starts[page : page + 1] = firsts
            members[page : page + 1] = [{k for k, _ in piece} for piece in pieces]
            table[page : page + 1] = refs
        nonce = os.urandom(fmt.NONCE_SIZE)
        root_plain = fmt.pack_root(fmt.Root(self._next_ino, starts, table))
        root_obj = nonce + self._keys.meta.encrypt(
            nonce, root_plain, fmt.root_ad(self._fs_id, counter)
        )
        root_ref = fmt.ObjectRef(counter, len(pack), len(root_obj), root_obj[-fmt.TAG_SIZE :])
        pack += root_obj
        name = fmt.pack_name(counter)
        self.storage.write_file(name, pack)
        self.storage.fsync(name)
        self.storage.fsync_dir(fmt.META_DIR)
        head = fmt.pack_head(fmt.Head(self._fs_id, counter, root_ref), self._keys.head_mac)
        self.storage.write_file(fmt.HEAD_TMP_NAME, head)
        self.storage.fsync(fmt.HEAD_TMP_NAME)
        self.storage.rename(fmt.HEAD_TMP_NAME, fmt.HEAD_NAME)
        self.storage.fsync_dir("")
        # -- committed: the new root is the filesystem from here on --
        self._counter = counter
        self._root_tag = root_ref.tag
        self._starts, self._members, self._table = starts, members, table
        self._pack_sizes[counter] = len(pack)
        self._dirty_keys.clear()
        self._written.clear()
        for ino in self._slot_touched:
            node = self._inodes.get(ino)
            if node is not None:
                node.committed_slots = _EMPTY
        self._slot_touched.clear()
        self._last_commit = time.monotonic()
        if self._state is not None:
            self._state.update(counter, root_ref.tag)
        live_packs = {ref.pack for ref in table if ref is not None} | {counter}
        dead = [n for n in self._pack_sizes if n not in live_packs]
        for number in dead:
            del self._pack_sizes[number]
        self.storage.discard([fmt.pack_name(n) for n in dead])
        self.storage.discard(sorted(self._doomed))
        self._doomed.clear()

    def _changed(self) -> None:
        """After a change: commit when changes have waited long enough."""
        if time.monotonic() - self._last_commit >= self._commit_interval:
            self.commit()

    # == data blocks ========================================================================
    def _flush_all(self) -> None:
        for ino in list(self._dirty_inodes):
            node = self._inodes.get(ino)
            if node is not None:
                self._flush(node)
        self._dirty_inodes.clear()
        self._dirty_blocks = 0

    def _flush(self, node: _Inode) -> None:
        """Encrypt and write out ``node``'s buffered blocks, one pwrite per run.

        Block ``j`` (in block order) is encrypted into ``buf[4096 j : 4096 j + 4112]``;
        its tag is copied out before block ``j + 1`` overwrites it, which leaves the
        ciphertexts contiguous, ready to be written without another copy.
        """
        dirty = node.dirty
        if not dirty:
            return
        blocks = sorted(dirty)
        count = len(blocks)
        need = count * BLOCK_SIZE + fmt.TAG_SIZE
        if len(self._cipher_buf) < need:
            self._cipher_buf = bytearray(need)
        buf = memoryview(self._cipher_buf)
        nonces = os.urandom(fmt.NONCE_SIZE * count)
        encrypt_into = self._keys.data.encrypt_into
        prefix = self._data_prefix
        ino = node.ino
        if node.chunks is _EMPTY:
            node.chunks = {}
        if node.committed_slots is _EMPTY:
            node.committed_slots = {}
        chunks = node.chunks
        committed = node.committed_slots
        runs: list[tuple[int, int, int, int]] = []  # (slot, first block, first index, count)
        run_slot = run_first = run_j = run_len = 0
        present = node.present
        pack_ad = _BLOCK_AD.pack
        chunk_no = -1
        chunk = bytearray()
        at = 0
        for j, block in enumerate(blocks):
            if block >> 8 != chunk_no:  # blocks are sorted: once per chunk
                chunk_no = block >> 8
                chunk = chunks.get(chunk_no)
                if chunk is None:
                    chunk = chunks[chunk_no] = bytearray()
                # Grow it once, to the last block of this flush in it.
                last = blocks[bisect.bisect_left(blocks, (chunk_no + 1) * 256) - 1]
                need = (last - chunk_no * 256 + 1) * ENTRY_SIZE
                if len(chunk) < need:
                    chunk.extend(bytes(need - len(chunk)))
            off = (block & 255) * ENTRY_SIZE
            was = chunk[off]
            if was:  # the slot it had at the last commit, unless touched since
                old = committed.setdefault(block, was)
            else:  # a hole now; one at the last commit too unless truncated since
                old = committed.get(block, SLOT_HOLE)
                present += 1
            slot = SLOT_B if old == SLOT_A else SLOT_A
            nonce = nonces[j * 12 : j * 12 + 12]
            encrypt_into(nonce, dirty[block], prefix + pack_ad(ino, block), buf[at : at + _STRIDE])
            chunk[off : off + ENTRY_SIZE] = (
                _SLOT_BYTES[slot] + nonce + buf[at + BLOCK_SIZE : at + _STRIDE]
            )
            if slot == run_slot and block == run_first + run_len and run_len < _WRITE_RUN:
                run_len += 1
            else:
                if run_len:
                    runs.append((run_slot, run_first, run_j, run_len))
                run_slot, run_first, run_j, run_len = slot, block, j, 1
            at += BLOCK_SIZE
        runs.append((run_slot, run_first, run_j, run_len))
        node.present = present
        for slot, first, j, n in runs:
            name = fmt.data_name(ino, slot)
            self.storage.pwritev(
                name, first * BLOCK_SIZE, [buf[j * BLOCK_SIZE : (j + n) * BLOCK_SIZE]]
            )
            self._written.add(name)
        for c in {b >> 8 for b in blocks}:
            self._dirty_keys.add(fmt.map_key(ino, c))
        self._slot_touched.add(ino)
        self._dirty_blocks -= count
        node.dirty = _EMPTY

    def path_of(self, ino: int) -> str:
        """A path of ``ino`` for messages (a search: only used when reporting)."""
        if ino == ROOT_INO:
            return "/"
        for parent in self._inodes.values():
            if parent.is_dir:
                for name, (child, _) in parent.entries.items():
                    if child == ino:
                        head = self.path_of(parent.ino) if parent.ino != ROOT_INO else ""
                        return f"{head}/{os.fsdecode(name)}"
        return f"<inode {ino}, unlinked>"

    def _corrupt(self, node: _Inode, block: int, what: str) -> IntegrityError:
        return IntegrityError(
            f"{self.path_of(node.ino)}: block {block} (offset {block * BLOCK_SIZE}): {what}"
        )

    def _read_run(self, node: _Inode, first: int, last: int, slot: int, out: memoryview) -> None:
        """Decrypt blocks ``first..last``, which all live in ``slot``, into ``out``.

        The ciphertexts are read 4112 bytes apart so each block's tag can be put
        right after it, as AES-GCM wants, without another copy. This runs once
        per read request: keep it free of per-call allocations beyond the iovecs.
        """
        count = last - first + 1
        if count > _WRITE_RUN:  # one iovec per block: stay below IOV_MAX (1024)
            for start in range(first, last + 1, _WRITE_RUN):
                stop = min(start + _WRITE_RUN - 1, last)
                at = (start - first) * BLOCK_SIZE
                self._read_run(
                    node, start, stop, slot, out[at : at + (stop - start + 1) * BLOCK_SIZE]
                )
            return
        raw = self._raw_view
        if len(raw) < count * _STRIDE:
            self._raw_buf = bytearray(count * _STRIDE)
            raw = self._raw_view = memoryview(self._raw_buf)
        ino = node.ino
        name = fmt.data_name(ino, slot)
        if count == 1:
            iov = [raw[:BLOCK_SIZE]]
        else:
            iov = [raw[at : at + BLOCK_SIZE] for at in range(0, count * _STRIDE, _STRIDE)]
        try:
            got = self.storage.preadv(name, first * BLOCK_SIZE, iov)
        except FileNotFoundError:
            raise self._corrupt(node, first, f"data file {name} is missing") from None
        if got != count * BLOCK_SIZE:
            block = first + got // BLOCK_SIZE
            raise self._corrupt(node, block, f"data file {name} is truncated")
        decrypt_into = self._keys.data.decrypt_into
        ad = self._data_prefix + _BLOCK_AD.pack(ino, first)
        chunks = node.chunks
        chunk = chunks[first >> 8]
        off = (first & 255) * ENTRY_SIZE
        at = 0
        block = first
        try:
            for i in range(count):
                if i and not block & 255:
                    chunk = chunks[block >> 8]
                    off = 0
                raw[at + BLOCK_SIZE : at + _STRIDE] = chunk[off + 13 : off + ENTRY_SIZE]
                if i:
                    ad = self._data_prefix + _BLOCK_AD.pack(ino, block)
                decrypt_into(
                    chunk[off + 1 : off + 13],
                    raw[at : at + _STRIDE],
                    ad,
                    out[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE],
                )
                block += 1
                off += ENTRY_SIZE
                at += _STRIDE
        except InvalidTag:
            raise self._corrupt(
                node, block, "authentication failed (tampered, moved or rolled back)"
            ) from None

    @staticmethod
    def _slot_run(node: _Inode, block: int, last: int, slot: int) -> int:
        """The last of ``block..last`` such that all of them live in ``slot``
        (``block`` itself does), reading the map's slot bytes a chunk at a time."""
        same = bytes((slot,))
        end = block
        while end < last:
            chunk = node.chunks.get((end + 1) >> 8)
            if chunk is None:
                break
            index = (end + 1) & 255
            want = min(256 - index, last - end)
            slots = chunk[index * ENTRY_SIZE : (index + want) * ENTRY_SIZE : ENTRY_SIZE]
            run = len(slots) - len(slots.lstrip(same))
            end += run
            if run < want:
                break
        return end

    def _blocks(self, node: _Inode, first: int, last: int) -> bytearray:
        """Plaintext of blocks ``first..last``: buffered, decrypted in runs, or hole zeros."""
        out = bytearray((last - first + 1) * BLOCK_SIZE)
        view = memoryview(out)
        dirty = node.dirty
        if not dirty:  # the common case: one run in one slot, no buffered blocks
            slot = node.slot(first)
            if slot and (first == last or self._slot_run(node, first, last, slot) == last):
                self._read_run(node, first, last, slot, view)
                return out
        block = first
        while block <= last:
            at = (block - first) * BLOCK_SIZE
            buffered = dirty.get(block)
            if buffered is not None:
                view[at : at + BLOCK_SIZE] = buffered
                block += 1
                continue
            slot = node.slot(block)
            if slot == SLOT_HOLE:
                block += 1  # already zeros
                continue
            if dirty:
                end = block
                while end < last and end + 1 not in dirty and node.slot(end + 1) == slot:
                    end += 1
            else:
                end = self._slot_run(node, block, last, slot)
            self._read_run(node, block, end, slot, view[at : at + (end - block + 1) * BLOCK_SIZE])
            block = end + 1
        return out

    def verify_file(self, ino: int) -> Iterator[str]:
        """Problems with ``ino``'s stored blocks (fsck): each one line."""
        node = self._inodes[ino]
        limit = fmt.blocks_for(node.size)
        for c, chunk in sorted(node.chunks.items()):
            for off in range(0, len(chunk), ENTRY_SIZE):
                slot = chunk[off]
                block = c * 256 + off // ENTRY_SIZE
                if not slot:
                    continue
                if slot not in (SLOT_A, SLOT_B) or block >= limit:
                    yield (
                        f"{self.path_of(ino)}: block {block}: "
                        "map entry is invalid or past the end of the file"
                    )
                    continue
                try:
                    self._read_run(node, block, block, slot, memoryview(bytearray(BLOCK_SIZE)))
                except IntegrityError as exc:
                    yield str(exc)

    # == read side =========================================================================
    def _node(self, ino: int) -> _Inode:
        node = self._inodes.get(ino)
        if node is None:
            raise FSError(errno.ENOENT)
        return node

    def _dir(self, ino: int) -> _Inode:
        node = self._node(ino)
        if not node.is_dir:
            raise FSError(errno.ENOTDIR)
        return node

    def _attr(self, node: _Inode) -> Attr:
        if node.entries is not None:
            size = 0
            blocks = 0
        elif node.target:
            size = len(node.target)
            blocks = 0
        else:
            size = node.size
            extra = sum(1 for b in node.dirty if not node.slot(b)) if node.dirty else 0
            blocks = (node.present + extra) * (BLOCK_SIZE // 512)
        return Attr(
            ino=node.ino,
            mode=node.mode,
            nlink=node.nlink,
            uid=node.uid,
            gid=node.gid,
            size=size,
            rdev=node.rdev,
            blocks=blocks,
            atime_ns=node.atime_ns,
            mtime_ns=node.mtime_ns,
            ctime_ns=node.ctime_ns,
        )

    def lookup(self, parent: int, name: bytes) -> Attr:
        pnode = self._dir(parent)
        if name == b"..":
            return self._attr(self._node(pnode.parent))
        if name == b".":
            return self._attr(pnode)
        entry = pnode.entries.get(name)
        if entry is None:
            raise FSError(errno.ENAMETOOLONG if len(name) > 255 else errno.ENOENT)
        return self._attr(self._inodes[entry[0]])

    def getattr(self, ino: int) -> Attr:
        return self._attr(self._node(ino))

    def readlink(self, ino: int) -> bytes:
        node = self._node(ino)
        if not stat.S_ISLNK(node.mode):
            raise FSError(errno.EINVAL)
        return node.target

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
        node = self._inodes.get(handle.ino)
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
        for i in range(bisect.bisect_right(cookies, offset), len(names)):
            entry = entries.get(names[i])
            if entry is None or entry[1] != cookies[i]:
                continue
            yield DirEntry(names[i], self._attr(self._inodes[entry[0]]), entry[1])

    def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    def open(self, ino: int, flags: int) -> int:
        node = self._node(ino)
        if node.is_dir:
            raise FSError(errno.EISDIR)
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if writing and self.read_only:
            raise FSError(errno.EROFS)
        if writing and flags & os.O_TRUNC and stat.S_ISREG(node.mode):
            self._truncate(node, 0)
            node.mtime_ns = node.ctime_ns = time.time_ns()
            self._dirty_keys.add(fmt.inode_key(ino))
        node.open_count += 1
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = ino
        return fh

    def _handle(self, fh: int) -> _Inode:
        ino = self._handles.get(fh)
        if ino is None:
            raise FSError(errno.EBADF)
        return self._inodes[ino]

    def read(self, fh: int, offset: int, size: int) -> bytes:
        ino = self._handles.get(fh)
        if ino is None:
            raise FSError(errno.EBADF)
        node = self._inodes[ino]
        end = offset + size
        if end > node.size:
            end = node.size
        if offset >= end:
            return b""
        first = offset // BLOCK_SIZE
        last = (end - 1) // BLOCK_SIZE
        data = self._blocks(node, first, last)
        start = offset - first * BLOCK_SIZE
        if start == 0 and len(data) == end - offset:
            return data
        return bytes(memoryview(data)[start : start + end - offset])

    def release(self, fh: int) -> None:
        node = self._handle(fh)
        del self._handles[fh]
        node.open_count -= 1
        self._maybe_free(node)

    def statfs(self) -> StatFs:
        host = self.storage.statvfs()
        files = len(self._inodes)
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

    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self._node(ino).xattrs.get(name)
        if value is None:
            raise FSError(errno.ENODATA)
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        return list(self._node(ino).xattrs)

    # == write side ========================================================================
    def _writable(self) -> None:
        if self.read_only:
            raise FSError(errno.EROFS)

    def _touch(self, node: _Inode, mtime: bool = True) -> None:
        now = time.time_ns()
        node.ctime_ns = now
        if mtime:
            node.mtime_ns = now
        self._dirty_keys.add(fmt.inode_key(node.ino))

    def _block_for_update(self, node: _Inode, block: int) -> bytearray:
        """A mutable buffered copy of ``block`` (the caller accounts for new dirty blocks)."""
        buffered = node.dirty.get(block)
        if isinstance(buffered, bytearray):
            return buffered
        current = self._blocks(node, block, block)
        if node.dirty is _EMPTY:
            node.dirty = {}
        node.dirty[block] = current
        return current

    def write(self, fh: int, offset: int, data: bytes) -> int:
        self._writable()
        node = self._handle(fh)
        size = len(data)
        if size == 0:
            return 0
        if not isinstance(data, bytes):
            data = bytes(data)  # buffered blocks are views of it: it must not change
        view = memoryview(data)
        if node.dirty is _EMPTY:
            node.dirty = {}
        dirty = node.dirty
        before = len(dirty)
        block, skip = divmod(offset, BLOCK_SIZE)
        pos = 0
        if not skip:  # whole blocks first, without per-block arithmetic
            whole = size // BLOCK_SIZE
            for i in range(whole):
                dirty[block + i] = view[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
            pos = whole * BLOCK_SIZE
            block += whole
        while pos < size:
            take = min(BLOCK_SIZE - skip, size - pos)
            if take == BLOCK_SIZE:
                dirty[block] = view[pos : pos + BLOCK_SIZE]
            else:
                current = self._block_for_update(node, block)
                current[skip : skip + take] = view[pos : pos + take]
            pos += take
            block += 1
            skip = 0
        added = len(dirty) - before
        self._dirty_blocks += added
        if added:
            self._dirty_inodes.add(node.ino)
        if offset + size > node.size:
            node.size = offset + size
        self._touch(node)
        if self._dirty_blocks > DIRTY_LIMIT_BLOCKS:
            self._flush_all()
        self._changed()
        return size

    def _truncate(self, node: _Inode, size: int) -> None:
        if size < node.size:
            keep = fmt.blocks_for(size)
            for block in [b for b in node.dirty if b >= keep]:
                del node.dirty[block]
                self._dirty_blocks -= 1
            for c in [c for c in node.chunks if (c + 1) * 256 > keep]:
                chunk = node.chunks[c]
                start = max(keep - c * 256, 0) * ENTRY_SIZE
                for off in range(start, len(chunk), ENTRY_SIZE):
                    if chunk[off]:
                        block = c * 256 + off // ENTRY_SIZE
                        if node.committed_slots is _EMPTY:
                            node.committed_slots = {}
                        node.committed_slots.setdefault(block, chunk[off])
                        node.present -= 1
                del chunk[start:]
                if not chunk:
                    del node.chunks[c]
                self._dirty_keys.add(fmt.map_key(node.ino, c))
            self._slot_touched.add(node.ino)
            tail = size % BLOCK_SIZE
            if tail and (keep - 1 in node.dirty or node.slot(keep - 1)):
                before = len(node.dirty)
                current = self._block_for_update(node, keep - 1)
                current[tail:] = bytes(BLOCK_SIZE - tail)
                if len(node.dirty) > before:
                    self._dirty_blocks += 1
                    self._dirty_inodes.add(node.ino)
        node.size = size

    def setattr(self, ino: int, changes: AttrChanges, fh: int | None = None) -> Attr:
        self._writable()
        node = self._node(ino)
        if changes.size is not None:
            if node.is_dir:
                raise FSError(errno.EISDIR)
            if not stat.S_ISREG(node.mode):
                raise FSError(errno.EINVAL)
            self._truncate(node, changes.size)
            node.mtime_ns = time.time_ns()
        changes.apply_to(node)
        node.ctime_ns = time.time_ns()
        self._dirty_keys.add(fmt.inode_key(ino))
        self._changed()
        return self._attr(node)

    def fsync(self, fh: int, datasync: bool) -> None:
        self.commit()

    def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.commit()

    @staticmethod
    def _check_name(name: bytes) -> None:
        if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
            raise FSError(errno.EINVAL)
        if len(name) > 255:
            raise FSError(errno.ENAMETOOLONG)

    def _add_entry(self, pnode: _Inode, name: bytes, ino: int) -> None:
        pnode.entries[name] = (ino, pnode.next_cookie)
        pnode.next_cookie += 1
        self._dirty_keys.add(fmt.entry_key(pnode.ino, name))
        self._touch(pnode)

    def _remove_entry(self, pnode: _Inode, name: bytes) -> None:
        del pnode.entries[name]
        self._dirty_keys.add(fmt.entry_key(pnode.ino, name))
        self._touch(pnode)

    def _new(self, parent: int, name: bytes, mode: int, caller: Caller) -> _Inode:
        self._writable()
        self._check_name(name)
        pnode = self._dir(parent)
        if name in pnode.entries:
            raise FSError(errno.EEXIST)
        ino = self._next_ino
        self._next_ino += 1
        node = _Inode(ino, mode, caller.uid, caller.gid)
        if node.is_dir:
            node.nlink = 2
            node.parent = parent
            pnode.nlink += 1
        self._inodes[ino] = node
        self._dirty_keys.add(fmt.inode_key(ino))
        self._add_entry(pnode, name, ino)
        return node

    def _drop_link(self, node: _Inode) -> None:
        node.nlink = 0 if node.is_dir else node.nlink - 1
        self._touch(node, mtime=False)
        if node.nlink == 0:
            # Its records leave the committed tree with the next commit.
            for c in node.chunks:
                self._dirty_keys.add(fmt.map_key(node.ino, c))
        self._maybe_free(node)

    def _maybe_free(self, node: _Inode) -> None:
        if node.nlink or node.open_count:
            return
        del self._inodes[node.ino]
        self._dirty_blocks -= len(node.dirty)
        node.dirty = _EMPTY
        self._dirty_inodes.discard(node.ino)
        for slot in (SLOT_A, SLOT_B):
            name = fmt.data_name(node.ino, slot)
            self._written.discard(name)
            self._doomed.add(name)

    def create(
        self, parent: int, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[int, Attr]:
        node = self._new(parent, name, stat.S_IFREG | (mode & 0o7777), caller)
        fh = self.open(node.ino, flags & ~os.O_TRUNC)
        self._changed()
        return fh, self._attr(node)

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

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Attr:
        node = self._new(parent, name, stat.S_IFDIR | (mode & 0o7777), caller)
        self._changed()
        return self._attr(node)

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Attr:
        if not target or len(target) > 4095:
            raise FSError(errno.ENAMETOOLONG if target else errno.ENOENT)
        node = self._new(parent, name, stat.S_IFLNK | 0o777, caller)
        node.target = bytes(target)
        self._changed()
        return self._attr(node)

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        self._writable()
        node = self._node(ino)
        if node.is_dir:
            raise FSError(errno.EPERM)
        self._check_name(new_name)
        pnode = self._dir(new_parent)
        if new_name in pnode.entries:
            raise FSError(errno.EEXIST)
        if node.nlink == 0:
            raise FSError(errno.ENOENT)
        self._add_entry(pnode, new_name, ino)
        node.nlink += 1
        self._touch(node, mtime=False)
        for c in node.chunks:
            self._dirty_keys.add(fmt.map_key(ino, c))
        self._changed()
        return self._attr(node)

    def _child(self, parent: int, name: bytes) -> tuple[_Inode, _Inode]:
        pnode = self._dir(parent)
        entry = pnode.entries.get(name)
        if entry is None:
            raise FSError(errno.ENOENT)
        return pnode, self._inodes[entry[0]]

    def unlink(self, parent: int, name: bytes) -> None:
        self._writable()
        pnode, node = self._child(parent, name)
        if node.is_dir:
            raise FSError(errno.EISDIR)
        self._remove_entry(pnode, name)
        self._drop_link(node)
        self._changed()

    def rmdir(self, parent: int, name: bytes) -> None:
        self._writable()
        pnode, node = self._child(parent, name)
        if not node.is_dir:
            raise FSError(errno.ENOTDIR)
        if node.entries:
            raise FSError(errno.ENOTEMPTY)
        self._remove_entry(pnode, name)
        pnode.nlink -= 1
        self._drop_link(node)
        self._changed()

    def _is_ancestor(self, ino: int, of: int) -> bool:
        while True:
            if of == ino:
                return True
            if of == ROOT_INO:
                return False
            of = self._inodes[of].parent

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        self._writable()
        if flags & ~RENAME_NOREPLACE:
            raise FSError(errno.EINVAL)
        self._check_name(new_name)
        opnode, src = self._child(old_parent, old_name)
        npnode = self._dir(new_parent)
        if src.is_dir and self._is_ancestor(src.ino, new_parent):
            raise FSError(errno.EINVAL)
        existing = npnode.entries.get(new_name)
        if existing is not None:
            dst = self._inodes[existing[0]]
            if not check_rename_target(
                flags,
                same_inode=dst is src,
                src_is_dir=src.is_dir,
                dst_is_dir=dst.is_dir,
                dst_is_empty=not dst.entries,
            ):
                return
            if dst.is_dir:
                npnode.nlink -= 1
            self._remove_entry(npnode, new_name)
            self._drop_link(dst)
        self._remove_entry(opnode, old_name)
        self._add_entry(npnode, new_name, src.ino)
        if src.is_dir and opnode is not npnode:
            opnode.nlink -= 1
            npnode.nlink += 1
            src.parent = new_parent
        self._touch(src, mtime=False)
        self._changed()

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self._writable()
        node = self._node(ino)
        if not name or len(name) > MAX_XATTR_NAME:
            raise FSError(errno.ERANGE)
        if len(value) > MAX_XATTR_VALUE:
            raise FSError(errno.E2BIG)
        check_xattr_flags(flags, name in node.xattrs)
        if node.xattrs is _EMPTY:
            node.xattrs = {}
        node.xattrs[bytes(name)] = bytes(value)
        self._touch(node, mtime=False)
        self._changed()

    def removexattr(self, ino: int, name: bytes) -> None:
        self._writable()
        node = self._node(ino)
        if name not in node.xattrs:
            raise FSError(errno.ENODATA)
        del node.xattrs[name]
        self._touch(node, mtime=False)
        self._changed()

    # == offline inspection (fsck, info) ====================================================
    def inodes(self) -> dict[int, _Inode]:
        return self._inodes

    def expected_entries(self, ino: int) -> int:
        return self._expected_entries.get(ino, 0)
