"""Entries planted in a SEFS store or its state dir by whoever owns them: refused, never followed.

The store's owner may be another user than the one who mounts it. At every
name SEFS uses we plant a symlink, a fifo, a directory, a device or a hard link
to a file outside the store (holding the very bytes the store had there), then
run the real commands. Outside files never change; a command either does not
touch the name or stops with one line naming it (exit 13, or fsck's 26).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import mounted, run_cli

from occlumfs.cli import main
from occlumfs.errors import ExitCode, IntegrityError
from occlumfs.keys import write_key_file
from occlumfs.sefs import format as fmt
from occlumfs.sefs.journal import ENTRY_MAX_BLOCKS
from occlumfs.sefs.state import pin_name
from sefs.helpers import ROOT, Volume, make_volume, write_file

DATA = bytes(range(256)) * 20  # 5120 bytes: two blocks


@dataclass
class Base:
    volume: Volume
    fs_id: str
    counter: int  # the head's commit counter

    def names(self) -> dict[str, str]:
        """Every name the store uses, by role."""
        return {
            "config": fmt.CONFIG_NAME,
            "config tmp": f"{fmt.CONFIG_NAME}.tmp",
            "head": fmt.HEAD_NAME,
            "head tmp": fmt.HEAD_TMP_NAME,
            "lock": fmt.LOCK_NAME,
            "pack": fmt.pack_name(self.counter),
            "next pack": fmt.pack_name(self.counter + 1),
            "data": fmt.data_name(2, fmt.SLOT_A),
            "slot b": fmt.data_name(2, fmt.SLOT_B),
            "next data": fmt.data_name(3, fmt.SLOT_A),
            "log": fmt.LOG_NAME,
            "log tmp": fmt.LOG_TMP_NAME,
        }


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    volume = make_volume(tmp_path_factory.mktemp("hostile") / "vol")
    fs = volume.open()
    assert write_file(fs, 1, b"f", DATA) == 2  # inode 2: d/0000000000000002
    fs.close()
    (volume.dir / fmt.LOCK_NAME).unlink()
    head = fmt.unpack_head((volume.dir / fmt.HEAD_NAME).read_bytes())
    return Base(volume, head.fs_id.hex(), head.counter)


@dataclass
class Planted:
    volume: Volume
    path: Path  # the planted entry
    outside: Path  # what it leads to (a file, or a directory for m/ and d/)
    before: dict[str, tuple[bytes, int]]

    def outside_now(self) -> dict[str, tuple[bytes, int]]:
        files = [self.outside] if self.outside.is_file() else sorted(self.outside.rglob("*"))
        return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in files if p.is_file()}


def plant(volume: Volume, rel: str, kind: str, outside_dir: Path) -> Planted:
    """Replace (or add) ``rel`` in the store by an entry of ``kind`` leading outside."""
    path = volume.dir / rel
    if path.is_dir():
        outside = outside_dir / "copy-of-dir"
        shutil.copytree(path, outside)
        shutil.rmtree(path)
    else:
        outside = outside_dir / "victim"
        outside.write_bytes(path.read_bytes() if path.exists() else b"important\n")
        path.unlink(missing_ok=True)
    if kind == "symlink":
        path.symlink_to(outside)
    elif kind == "hardlink":
        os.link(outside, path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "device":  # /dev/null's numbers: harmless if it were ever opened
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    else:  # "file": a regular file where a directory belongs
        path.write_bytes(b"not a directory\n")
    result = Planted(volume, path, outside, {})
    result.before = result.outside_now()
    return result


def cli(*args) -> tuple[int, str, str]:
    """The real command line, in-process: (exit code, stdout, stderr)."""
    done = CliRunner().invoke(main, [str(a) for a in args])
    assert done.exception is None or isinstance(done.exception, SystemExit), done.exc_info
    return done.exit_code, done.stdout, done.stderr


def assert_refused_or_untouched(code: int, out: str, err: str, planted: Planted, allowed=()):
    """Success, or exactly one error line on stderr that names the planted entry."""
    if code == 0:
        return
    assert code in (ExitCode.INTEGRITY, *allowed), (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert code == ExitCode.FSCK or lines[0].startswith("occlumfs: error:"), err
    assert planted.path.name in out + err, (out, err)


FILE_KINDS = ["symlink", "hardlink", "fifo", "dir", "device"]
# What the foreground of `mount` (read-write) opens, creates or removes: every name
# but the data files (opened at first use) and passwd's temporary file.
MOUNT_USES = [
    *("config", "head", "head tmp", "lock", "pack", "next pack", "next data", "log", "log tmp")
]


GRID = [
    *(
        (role, kind)
        for role in [*MOUNT_USES, "data", "slot b", "config tmp"]
        for kind in FILE_KINDS
    ),
    *((role, kind) for role in ["m/", "d/"] for kind in ["symlink", "fifo", "file"]),
]


@pytest.mark.fuse
@pytest.mark.parametrize(("role", "kind"), GRID)
def test_planted_store_entry_is_refused_and_nothing_outside_changes(
    base, tmp_path, spare_mnt, role, kind
):
    rel = role.rstrip("/") if role.endswith("/") else base.names()[role]
    volume = base.volume.copy(tmp_path / "v")
    new_key = tmp_path / "new.key"
    write_key_file(new_key)
    planted = plant(volume, rel, kind, tmp_path)
    key_args = ["--key-file", volume.key_file, "--state-dir", volume.state]

    code, out, err = cli("sefs", "info", volume.dir)
    assert_refused_or_untouched(code, out, err, planted)
    code, out, err = cli("fsck", volume.dir, *key_args)
    assert_refused_or_untouched(code, out, err, planted, allowed=[ExitCode.FSCK])
    if role in ("config", "head", "pack", "data", "log", "m/", "d/"):
        assert code != 0, "fsck reads this entry: it must not pass"

    mnt = spare_mnt
    done = run_cli("mount", volume.dir, mnt, *key_args, check=False)
    if role in (*MOUNT_USES, "m/", "d/"):
        assert done.returncode == ExitCode.INTEGRITY, done.stderr
        assert_refused_or_untouched(done.returncode, done.stdout, done.stderr, planted)
    else:
        assert done.returncode == 0, done.stderr
        failed = _use_the_mount(mnt)
        umounted = run_cli("umount", mnt, check=False)
        if umounted.returncode:
            assert len(umounted.stderr.strip().splitlines()) == 1, umounted.stderr
            run_cli("umount", "--lazy", mnt, check=False)
        if role != "config tmp":
            assert errno.EIO in failed, f"no EIO from a mount over a planted {rel}"

    code, out, err = cli("sefs", "passwd", volume.dir, *key_args[:2], "--new-key-file", new_key)
    assert_refused_or_untouched(code, out, err, planted)
    assert planted.outside_now() == planted.before, "a file outside the store changed"


def _use_the_mount(mnt: Path) -> list[int]:
    """Read, rewrite and create files with fsync; the errnos of whatever failed."""
    failed = []
    for step in (
        lambda: (mnt / "f").read_bytes(),
        lambda: _write_fsync(mnt / "f", b"rewritten"),
        # Past the inline limit (format version 4): it gets the next data file.
        lambda: _write_fsync(mnt / "g", DATA),
        # More than a log entry takes (format version 3): this fsync commits.
        lambda: _write_fsync(mnt / "big", bytes((ENTRY_MAX_BLOCKS + 1) * 4096)),
    ):
        try:
            step()
        except OSError as exc:
            failed.append(exc.errno)
    return failed


def _write_fsync(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.fuse
@pytest.mark.parametrize("kind", ["symlink", "fifo"])
@pytest.mark.parametrize("role", ["head tmp", "next pack", "next data", "slot b", "log tmp"])
def test_entry_planted_while_mounted_never_redirects_a_commit(base, tmp_path, role, kind):
    """The issue's attack: plant once the mount is up, then make the server commit."""
    volume = base.volume.copy(tmp_path / "v")
    with mounted(volume.dir, tmp_path / "mnt", *volume.mount_args()[1:], allow_log_errors=True):
        planted = plant(volume, base.names()[role], kind, tmp_path)
        failed = _use_the_mount(tmp_path / "mnt")
        assert errno.EIO in failed
        planted.path.unlink()  # what the owner planted goes; the store carries on
        assert _use_the_mount(tmp_path / "mnt") == []
    assert planted.outside_now() == planted.before
    assert run_cli(*volume.fsck_args()).returncode == 0


