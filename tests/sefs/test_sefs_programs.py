"""What unmodified programs rely on, through a real SEFS mount, compared with
what the kernel's own filesystems do (ext4, tmpfs: the oracle)."""

from __future__ import annotations

import os
import stat

import pytest

pytestmark = pytest.mark.fuse


def test_a_setgid_directory_passes_its_group_and_its_bit_down(volume, mount):
    """BSD group semantics (inode_init_owner): shared project directories, /var/mail,
    git's core.sharedRepository all depend on them."""
    with mount(*volume.mount_args()) as mnt:
        shared = mnt / "shared"
        shared.mkdir()
        os.chown(shared, 0, 1234)
        shared.chmod(0o2775)
        (shared / "file").write_text("x")
        (shared / "sub").mkdir(0o755)
        os.symlink("file", shared / "link")
        os.mkfifo(shared / "fifo")
        (mnt / "plain").mkdir()
        (mnt / "plain/file").write_text("y")
        made = {p.name: os.lstat(p) for p in shared.iterdir()}
        assert {name: st.st_gid for name, st in made.items()} == dict.fromkeys(made, 1234)
        assert made["sub"].st_mode & stat.S_ISGID and not made["file"].st_mode & stat.S_ISGID
        assert os.stat(mnt / "plain/file").st_gid == 0
        (shared / "sub/deeper").mkdir()
        deeper = os.stat(shared / "sub/deeper")
        assert deeper.st_gid == 1234 and deeper.st_mode & stat.S_ISGID
    with mount(*volume.mount_args()) as mnt:  # what was recorded, not what the kernel kept
        assert os.stat(mnt / "shared/sub/deeper").st_gid == 1234
        assert os.stat(mnt / "shared/file").st_gid == 1234
