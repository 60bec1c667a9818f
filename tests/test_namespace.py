"""The namespace core (occlumfs/namespace.py) as MemFS and SEFS both use it."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from sefs.helpers import make_volume

from occlumfs.errors import FSError
from occlumfs.fs import ROOT_INO, AttrChanges, Caller, iter_dir
from occlumfs.memfs import MemFS

ME = Caller(uid=0, gid=0)


@pytest.fixture(params=["memfs", "sefs"])
def fs(request, tmp_path):
    if request.param == "memfs":
        yield MemFS()
        return
    subject = make_volume(tmp_path / "vol").open()
    yield subject
    subject.close()


def _spoil(attr) -> None:
    attr.ino, attr.mode, attr.nlink, attr.size, attr.mtime_ns = 999, 0, 77, 12345, 1


def test_attributes_cross_the_contract_as_values(fs):
    """A caller (a union rewriting st_ino) may change what it got without changing the fs."""
    fh, made = fs.create(ROOT_INO, b"f", 0o640, os.O_WRONLY, ME)
    ino = made.ino
    fs.write(fh, 0, b"hello")
    fs.release(fh)
    d = fs.mkdir(ROOT_INO, b"d", 0o750, ME)
    before = {name: fs.lookup(ROOT_INO, name) for name in (b"f", b"d")}
    for attr in (
        made,
        d,
        fs.getattr(ino),
        fs.lookup(ROOT_INO, b"f"),
        fs.lookup(d.ino, b".."),
        fs.setattr(ino, AttrChanges(mode=0o600)),
        *(entry.attr for entry in iter_dir(fs, ROOT_INO)),
    ):
        _spoil(attr)
    after = {name: fs.lookup(ROOT_INO, name) for name in (b"f", b"d")}
    assert after[b"d"] == before[b"d"]
    f = after[b"f"]
    assert (f.ino, f.size, f.nlink, stat.S_IMODE(f.mode)) == (ino, 5, 1, 0o600)
    assert fs.getattr(ROOT_INO).ino == ROOT_INO and fs.getattr(ROOT_INO).nlink == 3


def test_link_names_an_existing_target_before_an_unlinked_source(fs):
    fh, attr = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, ME)
    fs.mknod(ROOT_INO, b"taken", stat.S_IFREG | 0o644, 0, ME)
    fs.unlink(ROOT_INO, b"f")
    for name, code in ((b"taken", errno.EEXIST), (b"free", errno.ENOENT)):
        with pytest.raises(FSError) as info:
            fs.link(attr.ino, ROOT_INO, name)
        assert info.value.errno == code
    fs.release(fh)


def test_rename_rules_are_the_same_for_both(fs):
    a = fs.mkdir(ROOT_INO, b"a", 0o755, ME)
    b = fs.mkdir(a.ino, b"b", 0o755, ME)
    fs.mknod(ROOT_INO, b"file", stat.S_IFREG | 0o644, 0, ME)
    cases = [
        ((ROOT_INO, b"a", b.ino, b"x"), errno.EINVAL),  # into its own subtree
        ((ROOT_INO, b"file", ROOT_INO, b"a"), errno.EISDIR),
        ((a.ino, b"b", ROOT_INO, b"file"), errno.ENOTDIR),
        ((ROOT_INO, b"file", ROOT_INO, b"x/y"), errno.EINVAL),
        ((ROOT_INO, b"file", ROOT_INO, b"n" * 256), errno.ENAMETOOLONG),
    ]
    for args, code in cases:
        with pytest.raises(FSError) as info:
            fs.rename(*args)
        assert info.value.errno == code, args
    fs.rename(a.ino, b"b", ROOT_INO, b"b")
    assert fs.getattr(a.ino).nlink == 2 and fs.getattr(ROOT_INO).nlink == 4
    assert fs.lookup(b.ino, b"..").ino == ROOT_INO


def test_writes_keep_the_kernels_times_once_it_keeps_them(fs):
    fh, attr = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, ME)
    fs.write(fh, 0, b"stamped")
    stamped = fs.getattr(attr.ino)
    assert stamped.mtime_ns >= attr.mtime_ns and stamped.size == 7
    fs.kernel_keeps_file_times()  # as the adapter does when it enables the writeback cache
    kernel = AttrChanges(mtime_ns=1_000_000_007, ctime_ns=2_000_000_011)
    fs.setattr(attr.ino, kernel)
    fs.write(fh, 7, b" later")  # may reach us after the kernel's setattr
    got = fs.getattr(attr.ino)
    assert (got.mtime_ns, got.ctime_ns, got.size) == (1_000_000_007, 2_000_000_011, 13)
    fs.setattr(attr.ino, AttrChanges(mode=0o600))  # no ctime given: the time of the change
    assert fs.getattr(attr.ino).ctime_ns > 2_000_000_011
    fs.release(fh)
