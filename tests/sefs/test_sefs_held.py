"""An fsync's blocks wait in memory for the commit (occlumfs.sefs.held): the log entry
is their only durable copy until then, so the host sees no data file for a file that
lives and dies between two commits, and the newest version of a block always wins."""

from __future__ import annotations

import os

import pytest

from occlumfs.fs import ROOT_INO
from occlumfs.sefs import format as fmt
from occlumfs.sefs import held
from occlumfs.sefs.writeback import BATCH_BLOCKS
from sefs.helpers import SimVolume, fsck_problems, read_path, write_file

BIG = bytes(range(256)) * 40  # 10,240 bytes: three blocks, past the inline limit


def _fsync(fs, ino: int) -> None:
    fh = fs.open(ino, os.O_RDWR)
    fs.fsync(fh, False)
    fs.release(fh)


def _data_files(sim: SimVolume) -> set[str]:
    return {name for name in sim.storage.files() if name.startswith("d/")}


@pytest.fixture
def sim() -> SimVolume:
    return SimVolume()


def _reopened_holds(sim: SimVolume, fs, path: str, want: bytes) -> None:
    """Close ``fs``; the store opened again holds ``want`` at ``path`` and is sound."""
    fs.close()
    fs = sim.open()
    assert read_path(fs, path) == want
    fs.close()
    assert fsck_problems(sim.open) == []


def test_fsynced_blocks_reach_their_data_file_only_at_the_commit(sim):
    fs = sim.open(commit_interval=float("inf"))
    ino = write_file(fs, ROOT_INO, b"f", BIG)
    _fsync(fs, ino)
    name = fmt.data_name(ino, fmt.SLOT_A)
    assert _data_files(sim) == set(), "the log holds the fsync'd blocks; no data file yet"
    assert fs._held.held(name) == 3
    assert read_path(fs, "/f") == BIG, "held blocks are read from memory"
    fs.commit()
    assert _data_files(sim) == {name}
    assert fs._held.count == 0
    _reopened_holds(sim, fs, "/f", BIG)


def test_a_power_cut_before_the_commit_replays_held_blocks_from_the_log(sim):
    fs = sim.open(commit_interval=float("inf"))
    write_file(fs, ROOT_INO, b"old", BIG)
    fs.commit()
    ino = write_file(fs, ROOT_INO, b"f", BIG[::-1])
    fh = fs.open(fs.lookup(ROOT_INO, b"old").ino, os.O_RDWR)
    fs.write(fh, 4096, b"rewritten")  # a committed block: its new version is held
    fs.release(fh)
    _fsync(fs, ino)
    assert fs._held.count == 4
    sim.storage.power_loss()
    fs = sim.open()
    assert read_path(fs, "/f") == BIG[::-1]
    assert read_path(fs, "/old") == BIG[:4096] + b"rewritten" + BIG[4096 + 9 :]
    fs.close()
    assert fsck_problems(sim.open) == []


def test_a_file_created_fsynced_and_deleted_between_commits_never_gets_a_data_file(sim):
    fs = sim.open(commit_interval=float("inf"))
    write_file(fs, ROOT_INO, b"db", BIG)
    fs.commit()
    before = _data_files(sim)
    for i in range(5):  # sqlite's rollback journal, once per transaction
        ino = write_file(fs, ROOT_INO, b"db-journal", BIG[i:] + BIG[:i])
        _fsync(fs, ino)
        fs.unlink(ROOT_INO, b"db-journal")
        fs.fsyncdir(fs.opendir(ROOT_INO), False)
    fs.commit()
    assert _data_files(sim) == before
    assert fs._held.count == 0
    fs.close()
    assert fsck_problems(sim.open) == []


def _rewrite(fs, ino: int, offset: int, data: bytes, sync: bool) -> None:
    fh = fs.open(ino, os.O_RDWR)
    fs.write(fh, offset, data)
    if sync:
        fs.fsync(fh, False)  # held
    else:
        fs.flush(fh)  # written to the host, not held
    fs.release(fh)


def test_a_later_write_through_replaces_the_held_block(sim):
    """A block held by one fsync and then written to the same slot on the host by a
    flush (close): the commit must not put the older held version back over it.
    (Until the next commit a block is rewritten in the slot it did not have at the
    last one: B for a committed block of slot A.)"""
    fs = sim.open(commit_interval=float("inf"))
    ino = write_file(fs, ROOT_INO, b"f", BIG)
    fs.commit()
    name = fmt.data_name(ino, fmt.SLOT_B)
    _rewrite(fs, ino, 0, b"held" * 2048, sync=True)
    assert fs._held.held(name) == 2
    _rewrite(fs, ino, 0, b"newest" * 500, sync=False)
    assert fs._held.held(name) == 1, "block 0 went to slot B on the host: no longer held"
    fs.close()
    fs = sim.open()
    assert read_path(fs, "/f") == b"newest" * 500 + (b"held" * 2048)[3000:] + BIG[8192:]
    fs.close()
    assert fsck_problems(sim.open) == []


