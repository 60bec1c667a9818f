"""The committed slot of each rewritten block is noted compactly (a byte per block,
per map chunk: occlumfs/sefs/seal.py) and still never written before the next commit."""

from __future__ import annotations

import os

from occlumfs.sefs.format import BLOCK_SIZE, CHUNK_BLOCKS
from sefs.helpers import ROOT, SimVolume


def _fill(n: int, seed: int) -> bytes:
    return bytes((seed * 7 + i) % 251 for i in range(n))


def test_rewrites_in_place_note_a_byte_per_block_and_keep_the_committed_data() -> None:
    sim = SimVolume()
    blocks = 3 * CHUNK_BLOCKS + 17  # four chunks, the last one partial
    old = _fill(blocks * BLOCK_SIZE, 1)
    fs = sim.open()
    fh, attr = fs.create(1, b"f", 0o644, os.O_RDWR, ROOT)
    fs.write(fh, 0, old)
    fs.fsync(fh, False)
    fs.commit()
    new = bytearray(old)
    # In order (a run), scattered backwards, and a truncate that drops committed blocks.
    fs.write(fh, 0, _fill(CHUNK_BLOCKS * BLOCK_SIZE, 2))
    new[: CHUNK_BLOCKS * BLOCK_SIZE] = _fill(CHUNK_BLOCKS * BLOCK_SIZE, 2)
    for block in range(blocks - 1, CHUNK_BLOCKS, -3):
        piece = _fill(BLOCK_SIZE, block)
        fs.write(fh, block * BLOCK_SIZE, piece)
        new[block * BLOCK_SIZE : (block + 1) * BLOCK_SIZE] = piece
    fs.flush(fh)
    node = fs._nodes[attr.ino]
    noted = node.committed_slots
    assert sorted(noted) == [0, 1, 2, 3]
    assert all(len(marks) == CHUNK_BLOCKS for marks in noted.values())
    assert fs.read(fh, 0, len(new)) == bytes(new)

    _committed_reads_back(sim, attr.ino, old)


def test_a_truncated_block_written_again_avoids_its_committed_slot() -> None:
    sim = SimVolume()
    old = _fill(8 * BLOCK_SIZE, 3)
    fs = sim.open()
    fh, attr = fs.create(1, b"g", 0o644, os.O_RDWR, ROOT)
    fs.write(fh, 0, old)
    fs.fsync(fh, False)
    fs.commit()
    fs.setattr(attr.ino, _size(0), fh)  # drops every block; their slots are noted
    fs.write(fh, 0, _fill(8 * BLOCK_SIZE, 4))
    fs.flush(fh)
    assert fs.read(fh, 0, 8 * BLOCK_SIZE) == _fill(8 * BLOCK_SIZE, 4)
    _committed_reads_back(sim, attr.ino, old)


def _committed_reads_back(sim: SimVolume, ino: int, old: bytes) -> None:
    """The new blocks are in the data files, not committed: a second view of the store
    (the committed root) must read every old block back intact from its slot."""
    view = sim.open(read_only=True)
    fh = view.open(ino, os.O_RDONLY)
    assert view.read(fh, 0, len(old) + 1) == old
    view.release(fh)
    view.close()


def _size(size: int):
    from occlumfs.fs import AttrChanges

    return AttrChanges(size=size)
