"""Format version 4: a small file's data inline in its inode record, no host data file.

Through a real mount: create, read, append past the limit, truncate back,
rename, hard link, unlink, and fsync followed by a SIGKILL of the server (the
log entry carries the data); in-process: the edges of the limit, and stores of
older versions, which keep their data in blocks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from conftest import run_cli

from occlumfs.fs import ROOT_INO, AttrChanges, lookup_path
from occlumfs.keys import load_key_file
from occlumfs.mount import mounted_paths
from occlumfs.sefs import open_sefs_fs
from occlumfs.sefs.inline import INLINE_MAX, INLINE_PAD
from sefs.helpers import ROOT, force_unmount, fsck_problems, read_path, server_pid, write_file

GOLDEN_DIR = Path(__file__).parent / "golden"
SMALL = bytes(range(100))


def data_files(volume) -> list[str]:
    """The inodes (16 hex digits) with a data file on the host, in either slot."""
    return sorted({p.name[:16] for p in (volume.dir / "d").iterdir()})


def ino_of(path: Path) -> str:
    return f"{os.stat(path).st_ino:016x}"


@pytest.mark.fuse
def test_small_files_live_inline_through_their_whole_life(volume, mount):
    with mount(*volume.mount_args()) as mnt:
        (mnt / "dir").mkdir()
        for i in range(50):
            (mnt / "dir" / f"f{i}").write_bytes(SMALL + bytes([i]))
        a = mnt / "a"
        a.write_bytes(SMALL)
        fd = os.open(a, os.O_RDONLY)
        os.fsync(fd)  # a log entry, which carries the data
        os.close(fd)
        assert data_files(volume) == []
        assert a.read_bytes() == SMALL
        # Append up to the limit: still inline; one byte more: to blocks.
        with open(a, "ab") as f:
            f.write(b"x" * (INLINE_MAX - len(SMALL)))
        assert a.stat().st_size == INLINE_MAX and data_files(volume) == []
        with open(a, "ab") as f:
            f.write(b"y")
        whole = SMALL + b"x" * (INLINE_MAX - len(SMALL)) + b"y"
        assert a.read_bytes() == whole
        assert data_files(volume) == [ino_of(a)]  # written out at close
        # Back under the limit it stays in blocks (the data file stays).
        os.truncate(a, 50)
        assert a.read_bytes() == SMALL[:50]
        os.truncate(a, 200)
        assert a.read_bytes() == SMALL[:50] + bytes(150)
        # Rename and hard link an inline file; unlink one name, then the other.
        b = mnt / "b"
        b.write_bytes(b"bee")
        os.rename(b, mnt / "dir" / "b2")
        os.link(mnt / "dir" / "b2", mnt / "b3")
        with open(mnt / "b3", "r+b") as f:
            f.seek(10)
            f.write(b"!")  # a hole inside the inline bytes
        assert (mnt / "dir" / "b2").read_bytes() == b"bee" + bytes(7) + b"!"
        assert os.stat(mnt / "b3").st_nlink == 2
        os.unlink(mnt / "dir" / "b2")
        assert (mnt / "b3").read_bytes() == b"bee" + bytes(7) + b"!"
        # Truncated to 0, it is inline again; grown by truncate past the limit, blocks.
        with open(a, "r+b") as f:
            f.truncate(0)
            f.write(b"again")
        os.truncate(mnt / "b3", INLINE_MAX + 1)
        assert (mnt / "b3").read_bytes() == b"bee" + bytes(7) + b"!" + bytes(INLINE_MAX - 10)
        os.unlink(mnt / "dir" / "f8")
    assert data_files(volume) == [ino_of_after(volume, "a"), ino_of_after(volume, "b3")]
    with mount(*volume.mount_args()) as mnt:
        assert (mnt / "a").read_bytes() == b"again"
        assert (mnt / "dir" / "f7").read_bytes() == SMALL + b"\x07"
        assert not (mnt / "dir" / "f8").exists() and not (mnt / "dir" / "b2").exists()
        assert (mnt / "b3").stat().st_size == INLINE_MAX + 1
        assert len(os.listdir(mnt / "dir")) == 49
        os.unlink(mnt / "b3")
    assert data_files(volume) == [ino_of_after(volume, "a")]
    assert run_cli(*volume.fsck_args()).returncode == 0


def ino_of_after(volume, path: str) -> str:
    fs = volume.open(read_only=True)
    try:
        return f"{lookup_path(fs, path).ino:016x}"
    finally:
        fs.close()


@pytest.mark.fuse
def test_fsynced_inline_data_survives_a_sigkill_through_the_log(volume, tmp_path, mount):
    mnt = tmp_path / "killed"
    mnt.mkdir()
    run_cli("mount", *volume.mount_args(), str(mnt), "--log-file", tmp_path / "server.log")
    try:
        pid = server_pid(volume.dir)
        (mnt / "kept").write_bytes(b"k" * 10)  # committed below by nothing: the log holds it
        fd = os.open(mnt / "grows", os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, SMALL)
        os.fsync(fd)  # entry 0: both files
        os.write(fd, b"z" * INLINE_MAX)  # past the limit: blocks, in entry 1
        os.fsync(fd)
        os.close(fd)
        fd = os.open(mnt / "kept", os.O_WRONLY)
        os.pwrite(fd, b"K", 0)
        os.fsync(fd)  # entry 2: the inline record again
        os.close(fd)
        assert (volume.dir / "log").stat().st_size > 0
        os.kill(pid, signal.SIGKILL)
    finally:
        force_unmount(mnt)
    assert mnt.resolve() not in mounted_paths()
    assert run_cli(*volume.fsck_args()).returncode == 0
    with mount(*volume.mount_args()) as again:
        assert (again / "kept").read_bytes() == b"K" + b"k" * 9
        assert (again / "grows").read_bytes() == SMALL + b"z" * INLINE_MAX


def test_the_edges_of_the_limit(sim):
    fs = sim.open()
    at_limit = write_file(fs, ROOT_INO, b"limit", b"L" * INLINE_MAX)
    node = fs._nodes[at_limit]
    assert len(node.target) == INLINE_MAX and not node.present
    # A hole in front of a small write, then a truncate up within the limit: zeros.
    holed = write_file(fs, ROOT_INO, b"holed", b"")
    fh = fs.open(holed, os.O_RDWR)
    fs.write(fh, 1000, b"end")
    fs.setattr(holed, AttrChanges(size=2000))
    assert fs.read(fh, 0, 5000) == bytes(1000) + b"end" + bytes(997)
    assert len(fs._nodes[holed].target) % INLINE_PAD == 0
    fs.setattr(holed, AttrChanges(size=1001))  # cut: the bytes past it are zeros
    assert fs._nodes[holed].target[1001:].strip(b"\0") == b""
    fs.setattr(holed, AttrChanges(size=1003))
    assert fs.read(fh, 0, 5000) == bytes(1000) + b"e" + bytes(2)
    fs.release(fh)
    # A sparse file larger than the limit stays in blocks for a small write.
    sparse = write_file(fs, ROOT_INO, b"sparse", b"")
    fs.setattr(sparse, AttrChanges(size=INLINE_MAX + 1))
    fh = fs.open(sparse, os.O_WRONLY)
    fs.write(fh, 0, b"s")
    fs.release(fh)
    assert fs._nodes[sparse].target == b""
    fs.close()
    fs = sim.open()
    assert read_path(fs, "limit") == b"L" * INLINE_MAX
    assert read_path(fs, "holed") == bytes(1000) + b"e" + bytes(2)
    assert read_path(fs, "sparse") == b"s" + bytes(INLINE_MAX)
    fs.close()
    assert fsck_problems(sim.open) == []
    assert [name for name in sim.storage.listdir("d")] == [f"{sparse:016x}"]


def test_a_store_of_an_older_version_keeps_its_data_in_blocks(tmp_path):
    """No upgrade: a version 3 store mounted by this build writes blocks, stays version 3."""
    vol = tmp_path / "fs"
    shutil.copytree(GOLDEN_DIR / "v3" / "fs", vol)
    key = load_key_file(GOLDEN_DIR / "v3" / "key")
    fs = open_sefs_fs(vol, key=key, state_dir=tmp_path / "state")
    ino = write_file(fs, ROOT_INO, b"small", SMALL)
    fs.mkdir(ROOT_INO, b"sub", 0o755, ROOT)
    fs.close()
    assert (vol / "d" / f"{ino:016x}").stat().st_size == 4096
    assert json.loads((vol / "sefs.json").read_text())["version"] == 3
    fs = open_sefs_fs(vol, key=key, state_dir=tmp_path / "state", read_only=True)
    assert read_path(fs, "small") == SMALL and fs._nodes[ino].target == b""
    fs.close()
    assert run_cli("fsck", vol, "--key-file", GOLDEN_DIR / "v3" / "key", "--state-dir",
                   tmp_path / "state").returncode == 0  # fmt: skip


def test_fsck_names_inline_data_that_breaks_the_rules():
    from occlumfs.sefs.inline import problems
    from occlumfs.sefs.inode import Inode

    def node(size: int, target: bytes, present: int = 0) -> Inode:
        n = Inode(9, 0o100644)
        n.size, n.target, n.present = size, target, present
        return n

    assert problems(node(100, SMALL + bytes(28)), True) == []
    assert problems(node(0, b""), False) == []
    assert problems(node(100, SMALL + bytes(28)), False) == [
        "inline data in a store of a version without it"
    ]
    assert problems(node(100, SMALL + bytes(28), present=1), True) == [
        "has both inline data and data blocks"
    ]
    assert problems(node(INLINE_MAX + 1, bytes(64)), True) == [
        f"inline data in a file of {INLINE_MAX + 1} bytes (more than {INLINE_MAX})"
    ]
    assert problems(node(100, SMALL), True) == ["inline data of 100 bytes is not the padded size"]
    assert problems(node(10, bytes(128)), True) == [
        "inline data of 128 bytes is not the padded size"
    ]
    assert problems(node(10, b"x" * 64), True) == ["inline data has bytes past the end of the file"]


def test_inline_bytes_waiting_for_a_commit_are_bounded(sim):
    from occlumfs.sefs.inline import PENDING_MAX

    fs = sim.open()
    counter = fs._pages.counter
    count = PENDING_MAX // INLINE_MAX + 10
    for i in range(count):
        write_file(fs, ROOT_INO, b"f%d" % i, bytes([i % 256]) * INLINE_MAX)
    assert fs._pages.counter == counter + 1  # one commit made room, in a write
    assert 0 < fs._inline.pending <= PENDING_MAX
    fs.close()
    fs = sim.open()
    assert read_path(fs, f"f{count - 1}") == bytes([(count - 1) % 256]) * INLINE_MAX
    fs.close()


@pytest.mark.parametrize("committed", [True, False], ids=["committed blocks", "logged blocks"])
def test_a_file_cut_back_under_the_limit_is_inline_again(sim, committed):
    fs = sim.open(commit_interval=float("inf"))
    big = bytes(range(256)) * 40  # three blocks
    ino = write_file(fs, ROOT_INO, b"f", big)
    fh = fs.open(ino, os.O_RDWR)
    fs.fsync(fh, False)
    if committed:
        fs.commit()
    fs.setattr(ino, AttrChanges(size=INLINE_MAX + 1))  # still past the limit: blocks
    node = fs._nodes[ino]
    assert not node.target and node.present
    fs.setattr(ino, AttrChanges(size=1000))
    assert len(node.target) == 1024 and not node.present and not node.chunks
    assert fs.read(fh, 0, 5000) == big[:1000]
    fs.setattr(ino, AttrChanges(size=2000))  # grows inline: zeros
    assert fs.read(fh, 0, 5000) == big[:1000] + bytes(1000)
    fs.fsync(fh, False)
    fs.release(fh)
    sim.storage.power_loss()  # the log holds the cut: replayed
    fs = sim.open()
    assert read_path(fs, "/f") == big[:1000] + bytes(1000)
    assert len(fs._nodes[ino].target) == 1024
    fs.close()
    assert fsck_problems(sim.open) == []
    fs = sim.open()
    assert read_path(fs, "/f") == big[:1000] + bytes(1000)
    fs.unlink(ROOT_INO, b"f")
    fs.close()
    assert not [n for n in sim.storage.files() if n.startswith("d/")], "its data file went"
