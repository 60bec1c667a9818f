"""A store whose host directory is read-only (a read-only bind mount, a CD, a
snapshot): as with gocryptfs, it can be mounted --ro and checked; a read-write
mount or a re-key is refused in one line naming the store, before anything is
mounted."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import run_cli

from occlumfs.errors import ExitCode

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root")


@pytest.fixture
def read_only_store(volume, mount):
    with mount(*volume.mount_args()) as mnt:
        (mnt / "kept").write_bytes(b"kept")
    subprocess.run(["mount", "--bind", volume.dir, volume.dir], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", volume.dir], check=True)
        yield volume
    finally:
        subprocess.run(["umount", volume.dir], check=True)


@pytest.mark.fuse
def test_a_store_on_read_only_storage_mounts_read_only_and_checks_clean(read_only_store, mount):
    volume = read_only_store
    with mount(*volume.mount_args(), "--ro") as mnt:
        assert (mnt / "kept").read_bytes() == b"kept"
    assert run_cli(*volume.fsck_args()).returncode == 0


@pytest.mark.fuse
@pytest.mark.parametrize("command", ["mount", "passwd"])
def test_writing_to_a_store_on_read_only_storage_is_refused_naming_it(
    read_only_store, spare_mnt, command
):
    volume = read_only_store
    if command == "mount":
        args = ["mount", *volume.mount_args(), spare_mnt]
    else:
        args = ["sefs", "passwd", volume.dir, "--key-file", volume.key_file]
        args += ["--new-key-file", volume.key_file]
    done = run_cli(*args, check=False)
    assert done.returncode == ExitCode.ERROR, done.stderr
    assert done.stderr.splitlines() == [
        f"occlumfs: error: {volume.dir}: the store is on a read-only filesystem"
        " (only 'mount --ro' and 'fsck' can open it)"
    ]
    assert not os.path.ismount(spare_mnt)


def test_create_on_read_only_storage_names_the_store_not_its_scratch_dir(tmp_path, volume):
    host = tmp_path / "host"
    host.mkdir()
    subprocess.run(["mount", "--bind", host, host], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", host], check=True)
        done = run_cli("sefs", "create", host / "fs", "--key-file", volume.key_file, check=False)
    finally:
        subprocess.run(["umount", host], check=True)
    assert done.returncode == ExitCode.ERROR, done.stderr
    assert done.stderr.splitlines() == [
        f"occlumfs: error: {host / 'fs'}: cannot create the store: Read-only file system"
    ]
    assert list(host.iterdir()) == []
