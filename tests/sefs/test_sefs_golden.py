"""Golden SEFS directories, one per format version, committed: today's code must read each exactly.

Add one only with a format version bump: ``cd tests && python -m sefs.test_sefs_golden``
writes ``golden/v<current version>``; never regenerate an older one.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from conftest import run_cli

from occlumfs.fs import ROOT_INO, AttrChanges, iter_dir, lookup_path
from occlumfs.sefs import format as fmt
from occlumfs.sefs.keys import CONFIG_VERSION

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN = GOLDEN_DIR / "v1"
BIG = bytes(i % 251 for i in range(5000))
FAR = (1 << 20) + 4096  # in the second block-map chunk, everything before it a hole
EDGE = bytes(i % 241 for i in range(3072))  # version 4: the largest inline file
GROWN = bytes(i % 239 for i in range(4000))  # version 4: inline at the commit, blocks in the log


def build_golden(where: Path) -> None:
    from occlumfs.keys import write_key_file
    from occlumfs.sefs import Credential, create_sefs, open_sefs_fs
    from sefs.helpers import ROOT, write_file

    key = write_key_file(where / "key")
    create_sefs(where / "fs", Credential(key=key), state_dir=where / "state")
    fs = open_sefs_fs(where / "fs", key=key, state_dir=where / "state")
    write_file(fs, ROOT_INO, b"empty", b"")
    write_file(fs, ROOT_INO, b"one", b"x")
    big = write_file(fs, ROOT_INO, b"big", BIG)
    d = fs.mkdir(ROOT_INO, b"dir", 0o750, ROOT)
    fs.symlink(d.ino, b"link", b"../big", ROOT)
    fs.setxattr(big, b"user.note", b"golden")
    fs.setattr(big, AttrChanges(mtime_ns=1_600_000_000_123_456_789))
    sparse = write_file(fs, ROOT_INO, b"sparse", b"")
    fh = fs.open(sparse, os.O_WRONLY)
    fs.write(fh, FAR, b"far")
    fs.release(fh)
    if CONFIG_VERSION >= 4:  # inline data: one at the limit, one that grows in the log
        write_file(fs, ROOT_INO, b"edge", EDGE)
        write_file(fs, ROOT_INO, b"grown", GROWN[:5])
    fs.close()
    if CONFIG_VERSION >= 3:
        _log_changes(where, key)
    (where / "fs" / "lock").unlink()
    shutil.rmtree(where / "state")


LOGGED = b"only in the log"


def _log_changes(where: Path, key: bytes) -> None:
    """Version 3: fsync'd changes that only the log holds, then the server dies."""
    from occlumfs.sefs import open_sefs_fs
    from sefs.helpers import write_file

    fs = open_sefs_fs(where / "fs", key=key, state_dir=where / "state")
    write_file(fs, ROOT_INO, b"logged", LOGGED)
    fh = fs.open(lookup_path(fs, "one").ino, os.O_WRONLY)
    fs.write(fh, 0, b"y")
    fs.fsync(fh, False)  # log entry 0
    fs.release(fh)
    fs.unlink(ROOT_INO, b"empty")
    fs.fsyncdir(fs.opendir(ROOT_INO), False)  # log entry 1
    if CONFIG_VERSION >= 4:
        fh = fs.open(lookup_path(fs, "grown").ino, os.O_WRONLY)
        fs.write(fh, 5, GROWN[5:])  # past the inline limit: its bytes move to blocks
        fs.fsync(fh, False)  # log entry 2
        fs.release(fh)
    fs.storage.close()  # the server dies: no commit
    fs._lock.release()
    # Its data files were never fsync'd (the log holds their blocks): a crash may lose them.
    # (Version 4: "one" and "logged" are inline and have none; "grown", inode 9, has one.)
    lost = (
        ["0000000000000003.b", "0000000000000008"] if CONFIG_VERSION < 4 else ["0000000000000009"]
    )
    for name in lost:
        (where / "fs" / "d" / name).unlink()


def test_golden_v1_reads_back_exactly(tmp_path):
    vol = tmp_path / "fs"
    shutil.copytree(GOLDEN / "fs", vol)
    config = json.loads((vol / "sefs.json").read_text())
    assert config["version"] == fmt.VERSION == 1
    assert (vol / "head").stat().st_size == fmt.HEAD_SIZE
    _check_reads_back(vol, GOLDEN / "key", tmp_path / "state")


def _golden_copy(version: int, tmp_path: Path) -> tuple[Path, Path]:
    """(golden dir, a copy of its store in tmp_path) of version ``version``, checked."""
    golden = GOLDEN_DIR / f"v{version}"
    vol = tmp_path / "fs"
    shutil.copytree(golden / "fs", vol)
    assert json.loads((vol / "sefs.json").read_text())["version"] == version
    return golden, vol


def test_golden_v2_reads_back_exactly(tmp_path):
    """Version 2 binds the whole sefs.json into the key wrap; everything else is v1's."""
    golden, vol = _golden_copy(2, tmp_path)
    assert (vol / "head").stat().st_size == fmt.HEAD_SIZE
    _check_reads_back(vol, golden / "key", tmp_path / "state")


