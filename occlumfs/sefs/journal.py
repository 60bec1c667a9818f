"""The SEFS write-ahead log (format version 3): an fsync without a commit.

A commit (docs/formats/sefs.md, "Committing a new root") needs two ordered
host barriers; an fsync that only appends to ``DIR/log`` needs one. The log
follows one committed head: each entry holds every record changed since the
entry before it (or the head) and the ciphertext of every data block whose
map entry changed, sealed under the log's own subkey with associated data
that chains it to the head and to the entry before it. A commit takes
everything, which leaves the log stale (it names an older head) until the
next fsync starts a new one; a mount replays the entries that chain from the
head it loaded, then (read-write) commits them.

Replay goes through the loader's own ways in: :func:`load.apply_inode` for
inode records, directory entries in cookie order, and the data of logged
blocks through :meth:`BlockIO.write`, as if it had been written and not yet
flushed: the block maps keep their committed entries, so the committed slots
stay untouched until the commit that follows.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable

from cryptography.exceptions import InvalidTag

from occlumfs.errors import IntegrityError
from occlumfs.sefs import format as fmt
from occlumfs.sefs.format import BLOCK_SIZE, CHUNK_BLOCKS, ENTRY_SIZE, NONCE_SIZE, TAG_SIZE
from occlumfs.sefs.inode import EMPTY, Inode
from occlumfs.sefs.keys import Keys
from occlumfs.sefs.load import apply_inode
from occlumfs.sefs.pages import PageTable
from occlumfs.sefs.state import TrustedState
from occlumfs.sefs.storage import Storage

LOG_MAX = 16 << 20  # bytes; an fsync that would grow the log past this commits instead
ENTRY_MAX_BLOCKS = 1024  # changed blocks (4 MiB); an fsync with more commits instead
ENTRY_MAX_RECORDS = 4096  # changed records; an fsync with more commits without looking
LOG_STEP = 1 << 20  # the log is written ahead with zeros up to a multiple of this...
LOG_FIRST_STEP = 64 << 10  # ...and, when it starts, of this (doubling up to LOG_STEP)
_MAP, _INODE, _ENTRY = b"m"[0], b"i"[0], b"e"[0]
_UNSET = object()


class Dirty(set):
    """The page table's dirty keys (changed since the last commit), which also
    remembers in ``fresh`` those changed since the last log entry."""

    __slots__ = ("fresh",)

    def __init__(self) -> None:
        super().__init__()
        self.fresh: set[bytes] = set()

    def add(self, key: bytes) -> None:
        set.add(self, key)
        self.fresh.add(key)

    def clear(self) -> None:
        set.clear(self)
        self.fresh.clear()


class Journal:
    """Appends fsyncs to ``DIR/log`` and replays them at mount."""

    def __init__(
        self, storage: Storage, keys: Keys, pages: PageTable, inodes: dict[int, Inode]
    ) -> None:
        self.storage = storage
        self._cipher = keys.log
        self._data = keys.data
        self._fs_id = keys.fs_id
        self._pages = pages
        self._inodes = inodes
        if not isinstance(pages.dirty, Dirty):
            raise TypeError("the page table's dirty keys must be a journal.Dirty")
        self._dirty: Dirty = pages.dirty
        self._ours = False  # the host's log is one this store read or wrote (a regular file)
        self.reset()

    def reset(self) -> None:
        """A commit took every change: the log on the host is stale from now on."""
        # A log this store wrote or read (a regular file) names an older head now: removable.
        self.stale = self._ours
        self.size = 0  # bytes of the current log on the host; 0: none follows this head
        self.allocated = 0  # ...and bytes written so far, the zeros after its entries included
        self.seq = 0  # entries in it
        self.prev = b""  # the tag of its last entry
        self.broken = False  # an append failed: its bytes are unknown, commit instead
        self._logged: dict[bytes, bytes | None] = {}  # record values as last logged
        self._tags: list[bytes] = []  # replay's chain of tags
        self._dirty.fresh.clear()

    # == appending ==========================================================================
    def append(self, next_ino: int) -> bool | None:
        """Log every change since the last entry, durably. True: logged; False: nothing
        to log; None: too much (or the log is unusable), the caller commits instead.
        Blocks must have been written out (``BlockIO.flush_all``) before."""
        if self.broken:
            return None
        fresh = self._dirty.fresh
        if not fresh:
            return False
        if len(fresh) > ENTRY_MAX_RECORDS:
            return None
        record = self._pages.record
        logged = self._logged
        records: list[fmt.LogRecord] = []
        wanted: list[tuple[int, int, bytes]] = []  # (ino, block, map entry)
        for key in fresh:
            value = record(key)
            old = logged.get(key, _UNSET)
            if old == value:
                continue
            records.append((key, value))
            if value and key[0] == _MAP:
                if old is _UNSET:
                    old = self._committed(key)
                _changed_blocks(key, old or b"", value, wanted)
                if len(wanted) > ENTRY_MAX_BLOCKS:
                    return None
        if not records:
            fresh.clear()
            return False
        body = fmt.pack_log_body(next_ino, records, self._ciphertexts(wanted))
        if self.size + len(body) + 64 > LOG_MAX:
            return None
        self._write(body)
        logged.update(records)
        fresh.clear()
        return True

    def _committed(self, key: bytes) -> bytes | None:
        """The value record ``key`` had at the last commit (read back from its page)."""
        return self._pages.get(key)

    def _ciphertexts(self, wanted: list[tuple[int, int, bytes]]) -> list[fmt.LogBlock]:
        """The stored ciphertext of each block (written out, maybe not yet durable),
        read one contiguous run of a data file at a time, not a block at a time."""
        out: list[fmt.LogBlock] = []
        run: list[tuple[int, int, bytes]] = []
        for item in sorted(wanted):
            if run and not (
                item[0] == run[-1][0] and item[2][0] == run[-1][2][0] and item[1] == run[-1][1] + 1
            ):
                self._read_run(run, out)
                run = []
            run.append(item)
        if run:
            self._read_run(run, out)
        return out

    def _read_run(self, run: list[tuple[int, int, bytes]], out: list[fmt.LogBlock]) -> None:
        """Blocks ``run`` (one file and slot, consecutive numbers) into ``out``."""
        ino, first, entry = run[0]
        name = fmt.data_name(ino, entry[0])
        buf = memoryview(bytearray(len(run) * BLOCK_SIZE))
        got = self.storage.preadv(name, first * BLOCK_SIZE, [buf])
        if got != len(buf):
            raise IntegrityError(
                f"{name}: block {first + got // BLOCK_SIZE} is truncated (changed on the host)"
            )
        for i, (_, block, block_entry) in enumerate(run):
            out.append((ino, block, block_entry, bytes(buf[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])))

    def _write(self, body: bytes) -> None:
        self.stale = False  # from here on the host's log may follow the head, or be torn
        pages = self._pages
        prev = self.prev if self.seq else pages.root_tag
        ad = fmt.log_ad(self._fs_id, pages.counter, pages.root_tag, self.seq, prev)
        nonce = os.urandom(NONCE_SIZE)
        sealed = nonce + self._cipher.encrypt(nonce, body, ad)
        entry = fmt.LOG_LEN.pack(len(sealed)) + sealed
        # Entries overwrite zeros written (and made durable) ahead of them, so that
        # an append changes no file size or extent: its fdatasync flushes data only,
        # without a commit of the host filesystem's journal.
        try:
            if not self.size:  # the first entry after a commit: a new log, atomically
                data = fmt.pack_log_head(self._fs_id, pages.counter, pages.root_tag) + entry
                zeros = bytes(-len(data) % LOG_FIRST_STEP or LOG_FIRST_STEP)
                self.storage.replace(fmt.LOG_NAME, data + zeros, fmt.LOG_TMP_NAME)
                self._ours = True
                self.size, self.allocated = len(data), len(data) + len(zeros)
            else:
                end = self.size + len(entry)
                step = min(LOG_STEP, max(LOG_FIRST_STEP, self.allocated))
                zeros = bytes(-end % step or step) if end > self.allocated else b""
                self.storage.pwritev(fmt.LOG_NAME, self.size, [entry, zeros])
                self.storage.datasync(fmt.LOG_NAME)
                self.size = end
                self.allocated = max(self.allocated, end + len(zeros))
        except BaseException:
            self.broken = True  # a torn entry may be on the host: never append after it
            raise
        self.seq += 1
        self.prev = sealed[-TAG_SIZE:]

    def remove_leftovers(self) -> None:
        """Delete a ``log.tmp`` that a crash left while a new log was being started."""
        if self.storage.exists(fmt.LOG_TMP_NAME):
            self.storage.unlink(fmt.LOG_TMP_NAME)

    def discard_stale(self) -> None:
        """Delete the host's log once a durable commit holds all of it (a read-write
        open's replay, a clean close), so that the next open finds none instead of up
        to LOG_MAX bytes of history. A power cut that loses the removal leaves that
        stale log, which replay ignores; no barrier is needed."""
        if self.stale and not self.broken:
            self.stale = self._ours = False
            with contextlib.suppress(FileNotFoundError):
                self.storage.unlink(fmt.LOG_NAME)

    # == replaying ==========================================================================
    def replay(self, state: TrustedState | None, write: Callable[[Inode, int, bytes], None]):
        """Apply the entries that follow the loaded head; the logged next inode number,
        or None when there were none. ``write`` buffers a block's data (BlockIO.write)."""
        raw = self._live_log()
        bodies = self._entries(raw) if raw is not None else []
        if state is not None:
            self._check_state(state)
        if not bodies:
            return None
        final: dict[bytes, bytes | None] = {}
        blocks: dict[tuple[int, int], tuple[bytes, bytes]] = {}
        next_ino = 0
        for body in bodies:
            next_ino, records, logged_blocks = fmt.parse_log_body(body)
            final.update(records)
            for ino, block, entry, cipher in logged_blocks:
                blocks[ino, block] = (entry, cipher)
        self._apply(final, blocks, write)
        for key in final:
            self._dirty.add(key)
        return next_ino

    def _live_log(self) -> bytes | None:
        """The whole log when it may follow the loaded head; None when there is none or
        its header says a later commit holds all of it (stale). Only the header of a
        stale log is read: its entries, up to LOG_MAX bytes, are history."""
        header = bytearray(fmt.LOG_HEAD_SIZE)
        try:
            got = self.storage.preadv(fmt.LOG_NAME, 0, [memoryview(header)])
        except FileNotFoundError:
            return None
        self._ours = True
        is_log = got == len(header) and header.startswith(fmt.LOG_MAGIC)
        if is_log and not self._follows_head(bytes(header)):
            self.stale = True
            return None
        return self.storage.read(fmt.LOG_NAME)  # (not a log at all: refused with its size)

    def _follows_head(self, raw: bytes) -> bool:
        """Whether a log starting with ``raw`` follows the loaded head (False: it is
        stale); one that cannot be this store's log after this head is an error."""
        pages = self._pages
        fs_id, counter, root_tag = fmt.parse_log_head(raw)
        if fs_id != self._fs_id:
            raise IntegrityError("log: belongs to another filesystem")
        if counter < pages.counter:
            return False  # stale: the commit after it took all of it
        if counter != pages.counter or root_tag != pages.root_tag:
            raise IntegrityError(
                f"log: follows commit {counter}, not the head's {pages.counter} "
                "(head rolled back, or a log spliced in)"
            )
        return True

    def _entries(self, raw: bytes) -> list[bytes]:
        """The plaintexts of the log's entries, if it follows the committed head.

        Entries are appended one at a time, each made durable before the next is
        written, so only the last one can be torn by a crash: a last entry (one
        followed by nothing but zeros) that runs past the end or fails to open
        is one whose fsync never returned. Any other entry that fails is
        tampering. A zero length ends the entries (the zeros written ahead).
        """
        if not self._follows_head(raw):
            self.stale = True
            return []  # changed on the host since its header was read: stale now
        fs_id, counter, root_tag = self._fs_id, self._pages.counter, self._pages.root_tag
        bodies = []
        tags = self._tags = [root_tag]  # the chain: the head's tag, then each entry's
        pos = fmt.LOG_HEAD_SIZE
        prev = root_tag
        while pos < len(raw):
            if pos + fmt.LOG_LEN.size > len(raw):
                break  # a torn last entry
            (length,) = fmt.LOG_LEN.unpack_from(raw, pos)
            end = pos + fmt.LOG_LEN.size + length
            if not length or end > len(raw):
                break
            sealed = raw[pos + fmt.LOG_LEN.size : end]
            ad = fmt.log_ad(fs_id, counter, root_tag, len(bodies), prev)
            try:
                if length < NONCE_SIZE + TAG_SIZE:
                    raise InvalidTag
                bodies.append(self._cipher.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], ad))
            except InvalidTag:
                if not raw[end:].strip(b"\0"):
                    break
                raise IntegrityError(
                    f"log: entry {len(bodies)} failed authentication (tampered, reordered or "
                    "spliced)"
                ) from None
            prev = sealed[-TAG_SIZE:]
            tags.append(prev)
            pos = end
        self.seq, self.prev = len(bodies), prev
        return bodies

    def _check_state(self, state: TrustedState) -> None:
        """Refuse a log shorter than this machine wrote it (its tail cut off or replaced)."""
        position = state.position()
        if position is None:
            return
        counter, _, seq, tag = position
        if counter != self._pages.counter or not seq:
            return
        if self.seq < seq or self._tags[seq] != tag:
            raise IntegrityError(
                f"rolled back: the log holds {self.seq} entries after commit {counter} but "
                f"this machine logged {seq} (trusted state {state.path})"
            )

    def _apply(
        self,
        final: dict[bytes, bytes | None],
        blocks: dict[tuple[int, int], tuple[bytes, bytes]],
        write: Callable[[Inode, int, bytes], None],
    ) -> None:
        inodes = self._inodes
        kinds: dict[int, list[tuple[bytes, bytes | None]]] = {_INODE: [], _ENTRY: [], _MAP: []}
        for key, value in final.items():
            if len(key) < 9 or key[0] not in kinds:
                raise IntegrityError("log: unknown record kind")
            kinds[key[0]].append((key, value))
        for key, value in kinds[_INODE]:
            ino = int.from_bytes(key[1:9], "big")
            if value is None:
                inodes.pop(ino, None)
                continue
            rec = fmt.parse_inode(value)
            node = inodes.get(ino)
            if node is None:
                node = inodes[ino] = Inode(ino, rec.mode, rec.uid, rec.gid)
            elif stat.S_IFMT(node.mode) != stat.S_IFMT(rec.mode):
                raise IntegrityError(f"log: inode {ino} changes its type")
            apply_inode(node, rec)
        added = []
        for key, value in kinds[_ENTRY]:
            _, parent, name = fmt.split_key(key)
            if value is None:
                pnode = inodes.get(parent)
                if pnode is not None and pnode.entries:
                    pnode.entries.pop(name, None)
                continue
            child, cookie = fmt.parse_entry(value)
            added.append((cookie, parent, name, child))
        added.sort()  # cookies only grow: the dicts stay in cookie order
        for cookie, parent, name, child in added:
            pnode = inodes.get(parent)
            if pnode is None or pnode.entries is None:
                raise IntegrityError(f"log: entry {name!r} in a missing directory {parent}")
            pnode.entries.pop(name, None)
            pnode.entries[name] = (child, cookie)
        data: list[tuple[Inode, int, bytes]] = []
        touched: set[Inode] = set()
        for key, value in kinds[_MAP]:
            _, ino, rest = fmt.split_key(key)
            chunk_no = int.from_bytes(rest, "big")
            node = inodes.get(ino)
            if value is None:
                if node is not None and node.chunks:
                    node.chunks.pop(chunk_no, None)
                    touched.add(node)
                continue
            if node is None or not stat.S_ISREG(node.mode) or len(value) % ENTRY_SIZE:
                raise IntegrityError(f"log: block map chunk {chunk_no} of a missing inode {ino}")
            chunk = self._unlogged(node, chunk_no, bytearray(value), blocks, data)
            if node.chunks is EMPTY:
                node.chunks = {}
            if chunk:
                node.chunks[chunk_no] = chunk
            else:
                node.chunks.pop(chunk_no, None)
            touched.add(node)
        for node in touched:
            node.present = sum(
                1 for chunk in node.chunks.values() for at in range(0, len(chunk), ENTRY_SIZE)
                if chunk[at]
            )  # fmt: skip
        for node, block, plain in data:
            write(node, block * BLOCK_SIZE, plain)

    def _unlogged(
        self,
        node: Inode,
        chunk_no: int,
        new: bytearray,
        blocks: dict[tuple[int, int], tuple[bytes, bytes]],
        data: list[tuple[Inode, int, bytes]],
    ) -> bytearray:
        """The logged chunk ``new`` with the committed entry back for every block the log
        holds data for, that data decrypted (checked against the logged entry) into ``data``."""
        old = node.chunks.get(chunk_no) or b""
        prefix = fmt.data_ad_prefix(self._fs_id)
        for at in range(0, len(new), ENTRY_SIZE):
            entry = bytes(new[at : at + ENTRY_SIZE])
            was = bytes(old[at : at + ENTRY_SIZE]).ljust(ENTRY_SIZE, b"\0")
            if not entry[0] or entry == was:
                continue
            block = chunk_no * CHUNK_BLOCKS + at // ENTRY_SIZE
            logged = blocks.get((node.ino, block))
            if logged is None or logged[0] != entry:
                raise IntegrityError(f"log: inode {node.ino} block {block} is not in the log")
            nonce, tag = entry[fmt.ENTRY_NONCE : fmt.ENTRY_TAG], entry[fmt.ENTRY_TAG :]
            try:
                plain = self._data.decrypt(
                    nonce, logged[1] + tag, fmt.data_ad(prefix, node.ino, block)
                )
            except InvalidTag:
                raise IntegrityError(
                    f"log: inode {node.ino} block {block} failed authentication"
                ) from None
            new[at : at + ENTRY_SIZE] = was
            data.append((node, block, plain))
        return bytearray(fmt.trim_chunk(new))


