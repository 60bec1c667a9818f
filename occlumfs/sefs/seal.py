"""Sealing a batch of SEFS data blocks: encryption and new block-map entries, in bulk.

A batch is up to a few hundred blocks of one inode (occlumfs.sefs.writeback).
Each block is encrypted on its own (AES-256-GCM: its own nonce, its tag in the
map entry, the AD naming the filesystem, inode and block; docs/formats/sefs.md).
What Python does per batch, not per block: the slices fed to the cipher are
made and the cipher called by ``map`` (C), the ADs and the map entries are
assembled column by column with extended slices, and a run of consecutive
blocks gets its entries (and its committed slots noted) in one step. Blocks
that are not consecutive (random writes) take a per-block path for the map.
"""

from __future__ import annotations

import array
import operator
import os
import sys
from collections import deque
from collections.abc import Iterator
from itertools import repeat

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

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

STRIDE = BLOCK_SIZE + fmt.TAG_SIZE  # a ciphertext block and its tag, as AES-GCM writes them
_FEW = 4  # up to this many blocks are sealed one by one (the column work costs ~14 us)

# A block's new slot from its committed one: a hole or B -> A, A -> B.
_OTHER_SLOT = bytes.maketrans(bytes((SLOT_HOLE, SLOT_A, SLOT_B)), bytes((SLOT_A, SLOT_B, SLOT_A)))


def pieces(view: memoryview, step: int, size: int, n: int) -> Iterator[memoryview]:
    """``view[j * step : j * step + size]`` for j < n, sliced in C (no Python per piece)."""
    end = n * step
    return map(
        operator.getitem,
        repeat(view),
        map(slice, range(0, end, step), range(size, end + size, step)),
    )


def _entries_of(chunks: dict[int, bytearray], first: int, n: int) -> bytearray:
    """The map entries of blocks ``first..first+n-1`` (zeros: a hole)."""
    out = bytearray()
    block = first
    end = first + n
    while block < end:
        chunk_no = block >> CHUNK_SHIFT
        stop = min(end, (chunk_no + 1) << CHUNK_SHIFT)
        at = (block & CHUNK_MASK) * ENTRY_SIZE
        want = (stop - block) * ENTRY_SIZE
        out += chunks.get(chunk_no, b"")[at : at + want].ljust(want, b"\0")
        block = stop
    return out


def _ads(prefix: bytes, ino: int, blocks: list[int] | range) -> tuple[bytearray, int]:
    """The ADs of ``blocks`` of ``ino``, one after the other, and the size of one."""
    n = len(blocks)
    ads = bytearray((prefix + ino.to_bytes(8, "big") + bytes(8)) * n)
    numbers = array.array("Q", blocks)
    if sys.byteorder == "little":
        numbers.byteswap()
    numbers_be = numbers.tobytes()
    ad_size = len(ads) // n
    for k in range(8):
        ads[ad_size - 8 + k :: ad_size] = numbers_be[k::8]
    return ads, ad_size


def seal(
    cipher: AESGCM, prefix: bytes, node: Inode, plain: dict, blocks: list[int], buf: bytearray
) -> list[tuple[str, int, list[memoryview]]]:
    """Encrypt ``blocks`` (sorted; their plaintext in ``plain``) into ``buf``, 4112
    bytes apart (ciphertext, then tag), give each a new map entry in the slot its
    committed one is not, and return the writes: (data file, offset, pieces).

    No Python code runs per block on a run of consecutive blocks, nor in the
    encryption: slices are made and the cipher called by ``map`` (C).
    """
    n = len(blocks)
    ino = node.ino
    first = blocks[0]
    contiguous = blocks[-1] - first == n - 1
    if node.chunks is EMPTY:
        node.chunks = {}
    if node.committed_slots is EMPTY:
        node.committed_slots = {}
    committed = node.committed_slots
    if contiguous and _none_noted(committed, first, n):
        was = bytes(_entries_of(node.chunks, first, n)[0::ENTRY_SIZE])
        if was.count(0) != n:  # the first touch of committed blocks: remember their slots
            _note_run(committed, first, was)
        old = was
        node.present += was.count(0)
    else:
        old = _committed_slots(node, blocks)
    slots = old.translate(_OTHER_SLOT)
    nonces = os.urandom(NONCE_SIZE * n)
    out = memoryview(buf)
    if n <= _FEW:  # an fsync'd page or two, a small file: block by block is cheaper
        return _seal_few(cipher, prefix, node, plain, blocks, slots, nonces, out)
    ads, ad_size = _ads(prefix, ino, blocks)
    deque(
        map(
            cipher.encrypt_into,
            pieces(memoryview(nonces), NONCE_SIZE, NONCE_SIZE, n),
            map(plain.__getitem__, blocks),
            pieces(memoryview(ads), ad_size, ad_size, n),
            pieces(out, STRIDE, STRIDE, n),
        ),
        maxlen=0,
    )
    entries = bytearray(ENTRY_SIZE * n)
    entries[0::ENTRY_SIZE] = slots
    for k in range(NONCE_SIZE):
        entries[ENTRY_NONCE + k :: ENTRY_SIZE] = nonces[k::NONCE_SIZE]
    for k in range(fmt.TAG_SIZE):
        entries[ENTRY_TAG + k :: ENTRY_SIZE] = buf[BLOCK_SIZE + k : n * STRIDE : STRIDE]
    ciphertexts = list(pieces(out, STRIDE, BLOCK_SIZE, n))
    if contiguous:
        _set_entries(node, first, n, entries, 0)
    else:
        for j, block in enumerate(blocks):
            _set_entries(node, block, 1, entries, j)
    # The writes: runs of consecutive blocks in one slot.
    if contiguous and slots.count(slots[0]) == n:
        runs = [(slots[0], 0, n)]
    else:
        runs = []
        j = 0
        while j < n:
            k = j + 1
            while k < n and blocks[k] == blocks[k - 1] + 1 and slots[k] == slots[j]:
                k += 1
            runs.append((slots[j], j, k - j))
            j = k
    writes = []
    for slot, j, count in runs:
        name = fmt.data_name(ino, slot)
        writes.append((name, blocks[j] * BLOCK_SIZE, ciphertexts[j : j + count]))
    return writes


