"""Copy-up is atomic: power lost at any point of one leaves the lower version or
the complete copy, never part of it.

The upper is a SEFS in simulated storage that commits after every single
operation (the worst case: the union's every step reaches the disk), and the
power is cut after each possible number of storage writes in turn.
"""

from __future__ import annotations

import os
import stat

import pytest
from sefs.helpers import SimVolume

from occlumfs.fs import AttrChanges
from occlumfs.fs import lookup_path as lp
from occlumfs.merkle import open_image_fs
from occlumfs.sefs.fsck import check_fs
from occlumfs.sefs.storage import PowerCut
from occlumfs.unionfs import UnionFS
from unionfs.helpers import listing, read, write

PATCH = b"PATCHED"


def _union(layers, upper) -> UnionFS:
    lowers = [open_image_fs(lo.path, digest=lo.digest, key=None) for lo in layers.lowers()]
    return UnionFS(lowers, upper, digests=layers.digests)


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
