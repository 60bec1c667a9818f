"""The mount command's lifecycle, on the in-memory filesystem."""

from __future__ import annotations

import os

from conftest import run_cli

from occlumfs.errors import ExitCode
from occlumfs.mount import mounted_paths


def test_mount_returns_ready_and_umount_waits(mount):
    with mount("scratch", "--type", "mem") as mnt:
        (mnt / "f").write_bytes(b"data")
        assert (mnt / "f").read_bytes() == b"data"
        assert os.statvfs(mnt).f_bsize == 4096


def test_missing_mountpoint_is_a_clear_error(tmp_path):
    done = run_cli("mount", "--type", "mem", "x", tmp_path / "nope", check=False)
    assert done.returncode == ExitCode.MOUNTPOINT
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr


def test_already_mounted_is_a_clear_error(mount, tmp_path):
    with mount("scratch", "--type", "mem") as mnt:
        done = run_cli("mount", "--type", "mem", "x", mnt, check=False)
        assert done.returncode == ExitCode.MOUNTPOINT
        assert "already mounted" in done.stderr
        assert mnt.resolve() in mounted_paths()


def test_umount_of_unmounted_dir_is_a_clear_error(tmp_path):
    done = run_cli("umount", tmp_path, check=False)
    assert done.returncode == ExitCode.MOUNTPOINT
    assert "not mounted" in done.stderr
