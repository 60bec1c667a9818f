"""The SEFS page table: which records live in which sealed page, and the commit.

All metadata is records (docs/formats/sefs.md): an inode, a directory entry,
a block-map chunk. Pages partition the sorted key space: page ``i`` holds the
keys in ``[starts[i], starts[i + 1])`` and ``table[i]`` says where its sealed
object lives. Pages are read on demand, each checked against its tag when
read, and the last few read stay decrypted (an LRU by first key): the
filesystem materialises inodes from them. ``dirty`` names every record whose
value changed since the last commit; a commit re-seals exactly the pages
holding them (their other records are the page's committed ones), writes one
new pack and then the head that points at it.
"""

from __future__ import annotations

import bisect
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from occlumfs.errors import IntegrityError
from occlumfs.sefs import format as fmt
from occlumfs.sefs.inode import Inode
from occlumfs.sefs.storage import Storage

_U64 = struct.Struct(">Q")
_INODE_KIND, _ENTRY_KIND = b"i"[0], b"e"[0]
PAGE_CACHE_PAGES = 64  # decrypted pages kept (~32 KiB of records each)
PACK_OUT = 1 << 20  # a pack is written out in pieces of about this much (the peak memory)
FRAME_CACHE_PAGES = 32  # pages whose records stay serialised between commits (~2 MiB)
_FRAME_LATER = 1024  # bytes: a changed record's value this long is framed with its piece
PARALLEL_FSYNC_MAX = 64  # files; a commit writing more syncs them with Storage.sync (syncfs)
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): threads do not survive fork


def _frame_size(key: bytes, frame: bytes | int) -> int:
    """The framed size of a record: ``frame`` is its frame, or the length of its value."""
    return len(frame) if isinstance(frame, bytes) else len(fmt.frame_record(key, b"")) + frame


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(8, thread_name_prefix="sefs-fsync"))
    return _pool[1]


def make_durable(storage: Storage, files: Sequence[str], dirs: Sequence[str]) -> None:
    """Make ``files`` and the entries of ``dirs`` durable: one barrier, whatever its order.

    The fsyncs run in parallel, so the host's journal commits them together: a
    commit waits about one host fsync instead of one per file. Many files are
    left to ``Storage.sync`` (one ``syncfs`` on disk), which covers the dirs too.
    """
    jobs: list[Callable[[], None]]
    if len(files) > PARALLEL_FSYNC_MAX:
        storage.sync(files)
        return
    jobs = [lambda n=n: storage.fsync(n) for n in files]
    jobs += [lambda d=d: storage.fsync_dir(d) for d in dirs]
    if len(jobs) == 1:
        jobs[0]()
        return
    futures = [_executor().submit(job) for job in jobs]
    wait(futures)
    for future in futures:
        future.result()  # the first failure, if any, once every fsync has returned


