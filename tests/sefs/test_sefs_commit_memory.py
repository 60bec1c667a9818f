"""A commit frames a large block map a piece at a time (occlumfs/sefs/pages.py)."""

from __future__ import annotations

import os
import tracemalloc

from occlumfs.sefs.format import BLOCK_SIZE, CHUNK_BLOCKS, ENTRY_SIZE
from sefs.helpers import ROOT


def test_a_commit_of_a_large_block_map_never_holds_it_framed_whole(volume) -> None:
    # The last block of each 1 MiB chunk: each chunk's map record is full-size
    # (~7.4 KiB) while the data stays small.
    chunks = 640
    chunk_bytes = CHUNK_BLOCKS * BLOCK_SIZE
    fs = volume.open()
    fh, _ = fs.create(1, b"sparse", 0o644, os.O_RDWR, ROOT)
    for c in range(chunks):
        fs.write(fh, c * chunk_bytes + chunk_bytes - BLOCK_SIZE, bytes([c % 251 + 1]) * BLOCK_SIZE)
    fs.flush(fh)
    map_bytes = chunks * CHUNK_BLOCKS * ENTRY_SIZE  # 4.5 MiB
    tracemalloc.start()
    try:
        fs.commit()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < map_bytes // 2, f"the commit peaked at {peak} bytes for a {map_bytes}-byte map"
    fs.release(fh)
    fs.close()

    fs = volume.open()
    ino = fs.lookup(1, b"sparse").ino
    fh = fs.open(ino, os.O_RDONLY)
    for c in (0, 1, chunks // 2, chunks - 1):
        start = c * chunk_bytes
        data = fs.read(fh, start, chunk_bytes)
        assert data == bytes(chunk_bytes - BLOCK_SIZE) + bytes([c % 251 + 1]) * BLOCK_SIZE
    fs.release(fh)
    fs.close()
