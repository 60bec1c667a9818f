"""Copy-up is atomic: power lost at any point of one leaves the lower version or
the complete copy, never part of it.

The upper is a SEFS in simulated storage that commits after every single
operation (the worst case: the union's every step reaches the disk), and the
power is cut after each possible number of storage writes in turn.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time

import pytest
from sefs.helpers import SimVolume
from sefs.powerloss import PowerCut

from occlumfs.fs import RENAME_EXCHANGE, AttrChanges, iter_dir, read_all
from occlumfs.fs import lookup_path as lp
from occlumfs.merkle import open_image_fs
from occlumfs.sefs.fsck import check_fs
from occlumfs.unionfs import UnionFS
from unionfs.helpers import ROOT, listing, read, rename, write

PATCH = b"PATCHED"


def _union(layers, upper) -> UnionFS:
    lowers = [open_image_fs(lo.path, digest=lo.digest, key=None) for lo in layers.lowers()]
    return UnionFS(lowers, upper, digests=layers.digests)


def _abandon(fs: UnionFS) -> None:
    """A union whose power went: its upper is never committed or closed (the
    crash), but its lower images' descriptors are let go, or a run of these
    tests leaks thousands of them into the test process."""
    for lower in fs.lowers:
        lower.close()


def _write_patch(fs, path):
    write(fs, path, PATCH, offset=4096 * 3 + 5, flags=os.O_RDWR)


def _chmod_and_xattr(fs, path):
    fs.setattr(lp(fs, path).ino, AttrChanges(mode=0o604, uid=77))
    fs.setxattr(lp(fs, path).ino, b"user.more", b"x")


def _truncate(fs, path):
    fs.setattr(lp(fs, path).ino, AttrChanges(size=5000))


def _patched(data: bytes) -> bytes:
    at = 4096 * 3 + 5
    data = data.ljust(at, b"\0")  # a write past the end leaves a hole before it
    return data[:at] + PATCH + data[at + len(PATCH) :]


# What the change does, and each state the file may be in afterwards: a
# function of (lower data, lower attr) -> (data, mode, uid) allowed.
CHANGES = {
    "write": (
        _write_patch,
        lambda data, attr: [(data, attr.mode, attr.uid), (_patched(data), attr.mode, attr.uid)],
    ),
    "chmod": (
        _chmod_and_xattr,
        lambda data, attr: [
            (data, attr.mode, attr.uid),
            (data, stat.S_IFREG | 0o604, attr.uid),
            (data, stat.S_IFREG | 0o604, 77),
        ],
    ),
    "truncate": (
        _truncate,
        lambda data, attr: [
            (data, attr.mode, attr.uid),
            (data[:5000].ljust(5000, b"\0"), attr.mode, attr.uid),
        ],
    ),
}


@pytest.mark.parametrize("path", ["big", "merged/hl-b", "meta"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_power_loss_during_copy_up_leaves_lower_or_complete_copy(layers, change, path):
    do, allowed_states = CHANGES[change]
    sim = SimVolume()
    fs = _union(layers, sim.open(commit_interval=0.0))
    lower_data, lower_attr = read(fs, path), lp(fs, path)
    allowed = allowed_states(lower_data, lower_attr)
    fs.close()
    completed = False
    cut_after = 0
    seen = set()
    while not completed:
        cut_after += 1
        fs = _union(layers, sim.open(commit_interval=0.0))
        before = sim.storage.changes
        sim.storage.cut_power_after(cut_after)
        try:
            do(fs, path)
            completed = True
        except PowerCut:
            pass
        _abandon(fs)
        sim.storage.cut_power_after(None)
        assert sim.storage.changes > before or completed
        sim.storage.power_loss()
        fs = _union(layers, sim.open())
        attr = lp(fs, path)
        state = (read(fs, path), attr.mode, attr.uid)
        assert state in allowed, f"{change} {path}: cut after {cut_after}: a partial copy"
        assert attr.ino == lower_attr.ino
        assert fs.getxattr(attr.ino, b"user.colour") == b"blue" if path == "meta" else True
        assert b".occlumfs-union" not in listing(fs)
        seen.add(allowed.index(state))
        fs.close()
        problems = list(check_fs(sim.open(read_only=True, tolerant=True)))
        assert problems == [], problems
        # Start the next round from the lower version again.
        sim = SimVolume()
        fs = _union(layers, sim.open(commit_interval=0.0))
        fs.close()
    assert len(seen) >= 2, "the cuts never caught the change in progress"
    assert cut_after > 5


def _snapshot(fs, ino: int = 1, prefix: bytes = b"") -> dict:
    """Every path the union shows, with its type, inode and contents."""
    out = {}
    for entry in iter_dir(fs, ino):
        path = prefix + b"/" + entry.name
        kind = stat.S_IFMT(entry.attr.mode)
        if stat.S_ISDIR(kind):
            out[path] = (kind, entry.attr.ino)
            out.update(_snapshot(fs, entry.attr.ino, path))
        elif stat.S_ISLNK(kind):
            out[path] = (kind, entry.attr.ino, fs.readlink(entry.attr.ino))
        else:
            data = b"".join(read_all(fs, entry.attr.ino)) if stat.S_ISREG(kind) else b""
            out[path] = (kind, entry.attr.ino, entry.attr.nlink, hashlib.sha256(data).digest())
    return out


def _empty_merged(fs):
    for name in listing(fs, "merged"):
        path = f"merged/{name.decode()}"
        remove = fs.rmdir if stat.S_ISDIR(lp(fs, path).mode) else fs.unlink
        remove(lp(fs, "merged").ino, name)


# name -> (preparation, committed before the crash window; the change itself)
NAMESPACE_CHANGES = {
    "rename a lower directory": (None, lambda fs: rename(fs, "tree", "merged/moved")),
    "rename a lower file over another": (None, lambda fs: rename(fs, "both", "merged/shared")),
    "rmdir a merged directory": (_empty_merged, lambda fs: fs.rmdir(1, b"merged")),
    "mkdir over a deleted directory": (
        lambda fs: fs.rmdir(lp(fs, "merged").ino, b"sub-bottom"),
        lambda fs: fs.mkdir(lp(fs, "merged").ino, b"sub-bottom", 0o755, ROOT),
    ),
    "exchange a lower file and directory": (
        None,
        lambda fs: rename(fs, "low-only", "tree", RENAME_EXCHANGE),
    ),
    "unlink a lower hard link": (None, lambda fs: fs.unlink(1, b"hl-a")),
}


def _prepared(layers, prepare, clock) -> tuple[SimVolume, UnionFS]:
    clock.reset()
    sim = SimVolume()
    fs = _union(layers, sim.open())
    if prepare is not None:
        prepare(fs)
    fs.upper.commit()
    return sim, fs


class Clock:
    """time.monotonic as SEFS's commit timer sees it: still during the setup
    (which commits at 1000 s), then, for the change, just short of the timer's
    10 s, crossing it at the chosen call. A change takes microseconds, so the
    timer falls due at most once in it: anywhere, or not at all."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.calls = 0
        self.jump_at: int | None = None

    def __call__(self) -> float:
        self.calls += 1
        if self.calls == self.jump_at:
            self.now += 0.002
        return self.now

    def arm(self, jump_at: int | None) -> None:
        self.now = 1000.0 + 10.0 - 0.001
        self.calls, self.jump_at = 0, jump_at

    def reset(self) -> None:
        self.now, self.jump_at = 1000.0, None


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(time, "monotonic", fake)
    return fake


