"""Opening a SEFS costs what is left to replay, not the log's history.

A commit holds everything the log held, so the log it leaves on the host is
stale (docs/formats/sefs.md, "The log"). An open reads only the header of a
stale log, whatever its size, and a clean close (or the commit a read-write
open makes of what it replayed) removes the stale log, so a store used by a
program that fsyncs all the time opens as fast as a fresh one. The removal is
crash-safe: a power cut at any write of the close leaves the fsync'd state,
and a log the host puts back after the close is ignored (the head holds it).
"""

from __future__ import annotations

import os
import sqlite3

import pytest

from occlumfs.errors import IntegrityError
from occlumfs.sefs import format as fmt
from sefs.crashload import Workload, snapshot
from sefs.helpers import SimVolume, fsck_problems, read_path
from sefs.powerloss import PowerCut
from sefs.test_sefs_hostile import plant
from sefs.test_sefs_log import (
    DATA,
    _log,
    _put_log,
    _refused,
    crash,
    head_counter,
    logged_store,
    open_with_state,
    rewrite,
)


def _log_bytes_read(sim: SimVolume, monkeypatch) -> list[int]:
    """Record how many bytes each read of the log returns from now on."""
    storage, counts = sim.storage, []
    read, preadv = storage.read, storage.preadv

    def counted_read(name):
        data = read(name)
        if name == fmt.LOG_NAME:
            counts.append(len(data))
        return data

    def counted_preadv(name, offset, buffers):
        got = preadv(name, offset, buffers)
        if name == fmt.LOG_NAME:
            counts.append(got)
        return got

    monkeypatch.setattr(storage, "read", counted_read)
    monkeypatch.setattr(storage, "preadv", counted_preadv)
    return counts


@pytest.mark.parametrize("read_only", [True, False])
def test_open_reads_only_the_header_of_a_stale_log(sim, tmp_path, monkeypatch, read_only):
    fs = logged_store(sim, tmp_path / "state", entries=3)
    fs.commit()  # the log is stale now: the head holds all of it
    crash(sim, fs)
    stale = _log(sim) + os.urandom(1 << 20)  # a long history after its header
    _put_log(sim, stale)
    counts = _log_bytes_read(sim, monkeypatch)
    fs = open_with_state(sim, tmp_path / "state", read_only=read_only)
    assert read_path(fs, "/f") == b"version 2" + DATA[9:]
    assert sum(counts) <= fmt.LOG_HEAD_SIZE, f"read {counts} bytes of a stale log"
    fs.close()
    assert sim.storage.exists(fmt.LOG_NAME) == read_only, "a read-write close removes it"


def test_open_still_reads_and_checks_a_live_log(sim, tmp_path, monkeypatch):
    """The header decides only staleness: a log that follows the head is read whole."""
    crash(sim, logged_store(sim, tmp_path / "state", entries=3))
    size = len(_log(sim))
    counts = _log_bytes_read(sim, monkeypatch)
    fs = open_with_state(sim, tmp_path / "state", read_only=True)
    assert read_path(fs, "/f") == b"version 2" + DATA[9:]
    fs.close()
    assert size in counts


def test_clean_close_removes_the_log_and_a_log_put_back_is_ignored(sim, tmp_path):
    fs = logged_store(sim, tmp_path / "state", entries=3)
    live = _log(sim)
    counter = head_counter(sim)
    fs.close()
    assert head_counter(sim) == counter + 1, "the close committed what the log held"
    assert not sim.storage.exists(fmt.LOG_NAME), "the next open has no log to read"
    _put_log(sim, live)  # the host restores it: it names the older head
    fs = open_with_state(sim, tmp_path / "state", read_only=True)
    assert read_path(fs, "/f") == b"version 2" + DATA[9:]
    fs.close()
    assert sim.storage.exists(fmt.LOG_NAME), "a read-only open writes nothing"
    fs = open_with_state(sim, tmp_path / "state")
    fs.close()
    assert not sim.storage.exists(fmt.LOG_NAME), "found stale, removed at close"


