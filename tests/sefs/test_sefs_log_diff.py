"""Which blocks an fsync's log entry carries: the map entries that changed.

``_changed_blocks`` skips equal halves of a map record before it compares
entries one by one; it must find exactly what an entry-by-entry comparison
finds, in block order, whatever the records' lengths.
"""

from __future__ import annotations

import random

import pytest

from occlumfs.sefs.format import CHUNK_BLOCKS, ENTRY_SIZE
from occlumfs.sefs.journal import _changed_blocks


def _one_by_one(key: bytes, old: bytes, new: bytes) -> list[tuple[int, int, bytes]]:
    ino = int.from_bytes(key[1:9], "big")
    base = int.from_bytes(key[9:17], "big") * CHUNK_BLOCKS
    found = []
    for i in range(len(new) // ENTRY_SIZE):
        entry = new[i * ENTRY_SIZE : (i + 1) * ENTRY_SIZE]
        if entry[0] and entry != old[i * ENTRY_SIZE : (i + 1) * ENTRY_SIZE]:
            found.append((ino, base + i, entry))
    return found


def _record(rng: random.Random, entries: int) -> bytearray:
    out = bytearray(rng.randbytes(entries * ENTRY_SIZE))
    out[0::ENTRY_SIZE] = bytes(rng.choice((0, 1, 2)) for _ in range(entries))
    return out


@pytest.mark.parametrize("changes", [0, 1, 3, 40, 1000])
def test_the_changed_entries_are_those_an_entry_by_entry_comparison_finds(changes) -> None:
    rng = random.Random(changes)
    for _ in range(300):
        old = _record(rng, rng.randrange(CHUNK_BLOCKS + 1))
        entries = rng.randrange(CHUNK_BLOCKS + 1)  # grown, shrunk (a truncate) or the same
        new = bytearray(old[: entries * ENTRY_SIZE].ljust(entries * ENTRY_SIZE, b"\0"))
        for _ in range(changes if entries else 0):
            new[rng.randrange(len(new))] = rng.randrange(256)
        key = (
            b"m" + rng.randrange(1 << 40).to_bytes(8, "big") + rng.randrange(99).to_bytes(8, "big")
        )
        out: list[tuple[int, int, bytes]] = []
        _changed_blocks(key, bytes(old), bytes(new), out)
        assert out == _one_by_one(key, bytes(old), bytes(new))
