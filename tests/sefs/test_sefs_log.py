"""The write-ahead log of SEFS format version 3 (docs/formats/sefs.md, "The log").

An fsync appends one sealed entry to ``DIR/log`` with one host barrier; a
mount replays the entries that follow the head. Power is cut at every single
write of a workload (tests/sefs/powerloss.py): what an fsync returned for
survives, and the tree is never inconsistent. The host's edits of the log
(truncation, flips, swapped or spliced entries, an older log, another
store's log) are refused or, where only the tail could be a crash's leftover,
caught by the trusted state. Entries planted at the log's names are refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from occlumfs.errors import IntegrityError
from occlumfs.fs import ROOT_INO, AttrChanges
from occlumfs.sefs import SefsFS, journal
from occlumfs.sefs import format as fmt
from occlumfs.sefs.keys import Keys, parse_config, unwrap_master
from occlumfs.sefs.state import TrustedState
from sefs.crashload import Workload, run_until_power_cut, snapshot
from sefs.helpers import ROOT, SimVolume, fsck_problems, read_path, write_file
from sefs.powerloss import PowerCut
from sefs.test_sefs_hostile import plant

DATA = bytes(range(256)) * 24  # 6144 bytes: two blocks


def _keys(sim: SimVolume) -> Keys:
    config = parse_config(sim.storage.read(fmt.CONFIG_NAME), "sim")
    return Keys(unwrap_master(config, sim.cred, "sim"), bytes.fromhex(config["fs_id"]))


def open_with_state(sim: SimVolume, state_dir: Path, **kwargs) -> SefsFS:
    keys = _keys(sim)
    state_dir.mkdir(exist_ok=True)
    state = TrustedState(state_dir, keys.fs_id, keys.state_mac)
    return SefsFS(sim.storage, keys, trusted_state=state, commit_interval=float("inf"), **kwargs)


def head_counter(sim: SimVolume) -> int:
    return fmt.unpack_head(sim.storage.read(fmt.HEAD_NAME)).counter


def rewrite(fs: SefsFS, name: bytes, data: bytes) -> None:
    """Write ``data`` over the start of existing file ``name`` and fsync it."""
    ino = fs.lookup(ROOT_INO, name).ino
    fh = fs.open(ino, os.O_WRONLY)
    fs.write(fh, 0, data)
    fs.fsync(fh, False)
    fs.release(fh)


def crash(sim: SimVolume, fs: SefsFS) -> None:
    """Power off: whatever was not made durable is gone; ``fs`` is abandoned."""
    fs._state_writer.drain()  # the trusted state has what this machine logged
    sim.storage.power_loss()


def logged_store(sim: SimVolume, state_dir: Path, entries: int = 3) -> SefsFS:
    """A store whose last ``entries`` fsyncs are only in the log (not committed)."""
    fs = open_with_state(sim, state_dir)
    write_file(fs, ROOT_INO, b"f", DATA)
    fs.commit()
    for i in range(entries):
        rewrite(fs, b"f", f"version {i}".encode())
    return fs


# -- what an fsync does ----------------------------------------------------------------------
def test_fsync_appends_one_entry_with_one_barrier_and_no_commit(sim):
    fs = sim.open(commit_interval=float("inf"))
    write_file(fs, ROOT_INO, b"f", DATA)
    counter = head_counter(sim)
    rewrite(fs, b"f", b"first")  # a new log: written aside, fsync'd, renamed
    before = sim.storage.fsyncs
    rewrite(fs, b"f", b"second")
    assert sim.storage.fsyncs - before == 1, "an appended fsync costs one host barrier"
    assert head_counter(sim) == counter, "an fsync that fits the log does not commit"
    log = sim.storage.read(fmt.LOG_NAME)
    assert fmt.parse_log_head(log)[1:] == (counter, fs._pages.root_tag)
    for secret in (b"first", b"second", DATA[:64]):
        assert secret not in log, "the log is sealed"
    sim.storage.power_loss()
    fs = sim.open()
    assert read_path(fs, "/f") == b"second" + DATA[6:]
    assert head_counter(sim) == counter + 1, "a read-write mount commits what it replayed"
    fs.close()


def test_a_large_fsync_commits_instead(sim, monkeypatch):
    monkeypatch.setattr(journal, "ENTRY_MAX_BLOCKS", 1)
    fs = sim.open(commit_interval=float("inf"))
    write_file(fs, ROOT_INO, b"f", DATA)
    counter = head_counter(sim)
    rewrite(fs, b"f", DATA[::-1])  # two blocks: more than an entry may hold
    assert head_counter(sim) == counter + 1
    fs.close()


def test_read_only_open_replays_in_memory_and_writes_nothing(sim, tmp_path):
    fs = logged_store(sim, tmp_path / "state")
    crash(sim, fs)
    before = sim.storage.files()
    fs = open_with_state(sim, tmp_path / "state", read_only=True)
    assert read_path(fs, "/f") == b"version 2" + DATA[9:]
    fs.close()
    assert sim.storage.files() == before
    assert fsck_problems(lambda **kw: open_with_state(sim, tmp_path / "state", **kw)) == []


def test_replayed_changes_cover_names_links_and_truncation(sim):
    fs = sim.open(commit_interval=float("inf"))
    write_file(fs, ROOT_INO, b"gone", DATA)
    write_file(fs, ROOT_INO, b"short", DATA)
    fs.commit()
    d = fs.mkdir(ROOT_INO, b"dir", 0o700, ROOT)
    write_file(fs, d.ino, b"new", b"new data")
    fs.symlink(d.ino, b"link", b"../short", ROOT)
    fs.rename(ROOT_INO, b"gone", d.ino, b"moved")
    fs.unlink(d.ino, b"moved")
    fs.setattr(fs.lookup(ROOT_INO, b"short").ino, _size(10))
    fs.fsyncdir(fs.opendir(ROOT_INO), False)
    want = snapshot(fs)
    sim.storage.power_loss()
    fs = sim.open()
    assert snapshot(fs) == want
    assert want["short"] == DATA[:10] and want["dir/link"] == ("link", b"../short")
    fs.close()
    assert fsck_problems(sim.open) == []


def _size(size: int) -> AttrChanges:
    return AttrChanges(size=size)


# -- power cuts at every write ----------------------------------------------------------------
def _workload(sim: SimVolume, cut_after: int | None, steps: int) -> Workload:
    return run_until_power_cut(sim, 7, cut_after, steps=steps)


# An fsync's blocks wait in memory for the commit (occlumfs.sefs.held): with one log,
# 150 steps make too few host writes to place enough cuts; twice as many do.
_STEPS = {"one log": 300, "checkpoints": 150}


@pytest.mark.parametrize("log_max", [journal.LOG_MAX, 48 * 1024], ids=["one log", "checkpoints"])
def test_power_cut_at_every_write_keeps_exactly_the_fsynced_state(monkeypatch, log_max):
    monkeypatch.setattr(journal, "LOG_MAX", log_max)
    steps = _STEPS["one log" if log_max == journal.LOG_MAX else "checkpoints"]
    probe = SimVolume()
    start = probe.storage.changes
    _workload(probe, None, steps)
    writes = probe.storage.changes - start
    assert writes > 50
    for cut in range(writes + 1):
        sim = SimVolume()
        load = _workload(sim, cut, steps)
        fs = sim.open()
        got = snapshot(fs)
        allowed = [load.durable] + ([load.in_flight] if load.in_flight is not None else [])
        assert got in allowed, f"cut after write {cut}: neither fsync'd state"
        fs.close()
        fs = sim.open()
        assert snapshot(fs) == got, f"cut after write {cut}: the replayed state did not stick"
        fs.close()
        if cut % 10 == 0:
            assert fsck_problems(sim.open) == [], f"cut after write {cut}"


# -- the host edits the log -----------------------------------------------------------------
def _log(sim: SimVolume) -> bytes:
    return sim.storage.read(fmt.LOG_NAME)


def _put_log(sim: SimVolume, data: bytes) -> None:
    sim.storage.write_file(fmt.LOG_NAME, data)
    sim.storage.fsync(fmt.LOG_NAME)


def _entry_spans(log: bytes) -> list[tuple[int, int]]:
    spans, pos = [], fmt.LOG_HEAD_SIZE
    while pos < len(log):
        (length,) = fmt.LOG_LEN.unpack_from(log, pos)
        if not length:
            break  # the zeros written ahead of the entries
        spans.append((pos, pos + fmt.LOG_LEN.size + length))
        pos = spans[-1][1]
    return spans


def _refused(sim: SimVolume, state_dir: Path, match: str) -> None:
    for read_only in (True, False):
        with pytest.raises(IntegrityError, match=match):
            open_with_state(sim, state_dir, read_only=read_only)


@pytest.mark.parametrize("where", ["mid-entry", "entry boundary", "whole log"])
def test_truncated_log_is_caught_by_the_trusted_state(sim, tmp_path, where):
    crash(sim, logged_store(sim, tmp_path / "state"))
    log = _log(sim)
    last = _entry_spans(log)[-1]
    cut = {"mid-entry": last[1] - 7, "entry boundary": last[0], "whole log": 0}[where]
    if cut:
        _put_log(sim, log[:cut])
    else:
        sim.storage.unlink(fmt.LOG_NAME)
        sim.storage.fsync_dir("")
    _refused(sim, tmp_path / "state", "rolled back: the log holds")


def test_torn_last_entry_without_a_state_is_a_crash_leftover(sim, tmp_path):
    """Without a trusted state a cut-off tail reads as the crash of an unfinished fsync."""
    crash(sim, logged_store(sim, tmp_path / "state"))
    log = _log(sim)
    _put_log(sim, log[: _entry_spans(log)[-1][1] - 7])
    fs = open_with_state(sim, tmp_path / "other-state", read_only=True)
    assert read_path(fs, "/f") == b"version 1" + DATA[9:]
    fs.close()


@pytest.mark.parametrize("entry", [0, 1])
def test_flipped_entry_is_refused(sim, tmp_path, entry):
    crash(sim, logged_store(sim, tmp_path / "state"))
    log = bytearray(_log(sim))
    start, end = _entry_spans(bytes(log))[entry]
    log[(start + end) // 2] ^= 0x01
    _put_log(sim, bytes(log))
    _refused(sim, tmp_path / "state", f"log: entry {entry} failed authentication")


def test_damaged_last_entry_is_caught_by_the_trusted_state(sim, tmp_path):
    """A damaged last entry reads as an unfinished append; the state says it finished."""
    crash(sim, logged_store(sim, tmp_path / "state"))
    log = bytearray(_log(sim))
    end = _entry_spans(bytes(log))[-1][1]
    log[end - 3] ^= 0x01
    _put_log(sim, bytes(log))
    _refused(sim, tmp_path / "state", "rolled back: the log holds 2 entries")


def test_swapped_entries_are_refused(sim, tmp_path):
    crash(sim, logged_store(sim, tmp_path / "state"))
    log = _log(sim)
    (a0, a1), (b0, b1), _ = _entry_spans(log)
    _put_log(sim, log[:a0] + log[b0:b1] + log[a0:a1] + log[b1:])
    _refused(sim, tmp_path / "state", "log: entry 0 failed authentication")


def test_entry_spliced_from_an_older_log_is_refused(sim, tmp_path):
    fs = logged_store(sim, tmp_path / "state", entries=2)
    old = _log(sim)
    fs.commit()  # the log is stale; the next fsync starts another
    rewrite(fs, b"f", b"newer")
    rewrite(fs, b"f", b"newest")
    crash(sim, fs)
    log = _log(sim)
    (o0, o1), _ = _entry_spans(old)
    (n0, _n1), _ = _entry_spans(log)
    _put_log(sim, log[:n0] + old[o0:o1] + log[n0:])
    _refused(sim, tmp_path / "state", "log: entry 0 failed authentication")


def test_older_log_put_back_is_caught(sim, tmp_path):
    fs = logged_store(sim, tmp_path / "state", entries=2)
    old = _log(sim)
    fs.commit()
    rewrite(fs, b"f", b"newer")
    crash(sim, fs)
    _put_log(sim, old)  # it follows an older commit: stale, and the newer entry is gone
    _refused(sim, tmp_path / "state", "rolled back: the log holds 0 entries")
    # Without a state the stale log is ignored: the head already holds all of it.
    fs = open_with_state(sim, tmp_path / "other-state", read_only=True)
    assert read_path(fs, "/f") == b"version 1" + DATA[9:]
    fs.close()


def test_log_of_another_store_is_refused(sim, tmp_path):
    other = SimVolume()
    crash(other, logged_store(other, tmp_path / "other-state"))
    crash(sim, logged_store(sim, tmp_path / "state"))
    _put_log(sim, _log(other))
    _refused(sim, tmp_path / "state", "log: belongs to another filesystem")


def test_log_that_follows_another_head_is_refused(sim, tmp_path):
    crash(sim, logged_store(sim, tmp_path / "state"))
    log = bytearray(_log(sim))
    log[8 + 16 : 8 + 24] = (head_counter(sim) + 1).to_bytes(8, "big")
    _put_log(sim, bytes(log))
    _refused(sim, tmp_path / "state", "log: follows commit")


def test_garbage_log_is_refused(sim, tmp_path):
    crash(sim, logged_store(sim, tmp_path / "state"))
    _put_log(sim, b"not a log at all")
    _refused(sim, tmp_path / "state", "not a version 3 log")


# -- entries planted at the log's names --------------------------------------------------------
@pytest.mark.parametrize("kind", ["symlink", "fifo", "hardlink", "dir"])
@pytest.mark.parametrize("name", [fmt.LOG_NAME, fmt.LOG_TMP_NAME])
def test_planted_log_entry_is_refused_and_never_followed(volume, tmp_path, name, kind):
    fs = volume.open()
    write_file(fs, ROOT_INO, b"f", DATA)
    fs.commit()
    planted = plant(volume, name, kind, tmp_path)
    with pytest.raises(IntegrityError, match=name):
        rewrite(fs, b"f", b"changed")  # the first fsync after a commit starts a log
    fs.close()  # the commit at close does not need the log
    assert planted.outside_now() == planted.before
    if name == fmt.LOG_NAME:
        with pytest.raises(IntegrityError, match=name):
            volume.open(read_only=True)
    else:
        fs = volume.open(read_only=True)
        assert read_path(fs, "/f") == b"changed" + DATA[7:]
        fs.close()
    assert planted.outside_now() == planted.before


def test_power_cut_at_every_write_of_the_replay_keeps_the_fsynced_state():
    """A crash while the mount commits what it replayed: the log still holds it all.
    (The committed slots must stay untouched until that commit lands.)"""

    def crashed() -> tuple[SimVolume, Workload]:
        sim = SimVolume()
        fs = sim.open(commit_interval=float("inf"))
        write_file(fs, ROOT_INO, b"base", DATA * 3)
        fs.commit()  # committed blocks in slot A, which the log's rewrites must spare
        rewrite(fs, b"base", DATA[::-1] * 2)
        load = Workload(11)
        load.model = snapshot(fs)
        for _ in range(60):
            load.step(fs)
        load.fsync(fs)
        sim.storage.power_loss()
        return sim, load

    probe, load = crashed()
    start = probe.storage.changes
    probe.open().close()
    writes = probe.storage.changes - start
    assert writes > 5
    for cut in range(writes):
        sim, load = crashed()
        sim.storage.cut_power_after(cut)
        with pytest.raises(PowerCut):
            sim.open()
        sim.storage.power_loss()
        fs = sim.open()
        assert snapshot(fs) == load.durable, f"cut after write {cut} of the replay"
        fs.close()