@pytest.mark.parametrize("kind", FILE_KINDS)
@pytest.mark.parametrize("role", ["head tmp", "next pack", "next data", "slot b"])
def test_commit_over_a_planted_entry_raises_naming_it(base, tmp_path, role, kind):
    """In-process, every kind: the commit fails as an integrity error, outside untouched."""
    volume = base.volume.copy(tmp_path / "v")
    fs = volume.open()
    try:
        planted = plant(volume, base.names()[role], kind, tmp_path)
        with pytest.raises(IntegrityError, match=planted.path.name):
            fh, _attr = fs.create(1, b"g", 0o644, os.O_WRONLY, ROOT)
            fs.write(fh, 0, DATA)
            fs.release(fh)
            fh = fs.open(2, os.O_WRONLY)
            fs.write(fh, 0, b"rewritten")
            fs.release(fh)
            fs.commit()
    finally:
        with contextlib.suppress(IntegrityError):
            fs.close()  # its final commit may meet the same entry
    assert planted.outside_now() == planted.before


@pytest.mark.fuse
@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo", "dir"])
@pytest.mark.parametrize("which", ["commit state", "store pin"])
def test_planted_state_file_is_refused(base, tmp_path, spare_mnt, which, kind):
    volume = base.volume.copy(tmp_path / "v")
    run_cli(*volume.fsck_args())  # pins the store's path in the copied state
    found = volume.state / (
        f"{base.fs_id}.json" if which == "commit state" else pin_name(volume.dir)
    )
    assert found.is_file()
    planted = _plant_in_state(found, kind, tmp_path)
    done = run_cli(*volume.fsck_args(), check=False)
    assert_refused_or_untouched(done.returncode, done.stdout, done.stderr, planted, [ExitCode.FSCK])
    assert done.returncode != 0
    done = run_cli("mount", volume.dir, spare_mnt, *volume.mount_args()[1:], check=False)
    assert done.returncode == ExitCode.INTEGRITY and found.name in done.stderr
    assert planted.outside_now() == planted.before


def _plant_in_state(found: Path, kind: str, outside_dir: Path) -> Planted:
    outside = outside_dir / "victim"
    outside.write_bytes(found.read_bytes())
    found.unlink()
    {
        "symlink": lambda: found.symlink_to(outside),
        "hardlink": lambda: os.link(outside, found),
        "fifo": lambda: os.mkfifo(found),
        "dir": found.mkdir,
    }[kind]()
    planted = Planted(None, found, outside, {})
    planted.before = planted.outside_now()
    return planted