def test_replaying_open_removes_the_log_it_committed(sim, tmp_path):
    crash(sim, logged_store(sim, tmp_path / "state", entries=3))
    fs = open_with_state(sim, tmp_path / "state")
    assert not sim.storage.exists(fmt.LOG_NAME)
    assert read_path(fs, "/f") == b"version 2" + DATA[9:]
    fs.close()


def test_a_log_started_after_the_close_is_still_checked(sim, tmp_path):
    """After a close removed the log, the next session's log is as well guarded."""
    logged_store(sim, tmp_path / "state", entries=2).close()
    fs = open_with_state(sim, tmp_path / "state")
    rewrite(fs, b"f", b"later 0")
    rewrite(fs, b"f", b"later 1")
    crash(sim, fs)
    sim.storage.unlink(fmt.LOG_NAME)  # the host drops the new log
    sim.storage.fsync_dir("")
    _refused(sim, tmp_path / "state", "rolled back: the log holds 0 entries")


def test_close_of_a_store_whose_log_is_planted_keeps_refusing_it(volume, tmp_path):
    """The close removes only a log it wrote or read: a planted one stays, and is refused."""
    fs = volume.open()
    fs.commit()
    planted = plant(volume, fmt.LOG_NAME, "symlink", tmp_path)
    fs.close()
    with pytest.raises(IntegrityError, match=fmt.LOG_NAME):
        volume.open(read_only=True)
    assert planted.outside_now() == planted.before


def test_power_cut_at_every_write_of_the_close_keeps_the_fsynced_state():
    def logged() -> tuple[SimVolume, object, Workload]:
        sim = SimVolume()
        fs = sim.open(commit_interval=float("inf"))
        load = Workload(5)
        for _ in range(40):
            load.step(fs)
        load.fsync(fs)  # a commit (the workload's fsync)...
        for _ in range(20):
            load.step(fs)
        fs.sync()  # ...then an fsync that only the log holds
        load.durable = snapshot(fs)
        return sim, fs, load

    probe, fs, _ = logged()
    assert probe.storage.exists(fmt.LOG_NAME)
    start = probe.storage.changes
    fs.close()
    writes = probe.storage.changes - start
    assert writes > 3 and not probe.storage.exists(fmt.LOG_NAME)
    for cut in range(writes):
        sim, fs, load = logged()
        what = f"cut after write {cut} of the close"
        _power_cut_in(sim, cut, fs.close)
        fs = sim.open()
        assert snapshot(fs) == load.durable, what
        fs.close()  # (this one, uncut, removes the log)
        assert not sim.storage.exists(fmt.LOG_NAME), what
        assert fsck_problems(sim.open) == [], what


def _power_cut_in(sim: SimVolume, cut: int, action) -> None:
    """Run ``action`` with the power going out after ``cut`` writes, then lose the cache."""
    sim.storage.cut_power_after(cut)
    with pytest.raises(PowerCut):
        action()
    sim.storage.power_loss()


@pytest.mark.fuse
def test_sqlite_transactions_leave_no_log_after_unmount(volume, mount):
    with mount(*volume.mount_args()) as mnt:
        db = sqlite3.connect(mnt / "db.sqlite", isolation_level=None)
        db.execute("CREATE TABLE t(x)")
        for i in range(50):
            db.execute("INSERT INTO t VALUES (?)", (i,))  # autocommit: fsyncs each time
        db.close()
        assert (volume.dir / fmt.LOG_NAME).stat().st_size > 0, "the fsyncs went to the log"
    assert not (volume.dir / fmt.LOG_NAME).exists()
    with mount(*volume.mount_args()) as mnt:
        db = sqlite3.connect(mnt / "db.sqlite")
        assert db.execute("SELECT count(*), sum(x) FROM t").fetchone() == (50, sum(range(50)))
        db.close()