def test_a_write_behind_batch_replaces_held_blocks(sim):
    fs = sim.open(commit_interval=float("inf"))
    ino = write_file(fs, ROOT_INO, b"f", BIG)
    fs.commit()
    _rewrite(fs, ino, 0, BIG[::-1], sync=True)
    assert fs._held.count == 3
    long = os.urandom((BATCH_BLOCKS + 8) * 4096)
    fh = fs.open(ino, os.O_RDWR)
    fs.write(fh, 0, long)  # a batch of blocks in order: sealed and written behind (slot B)
    fs.flush(fh)
    fs.release(fh)
    assert fs._held.count == 0
    _reopened_holds(sim, fs, "/f", long)


def test_past_the_budget_blocks_go_to_the_host_as_before(sim, monkeypatch):
    monkeypatch.setattr(held, "HELD_MAX_BLOCKS", 4)
    fs = sim.open(commit_interval=float("inf"))
    a = write_file(fs, ROOT_INO, b"a", BIG)
    write_file(fs, ROOT_INO, b"b", BIG[::-1])
    _fsync(fs, a)
    assert fs._held.count == 3, "one file's blocks fit the budget, the other's go to the host"
    assert len(_data_files(sim)) == 1
    sim.storage.power_loss()
    fs = sim.open()
    assert read_path(fs, "/a") == BIG and read_path(fs, "/b") == BIG[::-1]
    fs.close()


def test_a_failed_write_out_keeps_the_blocks_held_for_the_next_commit(sim):
    fs = sim.open(commit_interval=float("inf"))
    ino = write_file(fs, ROOT_INO, b"f", BIG)
    _fsync(fs, ino)
    real = sim.storage.pwritev

    def full(name, offset, buffers):
        if name.startswith("d/"):
            raise OSError(28, "No space left on device")
        real(name, offset, buffers)

    sim.storage.pwritev = full
    with pytest.raises(OSError):
        fs.commit()
    assert fs._held.count == 3
    sim.storage.pwritev = real
    _reopened_holds(sim, fs, "/f", BIG)


def test_a_read_across_held_and_stored_blocks(sim):
    fs = sim.open(commit_interval=float("inf"))
    data = os.urandom(8 * 4096)
    ino = write_file(fs, ROOT_INO, b"f", data)
    fs.commit()
    fh = fs.open(ino, os.O_RDWR)
    fs.write(fh, 2 * 4096, b"x" * 4096)
    fs.write(fh, 9 * 4096, b"y" * 10)  # past the end: block 8 is a hole
    fs.fsync(fh, False)
    want = data[: 2 * 4096] + b"x" * 4096 + data[3 * 4096 :] + bytes(4096) + b"y" * 10
    assert fs.read(fh, 0, len(want) + 1) == want
    at = 2 * 4096 + 100
    assert fs.read(fh, at, 5000) == want[at : at + 5000]
    fs.release(fh)
    assert fs._held.count == 2
    _reopened_holds(sim, fs, "/f", want)


def test_deleting_another_file_leaves_held_blocks_alone(sim):
    """A commit that discards a deleted file's data files keeps the held blocks of others."""
    fs = sim.open(commit_interval=float("inf"))
    write_file(fs, ROOT_INO, b"gone", BIG)
    fs.commit()
    ino = write_file(fs, ROOT_INO, b"kept", BIG[::-1])
    _fsync(fs, ino)
    fs.unlink(ROOT_INO, b"gone")
    fs.commit()
    fs.close()
    fs = sim.open()
    assert read_path(fs, "/kept") == BIG[::-1]
    assert fmt.data_name(ino, fmt.SLOT_A) in _data_files(sim)
    fs.close()


def test_a_deleted_files_held_blocks_are_dropped_at_once(sim):
    fs = sim.open(commit_interval=float("inf"))
    ino = write_file(fs, ROOT_INO, b"journal", BIG)
    _fsync(fs, ino)
    assert fs._held.count == 3
    fs.unlink(ROOT_INO, b"journal")
    assert fs._held.count == 0, "the budget is not spent on files that are gone"
    fs.close()


def test_deleting_a_file_that_never_reached_the_host_unlinks_nothing(sim):
    fs = sim.open(commit_interval=float("inf"))
    old = write_file(fs, ROOT_INO, b"old", BIG)
    fs.commit()
    for name, data in ((b"inline", b"small"), (b"held", BIG)):
        ino = write_file(fs, ROOT_INO, name, data)
        _fsync(fs, ino)
        fs.unlink(ROOT_INO, name)
    discarded = []
    real = sim.storage.discard
    sim.storage.discard = lambda names: (discarded.extend(names), real(names))
    fs.unlink(ROOT_INO, b"old")  # committed: its data files go
    fs.commit()
    gone = [name for name in discarded if name.startswith("d/")]
    assert gone == [fmt.data_name(old, fmt.SLOT_A), fmt.data_name(old, fmt.SLOT_B)]
    assert _data_files(sim) == set()
    fs.close()