class PageTable:
    def __init__(
        self,
        storage: Storage,
        cipher: AESGCM,
        head_mac: bytes,
        fs_id: bytes,
        inodes: dict[int, Inode],
    ) -> None:
        self.storage = storage
        self._cipher = cipher
        self._head_mac = head_mac
        self._fs_id = fs_id
        self._inodes = inodes  # the filesystem's: records are read from it at commit
        self.starts: list[bytes] = [b""]
        self.table: list[fmt.ObjectRef | None] = [None]
        self.pack_sizes: dict[int, int] = {}
        self.counter = 0
        self.root_tag = b""
        self.dirty: set[bytes] = set()  # keys of records changed since the last commit
        # Page start -> its framed records as last sealed, for the pages sealed
        # most recently (oldest first): what a commit need not serialise again.
        self._frame_cache: dict[bytes, dict[bytes, bytes]] = {}
        # Page start -> its committed records (sorted keys, values), least recently used first.
        self._page_cache: dict[bytes, tuple[list[bytes], list[bytes]]] = {}
        self.pages_read = 0  # pages read and checked since open (for measurements)

    def page_of(self, key: bytes) -> int:
        return bisect.bisect_right(self.starts, key) - 1

    # == reading ===========================================================================
    def open_object(self, packs: dict[int, bytes], ref: fmt.ObjectRef, ad: bytes, what: str):
        """The plaintext of the sealed object at ``ref``; ``packs`` caches pack contents."""
        data = packs.get(ref.pack)
        if data is None:
            name = fmt.pack_name(ref.pack)
            try:
                data = packs[ref.pack] = self.storage.read(name)
            except FileNotFoundError:
                raise IntegrityError(f"{what}: metadata pack {name} is missing") from None
            self.pack_sizes[ref.pack] = len(data)
        return self._unseal(data[ref.offset : ref.offset + ref.length], ref, ad, what)

    def _unseal(self, obj: bytes, ref: fmt.ObjectRef, ad: bytes, what: str) -> bytes:
        """The plaintext of ``obj``, which ``ref`` says is a sealed object with its tag."""
        if len(obj) != ref.length or ref.length < fmt.NONCE_SIZE + fmt.TAG_SIZE:
            raise IntegrityError(f"{what}: metadata pack {fmt.pack_name(ref.pack)} is truncated")
        if obj[-fmt.TAG_SIZE :] != ref.tag:
            raise IntegrityError(
                f"{what}: does not match its recorded tag (replaced or rolled back)"
            )
        try:
            return self._cipher.decrypt(obj[: fmt.NONCE_SIZE], obj[fmt.NONCE_SIZE :], ad)
        except InvalidTag:
            raise IntegrityError(f"{what}: authentication failed (tampered or moved)") from None

    def use_root(self, counter: int, root_tag: bytes, root: fmt.Root) -> None:
        """Take the page table of a root just read; its pages are read when needed."""
        self.counter = counter
        self.root_tag = root_tag
        self.starts = list(root.first_keys)
        self.table = list(root.pages)
        self._page_cache.clear()

    def page_records(
        self, page: int, plain: bytes, starts: list[bytes] | None = None
    ) -> list[tuple[bytes, bytes]]:
        """The records of page ``page`` (of ``starts``) from its plaintext: sorted, in range."""
        starts = self.starts if starts is None else starts
        records = fmt.parse_page(plain)
        low = starts[page]
        high = starts[page + 1] if page + 1 < len(starts) else None
        last = None
        for key, _ in records:
            if key < low or (high is not None and key >= high):
                raise IntegrityError(f"metadata page {page}: holds a record of another page")
            if last is not None and key <= last:
                raise IntegrityError(f"metadata page {page}: records out of order")
            last = key
        return records

    def _read_page(self, page: int, starts: list[bytes], table: list) -> tuple[list, list]:
        """Page ``page``'s committed records, read, checked and cached when not cached."""
        start = starts[page]
        cache = self._page_cache
        hit = cache.pop(start, None)
        if hit is not None:
            cache[start] = hit  # most recently used: to the end
            return hit
        ref = table[page]
        if ref is None:  # a new filesystem's first page, never sealed
            return [], []
        what = f"metadata page {page}"
        name = fmt.pack_name(ref.pack)
        buf = bytearray(ref.length)
        try:
            got = self.storage.preadv(name, ref.offset, [memoryview(buf)])
        except FileNotFoundError:
            raise IntegrityError(f"{what}: metadata pack {name} is missing") from None
        if got != ref.length:
            raise IntegrityError(f"{what}: metadata pack {name} is truncated")
        plain = self._unseal(bytes(buf), ref, fmt.page_ad(self._fs_id, ref.pack, start), what)
        records = self.page_records(page, plain, starts)
        self.pages_read += 1
        hit = cache[start] = ([k for k, _ in records], [v for _, v in records])
        while len(cache) > PAGE_CACHE_PAGES:
            del cache[next(iter(cache))]
        return hit

    def get(self, key: bytes) -> bytes | None:
        """The committed value of record ``key`` (None: no such record)."""
        keys, values = self._read_page(self.page_of(key), self.starts, self.table)
        i = bisect.bisect_left(keys, key)
        return values[i] if i < len(keys) and keys[i] == key else None

    def scan_many(self, ranges: Sequence[tuple[bytes, bytes]]) -> list[tuple[int, bytes, bytes]]:
        """``(n, key, value)`` for the committed records in each range ``ranges[n] =
        [low, high)``; the ranges sorted and disjoint. One pass over the pages: a
        listing's children cost a bisect each, not a page lookup each."""
        starts, table = self.starts, self.table
        count, find = len(starts), bisect.bisect_left
        page, keys, values, pos, end = -1, [], [], 0, 0
        found = []
        for n, (low, high) in enumerate(ranges):
            if page < 0 or (page + 1 < count and low >= starts[page + 1]):
                page = self.page_of(low)
                keys, values = self._read_page(page, starts, table)
                pos, end = 0, len(keys)
            while True:
                i = pos = find(keys, low, pos)
                while i < end and keys[i] < high:
                    found.append((n, keys[i], values[i]))
                    i += 1
                if i < end or page + 1 >= count or starts[page + 1] >= high:
                    break
                page += 1  # the range goes on in the next page
                keys, values = self._read_page(page, starts, table)
                pos, end = 0, len(keys)
        return found

    def scan(self, low: bytes, high: bytes) -> Iterator[tuple[bytes, bytes]]:
        """The committed records whose keys lie in ``[low, high)``, in key order,
        read a page at a time."""
        page = self.page_of(low)
        starts = self.starts
        while page < len(starts) and starts[page] < high:
            keys, values = self._read_page(page, starts, self.table)
            i = bisect.bisect_left(keys, low)
            j = bisect.bisect_left(keys, high)
            yield from zip(keys[i:j], values[i:j], strict=True)
            page += 1

    # == committing ========================================================================
    def record(self, key: bytes) -> bytes | None:
        """The current value of record ``key``, or None when it no longer exists.
        Called once per changed record at each commit: kept to a few operations."""
        node = self._inodes.peek(_U64.unpack_from(key, 1)[0]) if len(key) >= 9 else None
        if node is None or node.nlink == 0:
            return None
        kind = key[0]
        if kind == _INODE_KIND:
            is_dir = node.is_dir
            return fmt.inode_value(
                (
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
                    node.next_cookie if is_dir else 0,
                    len(node.entries) if is_dir else 0,
                ),
                node.target,
                node.xattrs,
            )
        if kind == _ENTRY_KIND:
            entry = node.entries.get(key[9:]) if node.entries is not None else None
            return None if entry is None else fmt.pack_entry(*entry)
        chunk = node.chunks.get(int.from_bytes(key[9:], "big"))
        if chunk is None:
            return None
        trimmed = fmt.trim_chunk(chunk)
        return trimmed or None

    def _seal(self, plain: bytes, ad: bytes) -> bytes:
        nonce = os.urandom(fmt.NONCE_SIZE)
        return nonce + self._cipher.encrypt(nonce, plain, ad)

    @staticmethod
    def _split(keys: list[bytes], frames: dict[bytes, bytes | int]) -> list[list[bytes]]:
        """One page's keys (sorted), cut into pages of about PAGE_SPLIT bytes if too big."""
        sizes = [_frame_size(key, frames[key]) for key in keys]
        if sum(sizes) <= fmt.PAGE_MAX:
            return [keys]
        pieces: list[list[bytes]] = [[]]
        size = 0
        for key, grown in zip(keys, sizes, strict=True):
            if pieces[-1] and size + grown > fmt.PAGE_SPLIT:
                pieces.append([])
                size = 0
            pieces[-1].append(key)
            size += grown
        return pieces

    def _frames(self, page: int, starts: list[bytes], table: list, changed: Iterable[bytes]):
        """The framed records of page ``page`` (of ``starts``/``table``, as committed):
        the cached frames of its last seal, else its committed records read back,
        updated with the records of the ``changed`` keys. A fresh dict (a commit may
        fail). A large changed record (a block-map chunk, ~7 KiB) stands as the length
        of its value until its piece of the page is sealed (:meth:`_framed`): the
        block map of a 1 GiB write (7.5 MB) is never held framed whole."""
        cached = self._frame_cache.get(starts[page])
        frames: dict[bytes, bytes | int]
        if cached is None:
            keys, values = self._read_page(page, starts, table)
            frames = {k: fmt.frame_record(k, v) for k, v in zip(keys, values, strict=True)}
        else:
            frames = dict(cached)
        for key in changed:
            value = self.record(key)
            if value is None:
                frames.pop(key, None)
            elif len(value) > _FRAME_LATER:
                frames[key] = len(value)
            else:
                frames[key] = fmt.frame_record(key, value)
        return frames

    def _framed(self, keys: list[bytes], frames: dict[bytes, bytes | int]) -> dict[bytes, bytes]:
        """The frames of ``keys``, framing the records :meth:`_frames` left for later."""
        out = {}
        for key in keys:
            frame = frames[key]
            if not isinstance(frame, bytes):
                value = self.record(key)
                assert value is not None and len(value) == frame  # nothing changes mid-commit
                frame = fmt.frame_record(key, value)
            out[key] = frame
        return out

    def commit(self, next_ino: int, data_files: Sequence[str] = ()) -> None:
        """Seal the dirty pages and a new root into one pack, then switch the head to it.

        ``data_files`` are the data files written since the last commit: they are
        made durable together with the pack and the new head's temporary file, in
        one barrier (:func:`make_durable`), before the rename that commits.
        """
        dirty_pages: dict[int, list[bytes]] = {}  # page -> keys of its changed records
        for key in self.dirty:
            dirty_pages.setdefault(self.page_of(key), []).append(key)
        if self.table and self.table[0] is None:  # a new filesystem's first page
            dirty_pages.setdefault(0, [])
        live = sum(ref.length for ref in self.table if ref is not None)
        if sum(self.pack_sizes.values()) > 2 * live + (1 << 20):
            for page in range(len(self.table)):  # compact: rewrite all, drop old packs
                dirty_pages.setdefault(page, [])
        stale = [self.starts[page] for page in dirty_pages]
        counter = self.counter + 1
        starts, table = list(self.starts), list(self.table)
        sealed: dict[bytes, dict[bytes, bytes] | None] = {}  # page start -> its frames now
        # Only the frames of the newest FRAME_CACHE_PAGES pages sealed stay cached
        # (_remember): the older ones are let go as the commit goes, not held to its
        # end (a 1 GiB file's block map is 7.5 MB of frames).
        kept: deque[bytes] = deque()
        name = fmt.pack_name(counter)
        pack = bytearray()  # the pack's bytes not in its file yet
        flushed = 0  # ...and those that are: a large pack goes out a MiB at a time
        # From the last page down, so that splitting or dropping a page does not
        # move the pages still to be done.
        for page in sorted(dirty_pages, reverse=True):
            frames = self._frames(page, starts, table, dirty_pages[page])
            if not frames and page:
                sealed[starts[page]] = None
                del starts[page], table[page]  # its range joins the previous
                continue
            pieces = self._split(sorted(frames), frames)
            firsts = [starts[page]] + [piece[0] for piece in pieces[1:]]
            refs = []
            for piece, first in zip(pieces, firsts, strict=True):
                piece_frames = self._framed(piece, frames)
                plain = fmt.pack_framed(list(piece_frames.values()))
                obj = self._seal(plain, fmt.page_ad(self._fs_id, counter, first))
                at = flushed + len(pack)
                refs.append(fmt.ObjectRef(counter, at, len(obj), obj[-fmt.TAG_SIZE :]))
                pack += obj
                sealed[first] = piece_frames
                kept.append(first)
                if len(kept) > FRAME_CACHE_PAGES:
                    sealed[kept.popleft()] = None  # stale in the cache: dropped from it
                if len(pack) >= PACK_OUT:
                    flushed = self._pack_out(name, pack, flushed)
            starts[page : page + 1] = firsts
            table[page : page + 1] = refs
        root_obj = self._seal(
            fmt.pack_root(fmt.Root(next_ino, starts, table)), fmt.root_ad(self._fs_id, counter)
        )
        at = flushed + len(pack)
        root_ref = fmt.ObjectRef(counter, at, len(root_obj), root_obj[-fmt.TAG_SIZE :])
        pack += root_obj
        pack_size = self._pack_out(name, pack, flushed)
        head = fmt.pack_head(fmt.Head(self._fs_id, counter, root_ref), self._head_mac)
        self.storage.write_file(fmt.HEAD_TMP_NAME, head)
        # One barrier for everything the new head depends on (head.tmp is inert
        # until renamed), then the rename, the commit point, and its directory.
        make_durable(
            self.storage,
            [*data_files, name, fmt.HEAD_TMP_NAME],
            [fmt.META_DIR] + ([fmt.DATA_DIR] if data_files else []),
        )
        self.storage.rename(fmt.HEAD_TMP_NAME, fmt.HEAD_NAME)
        self.storage.fsync_dir("")
        # -- committed: the new root is the filesystem from here on --
        self.counter = counter
        self.root_tag = root_ref.tag
        self.starts, self.table = starts, table
        self.pack_sizes[counter] = pack_size
        self.dirty.clear()
        for start in stale:  # the pages cached under these first keys are older now
            self._page_cache.pop(start, None)
        self._remember(sealed)

    def _pack_out(self, name: str, pack: bytearray, flushed: int) -> int:
        """Write ``pack`` (what follows the ``flushed`` bytes already written) to the pack
        file ``name``, created by the first write; empties it. Returns the size so far."""
        if flushed:
            self.storage.pwritev(name, flushed, [pack])
        else:
            self.storage.write_file(name, pack)
        flushed += len(pack)
        pack.clear()
        return flushed

    def _remember(self, sealed: dict[bytes, dict[bytes, bytes] | None]) -> None:
        """Keep the frames of the pages just sealed (the likeliest to change next):
        a commit then serialises only the records that changed, not whole pages."""
        cache = self._frame_cache
        for start, frames in sealed.items():
            cache.pop(start, None)
            if frames is not None:
                cache[start] = frames
        while len(cache) > FRAME_CACHE_PAGES:
            del cache[next(iter(cache))]

    def discard_dead_packs(self) -> None:
        """Delete the packs no page of the committed root points into any more."""
        live = {ref.pack for ref in self.table if ref is not None} | {self.counter}
        dead = [n for n in self.pack_sizes if n not in live]
        for number in dead:
            del self.pack_sizes[number]
        self.storage.discard([fmt.pack_name(n) for n in dead])

    def live_packs(self) -> set[int]:
        return {ref.pack for ref in self.table if ref is not None}
