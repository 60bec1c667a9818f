"""A full store disk (issue 6 section 2, SEFS side): buffered data is bounded by the
disk's free space, and ENOSPC reaches a write or the close, never only a log."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from occlumfs.fs import ROOT_INO
from occlumfs.keys import write_key_file
from occlumfs.sefs import Credential, create_sefs
from sefs.helpers import ROOT, Volume, read_path, write_file

DISK = 8 << 20
CHUNK = 128 << 10


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", disk], check=True)
    yield disk
    subprocess.run(["umount", "-l", disk], check=False)


@pytest.fixture
def volume_on_small_disk(small_disk, tmp_path) -> Volume:
    key = write_key_file(tmp_path / "key")
    create_sefs(small_disk / "fs", Credential(key=key), state_dir=tmp_path / "state")
    return Volume(small_disk / "fs", tmp_path / "key", key, tmp_path / "state")


def _free(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_writes_fail_before_more_is_accepted_than_the_disk_holds(volume_on_small_disk):
    volume = volume_on_small_disk
    fs = volume.open()
    free = _free(volume.dir)
    fh, _ = fs.create(ROOT_INO, b"fill", 0o644, os.O_WRONLY, ROOT)
    accepted = 0
    data = os.urandom(CHUNK)
    with pytest.raises(OSError) as err:
        while accepted < 4 * DISK:
            fs.write(fh, accepted, data)
            accepted += CHUNK
    assert err.value.errno == errno.ENOSPC
    assert accepted <= free  # accepted = written out + buffered: never more than fits
    fs.fsync(fh, False)  # ...and all of it is saved: the reserve holds the commit
    fs.release(fh)
    fs.close()
    fs = volume.open()
    assert read_path(fs, "fill") == data * (accepted // CHUNK)
    fs.unlink(ROOT_INO, b"fill")
    fs.close()  # commits without the file and frees its data
    fs = volume.open()
    write_file(fs, ROOT_INO, b"note", b"saved")
    fs.close()
    fs = volume.open()
    assert read_path(fs, "note") == b"saved"
    fs.close()


@pytest.mark.fuse
def test_a_full_disk_fails_the_write_or_the_close_through_a_mount(volume_on_small_disk, mount):
    volume = volume_on_small_disk
    with mount(*volume.mount_args()) as mnt:
        with pytest.raises(OSError) as err, open(mnt / "fill", "wb") as f:
            for _ in range(2 * DISK // CHUNK):  # no fsync: the close must tell at the latest
                f.write(os.urandom(CHUNK))
        assert err.value.errno == errno.ENOSPC
        os.unlink(mnt / "fill")
    with mount(*volume.mount_args()) as mnt:
        (mnt / "note").write_bytes(b"saved")
    with mount(*volume.mount_args()) as mnt:
        assert (mnt / "note").read_bytes() == b"saved"


@pytest.mark.fuse
def test_deleting_a_file_on_a_full_disk_makes_room_at_once(volume_on_small_disk, mount):
    # As on ext4: once rm returns, its space is there to write into, not only
    # after the next timed commit (up to 10 s later) drops the data files.
    volume = volume_on_small_disk
    with mount(*volume.mount_args()) as mnt:
        accepted = 0
        with pytest.raises(OSError) as err, open(mnt / "fill", "wb", buffering=0) as f:
            while accepted < 2 * DISK:
                f.write(os.urandom(CHUNK))
                accepted += CHUNK
        assert err.value.errno == errno.ENOSPC
        os.unlink(mnt / "fill")
        again = os.urandom(DISK // 8)  # refused while the deleted file held the disk
        (mnt / "again").write_bytes(again)
        assert (mnt / "again").read_bytes() == again
    with mount(*volume.mount_args()) as mnt:
        assert (mnt / "again").read_bytes() == again
