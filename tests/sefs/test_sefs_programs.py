"""What unmodified programs rely on, through a real SEFS mount, compared with
what the kernel's own filesystems do (ext4, tmpfs: the oracle)."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from occlumfs.fs import ROOT_INO
from occlumfs.sefs import format as fmt
from sefs.helpers import ROOT


@pytest.mark.fuse
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


def test_a_sparse_file_written_at_both_ends_records_only_the_chunks_it_changed(volume):
    """A raw disk image or a database written at its head and far past it: the write-out
    of one batch holding both blocks marked every map chunk between them as changed
    (65536 here; at 1 PiB apart the commit never ended and memory grew without bound)."""
    far = 1 << 36  # 64 GiB
    fs = volume.open()
    fh, attr = fs.create(ROOT_INO, b"disk.img", 0o644, os.O_RDWR, ROOT)
    fs.write(fh, 0, b"head")
    fs.write(fh, far, b"tail")
    fs._io.flush_all()  # both blocks go out in one batch
    changed = {key for key in fs._dirty_keys if key[:1] == b"m"}
    far_chunk = (far // fmt.BLOCK_SIZE) >> fmt.CHUNK_SHIFT
    assert changed == {fmt.map_key(attr.ino, 0), fmt.map_key(attr.ino, far_chunk)}
    fs.release(fh)
    fs.close()
    fs = volume.open(read_only=True)
    fh = fs.open(attr.ino, os.O_RDONLY)
    assert fs.getattr(attr.ino).size == far + 4
    assert fs.read(fh, 0, 8) == b"head" + bytes(4)
    assert fs.read(fh, far - 4, 100) == bytes(4) + b"tail"
    fs.release(fh)
    fs.close()


@pytest.mark.fuse
def test_a_write_past_the_largest_file_fails_alone_and_the_store_still_commits(volume, mount):
    """A write no host could store (ext4 stops at 16 TiB) is refused EFBIG up front, as a
    kernel filesystem refuses it at its limit; before, the block stayed buffered, every
    later commit failed with it and the unmount lost every file's unsynced changes."""
    limit = fmt.MAX_FILE_SIZE
    with mount(*volume.mount_args()) as mnt:
        fd = os.open(mnt / "huge", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with pytest.raises(OSError) as refused:
                os.pwrite(fd, b"x", 1 << 44)
                os.fsync(fd)  # the writeback cache may take the write and fail it here
            assert refused.value.errno == errno.EFBIG
            assert os.pwrite(fd, b"abcd", limit - 2) in (2, 4)  # what fits is written
            os.fsync(fd)
            with pytest.raises(OSError) as cut:
                os.truncate(mnt / "huge", limit + 1)
            assert cut.value.errno == errno.EFBIG
        finally:
            os.close(fd)
        (mnt / "other").write_text("saved")
        os.sync()
    with mount(*volume.mount_args()) as mnt:  # the unmount above committed everything
        assert (mnt / "other").read_text() == "saved"
        # (The kernel's writeback cache had taken the refused write's size as its own.)
        assert os.stat(mnt / "huge").st_size == limit
        with open(mnt / "huge", "rb") as f:
            f.seek(limit - 2)
            assert f.read() == b"ab"
