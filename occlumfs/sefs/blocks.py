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
* Buffered blocks never outnumber the free blocks of the store's disk, as last
  measured (less a reserve for the next commit): a write that would exceed
  that first writes the buffer out, so a full disk fails that write (ENOSPC),
  not a later commit that nobody waits for.

Read, write and flush run per request over all of its blocks: keep their loops
free of per-block calls (docs/performance.md).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

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
    NONCE_SIZE,
    SLOT_A,
    SLOT_B,
    SLOT_HOLE,
)
from occlumfs.sefs.inode import EMPTY, Inode
from occlumfs.sefs.storage import Storage

DIRTY_LIMIT_BLOCKS = 8192  # 32 MiB of plaintext buffered before data is written out
_WRITE_RUN = 512  # blocks per pwritev/preadv (below IOV_MAX)
_STRIDE = BLOCK_SIZE + fmt.TAG_SIZE  # a ciphertext block and its tag, as AES-GCM reads them
_SLOT_BYTES = {SLOT_A: bytes((SLOT_A,)), SLOT_B: bytes((SLOT_B,))}
_THREAD_BLOCKS = 1024  # a flush of this many blocks or more writes in a thread as it encrypts
_BATCH_BYTES = 1 << 20  # ...handing it encrypted runs this much at a time


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