def _check(layers, sim, allowed, what) -> bool:
    sim.storage.power_loss()
    fs = _union(layers, sim.open())
    got = _snapshot(fs)
    fs.close()
    assert got in allowed, (
        f"{what}: a state in between: {sorted(set(got.items()) ^ set(allowed[1].items()))[:4]}"
    )
    return got == allowed[1]


@pytest.mark.parametrize("change", list(NAMESPACE_CHANGES))
def test_power_loss_during_a_namespace_change_leaves_before_or_after(layers, change, clock):
    prepare, do = NAMESPACE_CHANGES[change]
    sim, fs = _prepared(layers, prepare, clock)
    before = _snapshot(fs)
    clock.arm(None)
    do(fs)
    calls = clock.calls
    after = _snapshot(fs)
    assert after != before
    fs.close()
    # The upper's commit timer falls due at each moment of the change, and the
    # power goes right after it: what that commit caught must be whole.
    for jump_at in range(1, calls + 1):
        sim, fs = _prepared(layers, prepare, clock)
        clock.arm(jump_at)
        do(fs)
        clock.reset()
        _abandon(fs)
        _check(layers, sim, (before, after), f"{change}: timer due at call {jump_at}")
    # The timer due as the change starts, and the power cut at each write.
    cut_after, completed, seen = 0, False, set()
    while not completed:
        cut_after += 1
        sim, fs = _prepared(layers, prepare, clock)
        clock.arm(1)
        sim.storage.cut_power_after(cut_after)
        try:
            do(fs)
            fs.upper.commit()  # what fsync or the timer would do next
            completed = True
        except PowerCut:
            pass
        _abandon(fs)
        sim.storage.cut_power_after(None)
        clock.reset()
        seen.add(_check(layers, sim, (before, after), f"{change}: cut after {cut_after}"))
    assert seen == {False, True}
