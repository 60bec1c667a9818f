"""Write-behind keeps the SEFS write buffer small and loses nothing.

Blocks are sealed a batch at a time as they arrive and written by a thread while
requests go on: the plaintext held stays a few batches whatever the size of the
write (in process and in a real server, measured from /proc), a failed write-out
reaches a later write or the flush and its blocks are written by the next one,
and reads, overwrites and truncation in between see the newest bytes. A large
commit writes its metadata pack a piece at a time.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from occlumfs.errors import IntegrityError
from occlumfs.fs import ROOT_INO
from occlumfs.mount import mount_record
from occlumfs.sefs import pages
from occlumfs.sefs.blocks import BlockIO
from occlumfs.sefs.format import BLOCK_SIZE
from occlumfs.sefs.inode import Inode
from occlumfs.sefs.writeback import BATCH_BLOCKS, BATCHES
from sefs.helpers import ROOT, fsck_problems, read_path, write_file
from sefs.powerloss import PowerCut, PowerLossStorage
from sefs.test_sefs_dataio import WriterNames

MiB = 1 << 20
# Unsealed blocks (under a batch, plus one 1 MiB request) and the batches out.
HELD_AT_MOST = BATCH_BLOCKS + MiB // BLOCK_SIZE + BATCHES * BATCH_BLOCKS


def _blockio(storage: PowerLossStorage) -> tuple[BlockIO, Inode]:
    storage.mkdir("d")
    inodes: dict[int, Inode] = {}
    io = BlockIO(storage, AESGCM(os.urandom(32)), os.urandom(16), inodes, set(), str)
    io.measure()  # a writable store: writes are written behind as they come
    node = inodes[5] = Inode(5, stat.S_IFREG | 0o644)
    return io, node


def _write(io: BlockIO, node: Inode, offset: int, data: bytes) -> None:
    io.write(node, offset, data)
    node.size = max(node.size, offset + len(data))


def test_a_long_write_is_written_behind_with_a_bounded_buffer() -> None:
    storage = WriterNames()
    io, node = _blockio(storage)
    data = os.urandom(40 * MiB)
    for at in range(0, len(data), MiB):
        _write(io, node, at, data[at : at + MiB])
        assert io.buffered <= HELD_AT_MOST
    assert storage.writers == {"sefs-writer"}  # written while the writes came in
    assert storage.changes >= (40 * MiB // BLOCK_SIZE - HELD_AT_MOST) // BATCH_BLOCKS
    io.flush(node)
    assert io.buffered == 0
    assert "sefs-writer" not in {t.name for t in threading.enumerate()}
    assert io.read(node, 0, len(data) // BLOCK_SIZE - 1) == data


def test_reads_overwrites_and_truncation_see_the_newest_bytes() -> None:
    io, node = _blockio(PowerLossStorage())
    data = bytearray(os.urandom(6 * MiB))
    for at in range(0, len(data), MiB):
        _write(io, node, at, bytes(data[at : at + MiB]))
    # Overwrite blocks that are being written behind; read across both.
    patch = os.urandom(MiB + 3 * BLOCK_SIZE)
    _write(io, node, 4 * MiB - BLOCK_SIZE, patch)
    data[4 * MiB - BLOCK_SIZE : 4 * MiB - BLOCK_SIZE + len(patch)] = patch
    assert io.read(node, 0, len(data) // BLOCK_SIZE - 1) == data
    for at in range(0, 2 * MiB, MiB):
        _write(io, node, at, bytes(data[at : at + MiB]))
    odd = os.urandom(3 * BLOCK_SIZE + 7)  # not whole blocks, over blocks being written
    _write(io, node, MiB - 5, odd)
    data[MiB - 5 : MiB - 5 + len(odd)] = odd
    assert io.read(node, 0, len(data) // BLOCK_SIZE - 1) == data
    for at in range(0, 2 * MiB, MiB):
        _write(io, node, at, bytes(data[at : at + MiB]))
    io.truncate(node, 3 * MiB + 100)
    del data[3 * MiB + 100 :]
    io.flush(node)
    assert io.read(node, 0, 3 * MiB // BLOCK_SIZE)[: len(data)] == data
    assert io.read(node, 3 * MiB // BLOCK_SIZE, 3 * MiB // BLOCK_SIZE)[101:] == bytes(
        BLOCK_SIZE - 101
    )


def test_a_failed_write_behind_reaches_a_later_write_and_loses_nothing() -> None:
    storage = PowerLossStorage()
    io, node = _blockio(storage)
    data = os.urandom(24 * MiB)
    storage.cut_power_after(3)
    accepted = 0
    with pytest.raises(PowerCut):
        while accepted < len(data):
            _write(io, node, accepted, data[accepted : accepted + MiB])
            accepted += MiB
        io.flush(node)  # at the latest
    assert accepted < len(data)  # a write was refused: the error did not wait for a commit
    assert storage.changes == 3
    storage.cut_power_after(None)
    io.flush(node)  # every accepted byte is still there to be written
    assert io.buffered == 0
    assert io.read(node, 0, accepted // BLOCK_SIZE - 1) == data[:accepted]


def _vm(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


@pytest.mark.fuse
def test_a_large_write_through_a_mount_keeps_the_server_memory_bounded(volume, mount) -> None:
    size = 160 * MiB  # five times the 32 MiB buffered before write-behind
    chunk = os.urandom(MiB)
    digest = hashlib.sha256()
    with mount(*volume.mount_args()) as mnt:
        (mnt / "warm").write_bytes(b"x")
        pid = int(mount_record(mnt)["pid"])
        start = _vm(pid, "VmRSS")
        with open(mnt / "big", "wb", buffering=0) as f:
            for i in range(size // MiB):
                piece = chunk[i:] + chunk[:i]
                f.write(piece)
                digest.update(piece)
        grown = _vm(pid, "VmHWM") - start
        # Before write-behind the server held 32 MiB of plaintext and 32 MiB of ciphertext.
        assert grown < 32 * MiB, f"the server grew by {grown >> 20} MiB"
    with mount(*volume.mount_args()) as mnt:
        got = hashlib.sha256()
        with open(mnt / "big", "rb", buffering=0) as f:
            for piece in iter(lambda: f.read(MiB), b""):
                got.update(piece)
        assert got.digest() == digest.digest()


def test_a_large_commit_writes_its_pack_a_piece_at_a_time(sim, monkeypatch) -> None:
    """The pack of a large commit goes out in pieces (not held whole), and reads back."""
    monkeypatch.setattr(pages, "PACK_OUT", 8 << 10)
    fs = sim.open()
    files = {f"f{i}".encode(): os.urandom(100 + 5000 * i) for i in range(8)}
    for name, data in files.items():
        write_file(fs, ROOT_INO, name, data)
    # The last block of each MiB: a full map record (7.4 KB) per 4 KiB of data.
    sparse = bytearray(64 * MiB)
    fh, _ = fs.create(ROOT_INO, b"sparse", 0o644, os.O_WRONLY, ROOT)
    for at in range(MiB - BLOCK_SIZE, len(sparse), MiB):
        block = os.urandom(BLOCK_SIZE)
        fs.write(fh, at, block)
        sparse[at : at + BLOCK_SIZE] = block
    fs.release(fh)
    files[b"sparse"] = bytes(sparse)
    writes: list[tuple[str, int]] = []
    pwritev, write_whole = sim.storage.pwritev, sim.storage.write_file
    monkeypatch.setattr(
        sim.storage, "pwritev", lambda n, o, b: (writes.append((n, o)), pwritev(n, o, b))[1]
    )
    monkeypatch.setattr(
        sim.storage, "write_file", lambda n, d: (writes.append((n, 0)), write_whole(n, d))[1]
    )
    fs.commit()
    packs = [(name, at) for name, at in writes if name.startswith("m/")]
    assert len(packs) >= 4  # pieces of about 8 KiB, one after the other, then the root
    assert [at for _, at in packs] == sorted({at for _, at in packs})
    assert len({name for name, _ in packs}) == 1
    fs.close()
    fs = sim.open()
    for name, data in files.items():
        assert read_path(fs, name.decode()) == data
    fs.close()
    assert fsck_problems(sim.open) == []


@pytest.mark.parametrize("bad", [0, 37, 255, 256, 299])
def test_a_bulk_read_names_the_block_that_fails_authentication(bad) -> None:
    storage = PowerLossStorage()
    io, node = _blockio(storage)
    data = os.urandom(300 * BLOCK_SIZE)  # two map chunks
    _write(io, node, 0, data)
    io.flush(node)
    stored = storage.read("d/0000000000000005")
    flipped = bytearray(stored)
    flipped[bad * BLOCK_SIZE + 100] ^= 1
    storage.write_file("d/0000000000000005", bytes(flipped))
    with pytest.raises(IntegrityError, match=f"block {bad} \\(offset {bad * BLOCK_SIZE}\\)"):
        io.read(node, 0, 299)
    assert io.read(node, bad + 1, 299) == data[(bad + 1) * BLOCK_SIZE :]


def test_close_reports_a_failed_write_behind_of_its_file(sim) -> None:
    """The flush at close waits for the blocks being written behind, and tells."""
    fs = sim.open()
    fh, _ = fs.create(ROOT_INO, b"f", 0o644, os.O_WRONLY, ROOT)
    data = os.urandom(MiB)  # a whole batch: sealed and handed over by the write itself
    sim.storage.cut_power_after(0)
    fs.write(fh, 0, data)
    with pytest.raises(PowerCut):
        fs.flush(fh)
    sim.storage.cut_power_after(None)
    fs.flush(fh)  # the blocks were buffered again: written now
    fs.fsync(fh, False)
    fs.release(fh)
    fs.close()
    fs = sim.open()
    assert read_path(fs, "f") == data
    fs.close()


def test_scattered_writes_wait_for_more_before_they_are_written_behind() -> None:
    storage = PowerLossStorage()
    io, node = _blockio(storage)
    blocks = list(range(0, 4 * BATCH_BLOCKS, 2))[::-1]  # every other block, backwards
    for block in blocks:
        _write(io, node, block * BLOCK_SIZE, os.urandom(BLOCK_SIZE))
    assert storage.changes == 0 and io.buffered == len(blocks)  # a pwrite each: not yet
    other = Inode(6, stat.S_IFREG | 0o644)
    io._inodes[6] = other
    data = os.urandom(BATCH_BLOCKS * BLOCK_SIZE)
    _write(io, other, 0, data)  # in order: written behind at once
    assert io.read(other, 0, BATCH_BLOCKS - 1) == data  # (a read waits for it)
    assert storage.changes == 1 and io.buffered == len(blocks)
    io.flush(node)
    assert io.buffered == 0