class _RunWriter:
    """Writes the encrypted runs of one large flush in a thread of its own while the
    flush encrypts the next ones (``os.pwritev`` releases the GIL; the encryption
    is Python-bound).

    While it runs, only this thread touches the storage (DiskStorage's descriptor
    cache is not shared between threads): the flush calls :meth:`finish` before it
    returns, which re-raises the first error of a write (the writes after a failed
    one are skipped), or :meth:`settle` when it raises itself.
    """

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._jobs: queue.SimpleQueue[list[tuple[str, int, memoryview]] | None] = (
            queue.SimpleQueue()
        )
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sefs-writer", daemon=True)
        self._thread.start()

    def submit(self, writes: list[tuple[str, int, memoryview]]) -> None:
        self._jobs.put(writes)

    def finish(self) -> None:
        """Wait for every write handed over; re-raise the first that failed."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def settle(self) -> None:
        """Wait for whatever is still out, its errors dropped (the flush already raised)."""
        with contextlib.suppress(BaseException):
            self.finish()

    def _run(self) -> None:
        while (writes := self._jobs.get()) is not None:
            if self._error is not None:
                continue
            try:
                for name, offset, data in writes:
                    self._storage.pwritev(name, offset, [data])
            except BaseException as exc:  # handed to the flushing thread by finish()
                self._error = exc


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
        self._cipher_buf = bytearray(0)  # reused: fresh memory per flush costs page faults
        self._raw_buf = bytearray(0)
        self._raw_view = memoryview(self._raw_buf)

    # == buffering =========================================================================
    def measure(self) -> None:
        """Ask the store's disk again how much may be buffered."""
        self._free = self._room()
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
        """Buffer ``data`` at ``offset`` (the caller updates the size)."""
        size = len(data)
        span = (offset + size - 1) // BLOCK_SIZE - offset // BLOCK_SIZE + 1
        if self.dirty_blocks + span > self.limit:
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
                        block = c * CHUNK_BLOCKS + off // ENTRY_SIZE
                        if node.committed_slots is EMPTY:
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
                current = self.block_for_update(node, keep - 1)
                current[tail:] = bytes(BLOCK_SIZE - tail)
                if len(node.dirty) > before:
                    self.dirty_blocks += 1
                    self.dirty_inodes.add(node.ino)
        node.size = size

    def forget(self, node: Inode) -> None:
        """``node`` is gone: drop its buffered blocks; its data files go after the next commit."""
        self.dirty_blocks -= len(node.dirty)
        node.dirty = EMPTY
        self.dirty_inodes.discard(node.ino)
        for slot in (SLOT_A, SLOT_B):
            name = fmt.data_name(node.ino, slot)
            self._written.discard(name)
            self._doomed.add(name)

    # == writing out =======================================================================
    def flush_all(self) -> None:
        for ino in list(self.dirty_inodes):
            node = self._inodes.get(ino)
            if node is not None:
                self.flush(node)
        self.dirty_inodes.clear()
        self.dirty_blocks = 0

    def flush(self, node: Inode) -> None:
        """Encrypt and write out ``node``'s buffered blocks, one pwrite per run.

        Block ``j`` (in block order) is encrypted into ``buf[4096 j : 4096 j + 4112]``;
        its tag is copied out before block ``j + 1`` overwrites it, which leaves the
        ciphertexts contiguous, ready to be written without another copy. A large
        flush hands the runs already encrypted to a writer thread as it goes, so the
        host writes overlap the encryption; it returns (or raises) once all are done.
        """
        writer = _RunWriter(self.storage) if len(node.dirty) >= _THREAD_BLOCKS else None
        try:
            self._flush(node, writer)
        finally:
            if writer is not None:
                writer.settle()  # a flush that failed half-way leaves no write behind

    def _flush(self, node: Inode, writer: _RunWriter | None) -> None:
        dirty = node.dirty
        if not dirty:
            return
        blocks = sorted(dirty)
        count = len(blocks)
        need = count * BLOCK_SIZE + fmt.TAG_SIZE
        if len(self._cipher_buf) < need:
            self._cipher_buf = bytearray(need)
        buf = memoryview(self._cipher_buf)
        nonces = os.urandom(NONCE_SIZE * count)
        encrypt_into = self._cipher.encrypt_into
        prefix = self._prefix
        ino = node.ino
        if node.chunks is EMPTY:
            node.chunks = {}
        if node.committed_slots is EMPTY:
            node.committed_slots = {}
        chunks = node.chunks
        committed = node.committed_slots
        runs: list[tuple[int, int, int, int]] = []  # (slot, first block, first index, count)
        sent = 0  # runs[:sent] are with the writer thread
        run_slot = run_first = run_j = run_len = 0
        present = node.present
        pack_ad = fmt.DATA_AD_BLOCK.pack
        shift, mask, nsize = CHUNK_SHIFT, CHUNK_MASK, NONCE_SIZE
        chunk_no = -1
        chunk = bytearray()
        at = 0
        for j, block in enumerate(blocks):
            if block >> shift != chunk_no:  # blocks are sorted: once per chunk
                chunk_no = block >> shift
                chunk = chunks.get(chunk_no)
                if chunk is None:
                    chunk = chunks[chunk_no] = bytearray()
                # Grow it once, to the last block of this flush in it.
                first_of_next = (chunk_no + 1) << shift
                last = blocks[bisect.bisect_left(blocks, first_of_next) - 1]
                need = ((last & mask) + 1) * ENTRY_SIZE
                if len(chunk) < need:
                    chunk.extend(bytes(need - len(chunk)))
            off = (block & mask) * ENTRY_SIZE
            was = chunk[off]
            if was:  # the slot it had at the last commit, unless touched since
                old = committed.setdefault(block, was)
            else:  # a hole now; one at the last commit too unless truncated since
                old = committed.get(block, SLOT_HOLE)
                present += 1
            slot = SLOT_B if old == SLOT_A else SLOT_A
            nonce = nonces[j * nsize : j * nsize + nsize]
            encrypt_into(nonce, dirty[block], prefix + pack_ad(ino, block), buf[at : at + _STRIDE])
            chunk[off : off + ENTRY_SIZE] = (
                _SLOT_BYTES[slot] + nonce + buf[at + BLOCK_SIZE : at + _STRIDE]
            )
            if slot == run_slot and block == run_first + run_len and run_len < _WRITE_RUN:
                run_len += 1
            else:
                if run_len:
                    runs.append((run_slot, run_first, run_j, run_len))
                    # Every block before j is encrypted for good: hand those runs over.
                    if writer is not None and (j - runs[sent][2]) * BLOCK_SIZE >= _BATCH_BYTES:
                        writer.submit(self._run_writes(ino, buf, runs[sent:]))
                        sent = len(runs)
                run_slot, run_first, run_j, run_len = slot, block, j, 1
            at += BLOCK_SIZE
        runs.append((run_slot, run_first, run_j, run_len))
        node.present = present
        if writer is not None:
            writer.submit(self._run_writes(ino, buf, runs[sent:]))
            writer.finish()
        else:
            for name, offset, data in self._run_writes(ino, buf, runs):
                self.storage.pwritev(name, offset, [data])
        self._written.update(fmt.data_name(ino, slot) for slot in {run[0] for run in runs})
        for c in {b >> shift for b in blocks}:
            self._dirty_keys.add(fmt.map_key(ino, c))
        self._slot_touched.add(ino)
        self.dirty_blocks -= count
        node.dirty = EMPTY

    @staticmethod
    def _run_writes(
        ino: int, buf: memoryview, runs: Sequence[tuple[int, int, int, int]]
    ) -> list[tuple[str, int, memoryview]]:
        """(data file, host offset, ciphertext) of each run encrypted into ``buf``."""
        return [
            (
                fmt.data_name(ino, slot),
                first * BLOCK_SIZE,
                buf[j * BLOCK_SIZE : (j + n) * BLOCK_SIZE],
            )
            for slot, first, j, n in runs
        ]

    def written(self) -> list[str]:
        """The data files written since the last commit: the commit makes them durable."""
        return sorted(self._written)

    def committed(self) -> None:
        """A commit took the block maps: the slots written since are the committed ones."""
        self._written.clear()
        for ino in self._slot_touched:
            node = self._inodes.get(ino)
            if node is not None:
                node.committed_slots = EMPTY
        self._slot_touched.clear()

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
            raise self._corrupt(
                node, block, "authentication failed (tampered, moved or rolled back)"
            ) from None

    def read(self, node: Inode, first: int, last: int) -> bytearray:
        """Plaintext of blocks ``first..last``: buffered, decrypted in runs, or hole zeros."""
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