def test_golden_v3_reads_back_exactly(tmp_path):
    """Version 3 adds the log: two fsync'd entries the head does not hold yet."""
    from occlumfs.keys import load_key_file
    from occlumfs.sefs import open_sefs_fs
    from sefs.helpers import read_path

    golden, vol = _golden_copy(3, tmp_path)
    head = fmt.unpack_head((vol / "head").read_bytes())
    log = (vol / fmt.LOG_NAME).read_bytes()
    assert fmt.parse_log_head(log) == (head.fs_id, head.counter, head.root.tag)
    _check_reads_back(vol, golden / "key", tmp_path / "state", logged=True)
    # A read-write open commits what it replayed; the log is then stale.
    fs = open_sefs_fs(vol, key=load_key_file(golden / "key"), state_dir=tmp_path / "state")
    fs.close()
    assert fmt.unpack_head((vol / "head").read_bytes()).counter == head.counter + 1
    _check_reads_back(vol, golden / "key", tmp_path / "state", logged=True)
    fs = open_sefs_fs(vol, key=load_key_file(golden / "key"), state_dir=tmp_path / "state")
    assert read_path(fs, "logged") == LOGGED
    fs.close()


def _check_reads_back(vol: Path, key_file: Path, state: Path, logged: bool = False) -> None:
    from occlumfs.keys import load_key_file
    from occlumfs.sefs import open_sefs_fs
    from sefs.helpers import read_path

    fs = open_sefs_fs(vol, key=load_key_file(key_file), state_dir=state, read_only=True)
    try:
        if logged:
            assert read_path(fs, "logged") == LOGGED
            assert read_path(fs, "one") == b"y"
            names = [e.name for e in iter_dir(fs, ROOT_INO)]
            v4 = (
                [b"edge", b"grown"]
                if json.loads((vol / "sefs.json").read_text())["version"] >= 4
                else []
            )
            assert names == [b"one", b"big", b"dir", b"sparse", *v4, b"logged"]
        else:
            assert read_path(fs, "empty") == b""
            assert read_path(fs, "one") == b"x"
        assert read_path(fs, "big") == BIG
        big = lookup_path(fs, "big")
        assert big.mtime_ns == 1_600_000_000_123_456_789
        assert fs.getxattr(big.ino, b"user.note") == b"golden"
        assert stat.S_IMODE(lookup_path(fs, "dir").mode) == 0o750
        assert fs.readlink(lookup_path(fs, "dir/link").ino) == b"../big"
        sparse = lookup_path(fs, "sparse")
        assert sparse.size == FAR + 3 and sparse.blocks == 8
        fh = fs.open(sparse.ino, os.O_RDONLY)
        assert fs.read(fh, FAR - 2, 10) == b"\0\0far"
        fs.release(fh)
    finally:
        fs.close()
    done = run_cli("fsck", vol, "--key-file", key_file, "--state-dir", state)
    assert done.returncode == 0


def test_golden_v4_reads_back_exactly(tmp_path):
    """Version 4 keeps small files' data inline in their inode records."""
    from occlumfs.keys import load_key_file
    from occlumfs.sefs import open_sefs_fs
    from sefs.helpers import read_path

    golden, vol = _golden_copy(4, tmp_path)
    assert CONFIG_VERSION == 4
    head = fmt.unpack_head((vol / "head").read_bytes())
    _check_reads_back(vol, golden / "key", tmp_path / "state", logged=True)
    for read_only in (True, False, True):  # replayed; committed by the read-write open
        fs = open_sefs_fs(
            vol,
            key=load_key_file(golden / "key"),
            state_dir=tmp_path / "state",
            read_only=read_only,
        )
        try:
            assert read_path(fs, "edge") == EDGE
            assert read_path(fs, "grown") == GROWN
            assert lookup_path(fs, "edge").blocks == 6  # 3072 inline bytes
        finally:
            fs.close()
    assert fmt.unpack_head((vol / "head").read_bytes()).counter == head.counter + 1
    _check_reads_back(vol, golden / "key", tmp_path / "state", logged=True)


@pytest.mark.parametrize("version", ["v1", "v2", "v3", "v4"])
def test_golden_host_layout_is_the_documented_one(version):
    root = GOLDEN_DIR / version / "fs"
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert "head" in names and "sefs.json" in names
    assert ("log" in names) == (version in ("v3", "v4"))
    assert [n for n in names if n.startswith("m/")] == ["m/0000000000000002.pack"]
    # Non-empty regular files have a data file named by inode; the empty one has none,
    # nor (version 4) do the files whose data is inline: "one", "edge", "logged".
    data = [n for n in names if n.startswith("d/")]
    if version == "v4":
        assert data == ["d/0000000000000004", "d/0000000000000007"]
    else:
        assert data == ["d/0000000000000003", "d/0000000000000004", "d/0000000000000007"]
        assert (root / "d" / "0000000000000003").stat().st_size == 4096  # "x"
    assert (root / "d" / "0000000000000004").stat().st_size == 8192  # 5000 bytes


if __name__ == "__main__":
    target = GOLDEN_DIR / f"v{CONFIG_VERSION}"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    build_golden(target)
    print(f"wrote {target}")
