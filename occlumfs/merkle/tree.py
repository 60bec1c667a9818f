"""Hashing of blocks and Merkle tree levels (SHA-256, 4 KiB blocks, level 0 first)."""

from __future__ import annotations

from hashlib import sha256

from occlumfs.merkle.format import BLOCK_SIZE, HASH_SIZE, TreeGeometry


def hash_blocks(buf: bytes | bytearray | memoryview) -> bytes:
    """The concatenated SHA-256 of each 4 KiB block of ``buf`` (a multiple of 4 KiB)."""
    mv = memoryview(buf)
    return b"".join(
        [sha256(mv[o : o + BLOCK_SIZE]).digest() for o in range(0, len(mv), BLOCK_SIZE)]
    )


def first_mismatch(got: bytes, want: bytes) -> int | None:
    """Index of the first hash that differs between two runs of hashes (None: equal).

    ``got`` and ``want`` are concatenated 32-byte hashes of the same length.
    """
    if got == want:
        return None
    for i, at in enumerate(range(0, len(got), HASH_SIZE)):
        if got[at : at + HASH_SIZE] != want[at : at + HASH_SIZE]:
            return i
    return len(got) // HASH_SIZE  # want is longer: its next hash is missing


def pad_block(data: bytes) -> bytes:
    rest = -len(data) % BLOCK_SIZE
    return data + bytes(rest) if rest else data


def build_levels(
    leaf_hashes: bytes | bytearray, geometry: TreeGeometry
) -> tuple[list[bytes | bytearray], bytes]:
    """All tree levels (each padded to whole blocks) and the root hash.

    ``leaf_hashes`` may come padded with zeros to whole blocks already (then it
    is level 0 itself, not a copy)."""
    assert len(leaf_hashes) in (geometry.leaves * HASH_SIZE, geometry.counts[0] * BLOCK_SIZE)
    levels = []
    current = pad_block(leaf_hashes)
    for count in geometry.counts:
        assert len(current) == count * BLOCK_SIZE
        levels.append(current)
        if count == 1:
            break
        current = pad_block(hash_blocks(current))
    return levels, sha256(levels[-1]).digest()