def _changed_blocks(key: bytes, old: bytes, new: bytes, out: list[tuple[int, int, bytes]]) -> None:
    """The blocks of map record ``key`` whose entry differs from ``old`` and is not a hole."""
    size = len(new)
    if len(old) != size:
        old = bytes(old[:size]).ljust(size, b"\0")
    if old == new:
        return
    ino = int.from_bytes(key[1:9], "big")
    base = int.from_bytes(key[9:17], "big") * CHUNK_BLOCKS
    # Halves that compare equal (memcmp) are skipped whole: an fsync of a large file
    # changes a few of its chunk's 256 entries, and comparing every entry in Python
    # cost ~50 us an fsync.
    spans = [(0, size // ENTRY_SIZE)]
    while spans:
        lo, hi = spans.pop()
        if old[lo * ENTRY_SIZE : hi * ENTRY_SIZE] == new[lo * ENTRY_SIZE : hi * ENTRY_SIZE]:
            continue
        if hi - lo > 16:  # (a chunk rewritten whole still costs one pass, plus 10%)
            mid = (lo + hi) // 2
            spans += ((mid, hi), (lo, mid))  # the lower half next: blocks in order
            continue
        for at in range(lo * ENTRY_SIZE, hi * ENTRY_SIZE, ENTRY_SIZE):
            if new[at] and new[at : at + ENTRY_SIZE] != old[at : at + ENTRY_SIZE]:
                out.append((ino, base + at // ENTRY_SIZE, bytes(new[at : at + ENTRY_SIZE])))