def _seal_few(
    cipher: AESGCM,
    prefix: bytes,
    node: Inode,
    plain: dict,
    blocks: list[int],
    slots: bytes,
    nonces: bytes,
    out: memoryview,
) -> list[tuple[str, int, list[memoryview]]]:
    """:func:`seal` of a few blocks (slots chosen, nonces drawn), one at a time."""
    ino = node.ino
    head = prefix + ino.to_bytes(8, "big")
    writes: list[tuple[str, int, list[memoryview]]] = []
    prev = -2
    for j, block in enumerate(blocks):
        nonce = nonces[j * NONCE_SIZE : (j + 1) * NONCE_SIZE]
        sealed = out[j * STRIDE : (j + 1) * STRIDE]
        cipher.encrypt_into(nonce, plain[block], head + block.to_bytes(8, "big"), sealed)
        entry = bytearray(ENTRY_SIZE)
        entry[0] = slots[j]
        entry[ENTRY_NONCE:ENTRY_TAG] = nonce
        entry[ENTRY_TAG:] = sealed[BLOCK_SIZE:]
        _set_entries(node, block, 1, entry, 0)
        name = fmt.data_name(ino, slots[j])
        if block == prev + 1 and writes[-1][0] == name:
            writes[-1][2].append(sealed[:BLOCK_SIZE])
        else:
            writes.append((name, block * BLOCK_SIZE, [sealed[:BLOCK_SIZE]]))
        prev = block
    return writes


def _committed_slots(node: Inode, blocks: list[int]) -> bytes:
    """The slot each of ``blocks`` had at the last commit (noted on first touch)."""
    committed = node.committed_slots
    out = bytearray(len(blocks))
    present = 0
    for j, block in enumerate(blocks):
        was = node.slot(block)
        marks = committed.get(block >> CHUNK_SHIFT)
        if was:
            if marks is None:
                marks = committed[block >> CHUNK_SHIFT] = bytearray(CHUNK_BLOCKS)
            at = block & CHUNK_MASK
            if not marks[at]:
                marks[at] = was
            out[j] = marks[at]
        else:  # a hole now; one at the last commit too unless truncated since
            out[j] = marks[block & CHUNK_MASK] if marks is not None else SLOT_HOLE
            present += 1
    node.present += present
    return bytes(out)


def note_committed_slot(node: Inode, block: int, slot: int) -> None:
    """Remember ``slot`` as ``block``'s slot at the last commit, unless one is noted:
    the block is about to lose it (truncate), so its next write must avoid it."""
    if node.committed_slots is EMPTY:
        node.committed_slots = {}
    marks = node.committed_slots.get(block >> CHUNK_SHIFT)
    if marks is None:
        marks = node.committed_slots[block >> CHUNK_SHIFT] = bytearray(CHUNK_BLOCKS)
    if not marks[block & CHUNK_MASK]:
        marks[block & CHUNK_MASK] = slot


def _none_noted(committed: dict[int, bytearray], first: int, n: int) -> bool:
    """Whether no block of ``first..first+n-1`` has its committed slot noted."""
    block, end = first, first + n
    while block < end:
        stop = min(end, ((block >> CHUNK_SHIFT) + 1) << CHUNK_SHIFT)
        marks = committed.get(block >> CHUNK_SHIFT)
        at = block & CHUNK_MASK
        if marks is not None and marks.count(0, at, at + stop - block) != stop - block:
            return False
        block = stop
    return True


def _note_run(committed: dict[int, bytearray], first: int, was: bytes) -> None:
    """Note ``was`` as the committed slots of ``first..`` (none noted yet; 0: a hole)."""
    block, end = first, first + len(was)
    while block < end:
        stop = min(end, ((block >> CHUNK_SHIFT) + 1) << CHUNK_SHIFT)
        marks = committed.get(block >> CHUNK_SHIFT)
        if marks is None:
            marks = committed[block >> CHUNK_SHIFT] = bytearray(CHUNK_BLOCKS)
        at = block & CHUNK_MASK
        marks[at : at + stop - block] = was[block - first : stop - first]
        block = stop


def _set_entries(node: Inode, first: int, n: int, entries: bytearray, j: int) -> None:
    """Blocks ``first..first+n-1`` get ``entries[j:j+n]`` (entries) as their map entries."""
    chunks = node.chunks
    block = first
    end = first + n
    while block < end:
        chunk_no = block >> CHUNK_SHIFT
        stop = min(end, (chunk_no + 1) << CHUNK_SHIFT)
        chunk = chunks.get(chunk_no)
        if chunk is None:
            chunk = chunks[chunk_no] = bytearray()
        at = (block & CHUNK_MASK) * ENTRY_SIZE
        need = at + (stop - block) * ENTRY_SIZE
        if len(chunk) < need:
            chunk.extend(bytes(need - len(chunk)))
        src = (j + block - first) * ENTRY_SIZE
        chunk[at:need] = entries[src : src + need - at]
        block = stop
