"""Crash consistency: power loss anywhere (in-process) and SIGKILL of a real server.

After each crash the filesystem opens, fsck finds nothing, and its contents
are exactly what the last completed fsync made durable (or, for a crash in
the middle of an fsync, exactly what that fsync was committing).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys

import pytest
from conftest import run_cli

from occlumfs.mount import mounted_paths
from sefs.crashload import run_until_power_cut, snapshot
from sefs.helpers import force_unmount, fsck_problems, server_pid


@pytest.mark.parametrize("seed", range(24))
def test_power_loss_anywhere_keeps_exactly_the_fsynced_state(sim, seed):
    cut_after = random.Random(seed).randrange(5, 600)
    load = run_until_power_cut(sim, seed, cut_after)
    fs = sim.open()
    got = snapshot(fs)
    allowed = [load.durable] + ([load.in_flight] if load.in_flight is not None else [])
    assert got in allowed, f"seed {seed}: state after the crash is neither committed state"
    fs.close()
    assert fsck_problems(sim.open) == []
    # And the recovered filesystem keeps working.
    fs = sim.open()
    load.model = dict(got)
    for _ in range(30):
        load.step(fs)
    load.fsync(fs)
    fs.close()
    fs = sim.open()
    assert snapshot(fs) == load.model
    fs.close()


def test_power_loss_without_any_fsync_keeps_the_created_filesystem(sim):
    load = run_until_power_cut(sim, 99, 0)
    fs = sim.open()
    assert snapshot(fs) == {} == load.durable
    fs.close()


# Writes files whole, in place or via write-temp + fsync + rename + fsync dir,
# logging each version's digest before writing it and after its fsync returned
# ("done"). A crash may keep a version whose fsync was in flight; a file being
# rewritten in place when the crash came may hold anything (POSIX promises
# nothing for data not yet fsync'd), but one replaced by rename is atomic: the
# old version or the new one.
_KILL_WORKLOAD = r"""
import hashlib, json, os, random, sys
mnt, seed, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rng = random.Random(seed)
out = open(log, "a")
def note(kind, name, data):
    out.write(json.dumps({kind: name, "sha": hashlib.sha256(data).hexdigest()}) + "\n")
    out.flush()
for step in range(100000):
    name = f"f{rng.randrange(12)}"
    path = os.path.join(mnt, name)
    data = rng.randbytes(rng.choice([10, 5000, 70000, 300000]))
    choice = rng.random()
    if choice < 0.5:
        note("inplace", name, data)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        note("done", name, data)
    elif choice < 0.7:
        note("intent", name, data)
        with open(path + ".tmp", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(path + ".tmp", path)
        fd = os.open(mnt, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        note("done", name, data)
    else:
        with open(path + ".scratch", "ab") as f:
            f.write(data)
"""


def allowed_versions(log) -> dict[str, set[str] | None]:
    """For each file with a completed fsync: the digests it may hold after a crash
    (None: it was being rewritten in place, anything goes)."""
    allowed: dict[str, set[str] | None] = {}
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if "done" in rec:
            allowed[rec["done"]] = {rec["sha"]}
        elif "inplace" in rec:
            if rec["inplace"] in allowed:
                allowed[rec["inplace"]] = None
        elif allowed.get(rec["intent"]) is not None:
            allowed[rec["intent"]].add(rec["sha"])
    return allowed


def kill_round(volume, tmp_path, seed: int, fsyncs_before_kill: int) -> None:
    """Mount, run the workload, SIGKILL the server mid-flight, check what survived."""
    mnt = tmp_path / f"mnt{seed}"
    mnt.mkdir()
    log = tmp_path / f"fsynced{seed}.jsonl"
    run_cli("mount", *volume.mount_args(), str(mnt), "--log-file", tmp_path / f"server{seed}.log")
    try:
        pid = server_pid(volume.dir)
        worker = subprocess.Popen(
            [sys.executable, "-c", _KILL_WORKLOAD, str(mnt), str(seed), str(log)],
            stderr=subprocess.DEVNULL,
        )
        # Kill once the workload has completed some fsyncs: a point decided by
        # its progress (mid-write, mid-commit, ...), not by a timer.
        while worker.poll() is None:
            text = log.read_text() if log.exists() else ""
            if text.count('"done"') >= fsyncs_before_kill:
                break
            os.sched_yield()
        os.kill(pid, signal.SIGKILL)
        worker.wait(timeout=60)
    finally:
        force_unmount(mnt)
    assert mnt.resolve() not in mounted_paths()
    allowed = allowed_versions(log)
    assert allowed, "the workload completed no fsync before the kill"
    done = run_cli(*volume.fsck_args(), check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    check = tmp_path / f"check{seed}"
    check.mkdir()
    run_cli("mount", *volume.mount_args(), str(check))
    try:
        checked = 0
        for name, digests in allowed.items():
            data = (check / name).read_bytes()  # readable: never EIO after a crash
            if digests is not None:
                assert hashlib.sha256(data).hexdigest() in digests, (
                    f"{name}: holds a version that was never fsync'd"
                )
                checked += 1
        assert checked, "no file had a settled fsync'd version to check"
    finally:
        run_cli("umount", str(check))


@pytest.mark.fuse
def test_sigkill_of_the_server_loses_nothing_fsynced(volume, tmp_path):
    rng = random.Random(7)
    for seed in range(3):
        kill_round(volume, tmp_path, seed, rng.randrange(3, 40))
