"""SEFS file data: the block buffer, block crypto and the host I/O of data files.

Each inode's data lives in two sparse host files, one per slot
(docs/formats/sefs.md); its block map (``Inode.chunks``) says which slot holds
each block and the nonce and tag it must decrypt with. This module keeps these
invariants:

* A block's committed slot is never written before the next commit: the slot
  a block had at the last commit is remembered in ``committed_slots`` the
  first time the block is touched, and writes go to the other slot. (A block
  that was a hole at the last commit needs no record: both slots are free.)
* Bytes past ``size`` in the last block are zero (truncate zeroes them), so
  growing a file exposes zeros.
* Blocks buffered or sealed since the disk was last measured never outnumber
  its free blocks then (less a reserve for the next commit): a write that would
  exceed that first writes everything out and measures again, so a full disk
  fails that write (ENOSPC), not a later commit that nobody waits for.
* The buffer stays small: once a file has a batch of blocks buffered in order
  (or 4 MiB of scattered ones) on a writable store, they are sealed and handed
  to the write-behind thread (occlumfs.sefs.writeback), which writes while
  requests go on. A batch keeps
  its plaintext until it is written; a failed write is raised by the next
  write, flush or commit, and the blocks not written are buffered again (the
  next write-out retries them): nothing is lost, no error waits for a commit.
  Anything that reads or changes blocks first waits for the batches out.

Read, write and flush run per request over all of its blocks: keep their loops
free of per-block Python code (docs/performance.md).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from occlumfs.errors import FSError, IntegrityError
from occlumfs.sefs import format as fmt
from occlumfs.sefs.format import (
    BLOCK_SIZE,
    CHUNK_BLOCKS,
    CHUNK_MASK,
    CHUNK_SHIFT,
    ENTRY_NONCE,
    ENTRY_SIZE,
    ENTRY_TAG,
    SLOT_A,
    SLOT_B,
    SLOT_HOLE,
)
from occlumfs.sefs.inode import EMPTY, Inode
from occlumfs.sefs.seal import STRIDE as _STRIDE
from occlumfs.sefs.seal import note_committed_slot, pieces, seal
from occlumfs.sefs.storage import Storage
from occlumfs.sefs.writeback import BATCH_BLOCKS, Batch, WriteBehind

DIRTY_LIMIT_BLOCKS = 8192  # 32 MiB of plaintext buffered at most (write-behind keeps far less)
_WRITE_RUN = 512  # blocks per preadv (below IOV_MAX)
SCATTERED_BLOCKS = 1024  # 4 MiB: blocks of a file not written in order buffered at most
_THREAD_BLOCKS = 1024  # a flush of this many blocks or more writes in a thread as it seals
_TAG_FAILED = "authentication failed (tampered, moved or rolled back)"


def slot_run(node: Inode, block: int, last: int, slot: int) -> int:
    """The last of ``block..last`` such that all of them live in ``slot``
    (``block`` itself does), reading the map's slot bytes a chunk at a time."""
    same = bytes((slot,))
    end = block
    while end < last:
        chunk_no, at = fmt.chunk_of(end + 1)
        chunk = node.chunks.get(chunk_no)
        if chunk is None:
            break
        want = min(CHUNK_BLOCKS - at // ENTRY_SIZE, last - end)
        slots = chunk[at : at + want * ENTRY_SIZE : ENTRY_SIZE]
        run = len(slots) - len(slots.lstrip(same))
        end += run
        if run < want:
            break
    return end


class BlockIO:
    """Buffers, seals, writes, reads and opens the data blocks of every inode."""

    def __init__(
        self,
        storage: Storage,
        cipher: AESGCM,
        fs_id: bytes,
        inodes: dict[int, Inode],
        dirty_keys: set[bytes],
        describe: Callable[[int], str],
        room: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.storage = storage
        self._cipher = cipher
        self._prefix = fmt.data_ad_prefix(fs_id)
        self._inodes = inodes  # the filesystem's
        self._dirty_keys = dirty_keys  # the page table's: map chunks changed since the commit
        self._describe = describe  # a path of an inode, for messages
        self._room = room  # blocks the store's disk can take beyond the reserve (None: unknown)
        self._free: int | None = None  # its last answer
        self.limit = DIRTY_LIMIT_BLOCKS  # buffered blocks that trigger a write-out
        self.dirty_inodes: set[int] = set()  # inodes with buffered plaintext blocks
        self.dirty_blocks = 0
        self._slot_touched: set[int] = set()  # inodes whose committed_slots are in use
        self._written: set[str] = set()  # data files written since the last commit
        self._doomed: set[str] = set()  # data files to delete once a commit drops them
        self._behind = WriteBehind(storage)  # batches being written while requests go on
        self._streaming = False  # write-behind as blocks arrive: once the store is writable
        self._sealed = 0  # blocks sealed since the disk was last measured (each may take one)
        self._raw_buf = bytearray(0)
        self._raw_view = memoryview(self._raw_buf)

    @property
    def buffered(self) -> int:
        """Plaintext blocks held in memory: buffered, or sealed and being written."""
        return self.dirty_blocks + self._behind.held_blocks

    # == buffering =========================================================================
    def measure(self) -> None:
        """Ask the store's disk again how much may be buffered (and written behind: a
        store measured is one being written; a read-only mount's log replay never is)."""
        self._free = self._room()
        self._sealed = 0
        self._streaming = True
        self.limit = (
            DIRTY_LIMIT_BLOCKS if self._free is None else min(DIRTY_LIMIT_BLOCKS, self._free)
        )

    def _make_room(self, span: int) -> None:
        """Write out every buffered block, then refuse ``span`` more if the disk cannot
        take them. Either failure (ENOSPC) leaves nothing of the new write buffered."""
        self.flush_all()
        self.measure()
        if self._free is not None and span > self._free:
            raise FSError(errno.ENOSPC)

    def write(self, node: Inode, offset: int, data: bytes) -> None:
        """Buffer ``data`` at ``offset`` (the caller updates the size). Once a file has
        a batch of blocks buffered, they are sealed and handed to the write-behind
        thread; a write that thread failed is raised here, by the next write."""
        behind = self._behind
        if behind.error is not None:
            self._settle(report=True)
        elif behind.active and (offset | len(data)) % BLOCK_SIZE:
            self._settle(report=False)  # a partial block is read: nothing may be out
        size = len(data)
        span = (offset + size - 1) // BLOCK_SIZE - offset // BLOCK_SIZE + 1
        if self.dirty_blocks + behind.held_blocks + span > self.limit or (
            self._free is not None and self._sealed + self.dirty_blocks + span > self._free
        ):
            self._make_room(span)
        if not isinstance(data, bytes):
            data = bytes(data)  # buffered blocks are views of it: it must not change
        view = memoryview(data)
        if node.dirty is EMPTY:
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
                current = self.block_for_update(node, block)
                current[skip : skip + take] = view[pos : pos + take]
            pos += take
            block += 1
            skip = 0
        added = len(dirty) - before
        self.dirty_blocks += added
        if added:
            self.dirty_inodes.add(node.ino)
        # A file written in order is written behind a batch at a time; scattered
        # writes wait for more (a batch of scattered blocks is a pwrite each, and
        # some are rewritten meanwhile).
        if self._streaming and (
            len(dirty) >= SCATTERED_BLOCKS
            or (len(dirty) >= BATCH_BLOCKS and next(iter(dirty)) == block - len(dirty))
        ):
            behind.reap()
            self._seal_out(node, True)

    def block_for_update(self, node: Inode, block: int) -> bytearray:
        """A mutable buffered copy of ``block`` (the caller accounts for new dirty blocks)."""
        buffered = node.dirty.get(block)
        if isinstance(buffered, bytearray):
            return buffered
        current = self.read(node, block, block)
        if node.dirty is EMPTY:
            node.dirty = {}
        node.dirty[block] = current
        return current

    def truncate(self, node: Inode, size: int) -> None:
        """Drop the blocks past ``size`` and zero the tail of the last one."""
        if self._behind.active:
            self._settle(report=False)
        if size < node.size:
            keep = fmt.blocks_for(size)
            for block in [b for b in node.dirty if b >= keep]:
                del node.dirty[block]
                self.dirty_blocks -= 1
            for c in [c for c in node.chunks if (c + 1) * CHUNK_BLOCKS > keep]:
                chunk = node.chunks[c]
                start = max(keep - c * CHUNK_BLOCKS, 0) * ENTRY_SIZE
                for off in range(start, len(chunk), ENTRY_SIZE):
                    if chunk[off]:
                        note_committed_slot(node, c * CHUNK_BLOCKS + off // ENTRY_SIZE, chunk[off])
                        node.present -= 1
                del chunk[start:]
                if not chunk:
                    del node.chunks[c]
                self._dirty_keys.add(fmt.map_key(node.ino, c))
            self._slot_touched.add(node.ino)
            tail = size % BLOCK_SIZE
            if tail and (keep - 1 in node.dirty or node.slot(keep - 1)):
                before = len(node.dirty)
                current = self.block_for_update(node, keep - 1)
                current[tail:] = bytes(BLOCK_SIZE - tail)
                if len(node.dirty) > before:
                    self.dirty_blocks += 1
                    self.dirty_inodes.add(node.ino)
        node.size = size

    def forget(self, node: Inode, on_host: bool = True) -> None:
        """``node`` is gone: drop its buffered blocks; its data files go after the next
        commit (unless the caller knows that neither is on the host: not ``on_host``)."""
        if self._behind.active:
            self._settle(report=False)
        self.dirty_blocks -= len(node.dirty)
        node.dirty = EMPTY
        self.dirty_inodes.discard(node.ino)
        for slot in (SLOT_A, SLOT_B):
            name = fmt.data_name(node.ino, slot)
            self._written.discard(name)
            if on_host:
                self._doomed.add(name)

    # == writing out =======================================================================
    def flush_all(self) -> None:
        """Write out every buffered block and wait until all of it is written."""
        behind = self._behind
        try:
            for ino in list(self.dirty_inodes):
                node = self._inodes.get(ino)
                if node is not None and node.dirty:
                    self._seal_out(node, behind.active or len(node.dirty) >= _THREAD_BLOCKS)
        except BaseException:
            if behind.active:  # batches handed over before the failure are settled too
                self._settle(report=False)
            raise
        self.dirty_inodes.clear()
        self.dirty_blocks = 0
        if behind.active:
            self._settle(report=True)

    def flush(self, node: Inode) -> None:
        """Write out ``node``'s buffered blocks and wait until they (and any other
        batches out) are written; a failed write is raised and its blocks stay buffered.

        A large flush (or one while batches are out) hands the batches to the
        write-behind thread as it seals them, so the host writes overlap the sealing;
        a small one writes from this thread.
        """
        behind = self._behind
        if node.dirty:
            self._seal_out(node, behind.active or len(node.dirty) >= _THREAD_BLOCKS)
        if behind.active:
            self._settle(report=True)

    def _settle(self, report: bool) -> None:
        """Wait for the write-behind thread; buffer the blocks of batches that failed
        again (the next write-out retries them) and raise the failure if ``report``."""
        error, written, failed = self._behind.drain()
        self._written.update(written)
        for batch in reversed(failed):  # newest first: a block's newest plaintext wins
            self._rebuffer(batch.node, batch.plain)
        if error is not None and report:
            raise error

    def _rebuffer(self, node: Inode, plain: dict) -> None:
        """Buffer ``plain`` again under ``node``, except blocks written again since."""
        if node.dirty is EMPTY:
            node.dirty = {}
        dirty = node.dirty
        before = len(dirty)
        for block, data in plain.items():
            dirty.setdefault(block, data)
        self.dirty_blocks += len(dirty) - before
        self.dirty_inodes.add(node.ino)

    def _seal_out(self, node: Inode, behind: bool) -> None:
        """Seal ``node``'s buffered blocks in batches and write them: handed to the
        write-behind thread if ``behind``, else from this thread (a failed write is
        raised with its blocks, and those not sealed yet, buffered again)."""
        dirty = node.dirty
        node.dirty = EMPTY
        self.dirty_blocks -= len(dirty)
        self.dirty_inodes.discard(node.ino)
        blocks = sorted(dirty)
        writer = self._behind
        for i in range(0, len(blocks), BATCH_BLOCKS):
            group = blocks[i : i + BATCH_BLOCKS]
            plain = dirty if len(group) == len(blocks) else {b: dirty[b] for b in group}
            if writer.error is not None:  # a batch failed: seal no more, keep the rest
                self._rebuffer(node, {b: dirty[b] for b in blocks[i:]})
                return
            buf = writer.buffer(len(group) * _STRIDE)
            batch = Batch(
                node, plain, buf, seal(self._cipher, self._prefix, node, plain, group, buf)
            )
            self._sealed += len(group)
            # The chunks of the group's blocks. Those between its first and last
            # when that is fewer steps than blocks (dense writes: one or two), else
            # each block's: a sparse file's blocks may be terabytes apart.
            lo, hi = group[0] >> CHUNK_SHIFT, group[-1] >> CHUNK_SHIFT
            chunks = (
                range(lo, hi + 1) if hi - lo < len(group) else {b >> CHUNK_SHIFT for b in group}
            )
            for c in chunks:
                self._dirty_keys.add(fmt.map_key(node.ino, c))
            self._slot_touched.add(node.ino)
            if behind:
                writer.submit(batch)
                continue
            try:
                for name, offset, pieces in batch.writes:
                    self.storage.pwritev(name, offset, pieces)
                    self._written.add(name)
            except BaseException:
                self._rebuffer(node, {b: dirty[b] for b in blocks[i:]})
                raise
            finally:
                writer.release(buf)

    def written(self) -> list[str]:
        """The data files written since the last commit: the commit makes them durable.
        (Called after :meth:`flush_all`: nothing is being written behind.)"""
        return sorted(self._written)

    def committed(self) -> None:
        """A commit took the block maps: the slots written since are the committed ones."""
        self._written.clear()
        for ino in self._slot_touched:
            node = self._inodes.get(ino)
            if node is not None:
                node.committed_slots = EMPTY
        self._slot_touched.clear()

    @property
    def freeing(self) -> bool:
        """Whether deleted files' data files wait for a commit to be deleted."""
        return bool(self._doomed)

    def wait_freed(self) -> None:
        """Wait until the data files discarded so far are gone, and measure the disk."""
        self.storage.wait_discarded()
        self.measure()

    def discard_doomed(self) -> None:
        """Delete the data files of inodes the last commit dropped."""
        self.storage.discard(sorted(self._doomed))
        self._doomed.clear()

    # == reading ===========================================================================
    def _corrupt(self, node: Inode, block: int, what: str) -> IntegrityError:
        return IntegrityError(
            f"{self._describe(node.ino)}: block {block} (offset {block * BLOCK_SIZE}): {what}"
        )

    def read_run(self, node: Inode, first: int, last: int, slot: int, out: memoryview) -> None:
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
                self.read_run(
                    node, start, stop, slot, out[at : at + (stop - start + 1) * BLOCK_SIZE]
                )
            return
        raw = self._raw_view
        if len(raw) < count * _STRIDE:
            self._raw_buf = bytearray(count * _STRIDE)
            raw = self._raw_view = memoryview(self._raw_buf)
        ino = node.ino
        name = fmt.data_name(ino, slot)
        # One block (a random small read) is the common request: its iovec is built
        # directly (0.1 us; the general form costs 0.8 us).
        iov = [raw[:BLOCK_SIZE]] if count == 1 else list(pieces(raw, _STRIDE, BLOCK_SIZE, count))
        try:
            got = self.storage.preadv(name, first * BLOCK_SIZE, iov)
        except FileNotFoundError:
            raise self._corrupt(node, first, f"data file {name} is missing") from None
        if got != count * BLOCK_SIZE:
            block = first + got // BLOCK_SIZE
            raise self._corrupt(node, block, f"data file {name} is truncated")
        if count == 1:  # a random small read, the commonest request: no loop to set up
            chunk_no, off = fmt.chunk_of(first)
            chunk = node.chunks[chunk_no]
            raw[BLOCK_SIZE:_STRIDE] = chunk[off + ENTRY_TAG : off + ENTRY_SIZE]
            try:
                self._cipher.decrypt_into(
                    chunk[off + ENTRY_NONCE : off + ENTRY_TAG],
                    raw[:_STRIDE],
                    self._prefix + fmt.DATA_AD_BLOCK.pack(ino, first),
                    out,
                )
            except InvalidTag:
                raise self._corrupt(node, first, _TAG_FAILED) from None
            return
        decrypt_into = self._cipher.decrypt_into
        prefix = self._prefix
        pack_ad = fmt.DATA_AD_BLOCK.pack
        ad = prefix + pack_ad(ino, first)
        chunks = node.chunks
        chunk_no, off = fmt.chunk_of(first)
        chunk = chunks[chunk_no]
        shift, mask = CHUNK_SHIFT, CHUNK_MASK
        nonce_at, tag_at = ENTRY_NONCE, ENTRY_TAG
        at = 0
        block = first
        try:
            for i in range(count):
                if i and not block & mask:
                    chunk = chunks[block >> shift]
                    off = 0
                raw[at + BLOCK_SIZE : at + _STRIDE] = chunk[off + tag_at : off + ENTRY_SIZE]
                if i:
                    ad = prefix + pack_ad(ino, block)
                decrypt_into(
                    chunk[off + nonce_at : off + tag_at],
                    raw[at : at + _STRIDE],
                    ad,
                    out[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE],
                )
                block += 1
                off += ENTRY_SIZE
                at += _STRIDE
        except InvalidTag:
            raise self._corrupt(node, block, _TAG_FAILED) from None

    def read(self, node: Inode, first: int, last: int) -> bytearray:
        """Plaintext of blocks ``first..last``: buffered, decrypted in runs, or hole zeros."""
        if self._behind.active:  # what is being written is read once it is written
            self._settle(report=False)
        out = bytearray((last - first + 1) * BLOCK_SIZE)
        view = memoryview(out)
        dirty = node.dirty
        if not dirty:  # the common case: one run in one slot, no buffered blocks
            slot = node.slot(first)
            if slot and (first == last or slot_run(node, first, last, slot) == last):
                self.read_run(node, first, last, slot, view)
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
                end = slot_run(node, block, last, slot)
            self.read_run(node, block, end, slot, view[at : at + (end - block + 1) * BLOCK_SIZE])
            block = end + 1
        return out

    def verify(self, node: Inode) -> Iterator[str]:
        """Problems with ``node``'s stored blocks (fsck): each one line."""
        if self._behind.active:
            self._settle(report=False)
        limit = fmt.blocks_for(node.size)
        for c, chunk in sorted(node.chunks.items()):
            for off in range(0, len(chunk), ENTRY_SIZE):
                slot = chunk[off]
                block = c * CHUNK_BLOCKS + off // ENTRY_SIZE
                if not slot:
                    continue
                if slot not in (SLOT_A, SLOT_B) or block >= limit:
                    yield (
                        f"{self._describe(node.ino)}: block {block}: "
                        "map entry is invalid or past the end of the file"
                    )
                    continue
                try:
                    self.read_run(node, block, block, slot, memoryview(bytearray(BLOCK_SIZE)))
                except IntegrityError as exc:
                    yield str(exc)
