"""What the kernel's side of a union needs: inodes it forgets are dropped (memory
stays bounded) without changing anything it sees again, and file times the
kernel keeps (writeback cache) survive a remount."""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path

import pytest
from conftest import mounted

from occlumfs.errors import FSError
from occlumfs.fs import ROOT_INO, AttrChanges, Caller, iter_dir, lookup_path
from occlumfs.keys import write_key_file
from occlumfs.memfs import MemFS
from occlumfs.merkle import build_image
from occlumfs.unionfs import Lower, open_union
from occlumfs.unionfs.fs import UnionFS
from unionfs.helpers import Stack, read

ROOT = Caller()


def _shown(fs, path: str) -> tuple:
    a = lookup_path(fs, path)
    return (a.ino, a.mode, a.nlink, a.size, a.mtime_ns, a.ctime_ns, read(fs, path))


def _forget_all(fs) -> None:
    for ino, n in list(fs._lookups.items()):
        fs.forget(ino, n)


def test_forgotten_files_are_dropped_and_come_back_the_same(stack):
    fs = stack.fs
    fs.setattr(lookup_path(fs, "low-only").ino, AttrChanges(mode=0o600))  # a metadata-only copy
    fh = fs.open(lookup_path(fs, "both").ino, os.O_WRONLY)
    fs.write(fh, 0, b"written")
    fs.release(fh)
    paths = ["low-only", "both", "merged/shared", "merged/hl-b", "hl-a", "meta", "link"]
    before = {p: _shown(fs, p) for p in paths if p != "link"}
    listed = {e.name: e.attr.ino for e in iter_dir(fs, lookup_path(fs, "merged").ino)}
    files = {before[p][0] for p in before}
    assert files <= set(fs._nodes)
    _forget_all(fs)
    assert not files & set(fs._nodes), "forgotten files stay in the table"
    assert lookup_path(fs, "merged").ino in fs._nodes  # directories stay
    assert {p: _shown(fs, p) for p in before} == before
    again = {e.name: e.attr.ino for e in iter_dir(fs, lookup_path(fs, "merged").ino)}
    assert again == listed
    assert fs.readlink(lookup_path(fs, "link").ino) == b"low-only"


def test_a_file_open_when_forgotten_stays_until_released(stack):
    fs = stack.fs
    ino = fs.lookup(ROOT_INO, b"big").ino
    fh = fs.open(ino, os.O_RDONLY)
    first = fs.read(fh, 0, 4096)
    fs.forget(ino, 1)
    assert ino in fs._nodes
    assert fs.read(fh, 0, 4096) == first
    # Written through another open while the first is still reading: a copy-up.
    wfh = fs.open(ino, os.O_WRONLY)
    fs.write(wfh, 0, b"X" * 10)
    fs.release(wfh)
    assert fs.read(fh, 0, 10) == b"X" * 10
    fs.release(fh)
    assert ino not in fs._nodes
    assert fs.lookup(ROOT_INO, b"big").ino == ino
    assert read(fs, "big")[:10] == b"X" * 10


def test_counts_add_up_over_lookups_listings_and_new_entries(stack):
    fs = stack.fs
    ino = fs.lookup(ROOT_INO, b"low-only").ino
    fs.lookup(ROOT_INO, b"low-only")
    list(iter_dir(fs, ROOT_INO))  # lists it once more
    fs.forget(ino, 2)
    assert ino in fs._nodes, "dropped while the kernel still holds a reference"
    fs.forget(ino, 1)
    assert ino not in fs._nodes
    fh, attr = fs.create(ROOT_INO, b"new", 0o644, os.O_WRONLY, ROOT)
    fs.write(fh, 0, b"new data")
    fs.release(fh)
    link = fs.link(attr.ino, ROOT_INO, b"new-link")
    assert link.ino == attr.ino and link.nlink == 2
    fs.forget(attr.ino, 1)
    assert attr.ino in fs._nodes
    fs.forget(attr.ino, 1)
    assert attr.ino not in fs._nodes
    assert fs.lookup(ROOT_INO, b"new-link").nlink == 2
    assert read(fs, "new") == b"new data"


# Through FUSE ---------------------------------------------------------------------------


def _times(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns


@pytest.mark.fuse
def test_file_times_the_kernel_kept_survive_a_remount(layers, tmp_path):
    stack = Stack(layers, tmp_path)
    mnt = tmp_path / "mnt"
    args = (*stack.lower_args(), *stack.secret_args())
    shown = {}
    with mounted(stack.upper, mnt, *args):
        (mnt / "d").mkdir()
        for i in range(12):
            path = mnt / "d" / f"f{i:02d}"
            with open(path, "wb") as f:
                for k in range(1 + i % 3):
                    f.write(os.urandom(1000 + 4096 * k))
            if i % 3 == 0:
                os.chmod(path, 0o600)
        # Lower files: written (a copy-up), truncated, appended to.
        with open(mnt / "low-only", "ab") as f:
            f.write(b"appended\n")
        with open(mnt / "big", "r+b") as f:
            f.truncate(4096)
        with open(mnt / "merged/from-bottom", "r+b") as f:
            f.write(b"BOTTOM")
        names = [f"d/f{i:02d}" for i in range(12)] + ["low-only", "big", "merged/from-bottom"]
        shown = {name: _times(mnt / name) for name in names}
        assert {name: _times(mnt / name) for name in names} == shown
    with mounted(stack.upper, mnt, *args):
        after = {name: _times(mnt / name) for name in shown}
    assert after == shown


@pytest.mark.fuse
def test_what_the_kernel_forgets_it_finds_again_unchanged(layers, tmp_path):
    stack = Stack(layers, tmp_path)
    mnt = tmp_path / "mnt"
    with mounted(stack.upper, mnt, *stack.lower_args(), *stack.secret_args()):
        os.chmod(mnt / "low-only", 0o600)
        (mnt / "hl-a").write_bytes(b"through one name\n")
        names = [str(p.relative_to(mnt)) for p in sorted(mnt.rglob("*"))]
        before = {n: os.lstat(mnt / n) for n in names}
        with open(mnt / "big", "rb") as held:
            Path("/proc/sys/vm/drop_caches").write_text("2\n")  # the kernel forgets inodes
            assert len(held.read()) == 3 << 20
        after = {n: os.lstat(mnt / n) for n in names}
        assert (mnt / "merged/hl-b").read_bytes() == b"through one name\n"
    fields = ("st_ino", "st_mode", "st_nlink", "st_size", "st_mtime_ns", "st_ctime_ns")
    for n in names:
        assert [getattr(after[n], f) for f in fields] == [getattr(before[n], f) for f in fields], n


def test_facts_the_union_states_from_its_layers(stack, tmp_path):
    # Names and attributes stay true as long as the (immutable) lowers say.
    assert stack.fs.info.cache_timeout == min(lo.info.cache_timeout for lo in stack.fs.lowers)
    assert stack.fs.info.cache_timeout > stack.fs.upper.info.cache_timeout
    # Over a lower without xattrs: none to show, until one is set through the union.
    tree = tmp_path / "plain"
    tree.mkdir()
    (tree / "f").write_bytes(b"plain\n")
    image = tmp_path / "plain.img"
    digest = build_image(tree, image)
    key = write_key_file(tmp_path / "k")
    fs = open_union([Lower(image, digest)], tmp_path / "up", key=key, create=True)
    try:
        assert not fs.lowers[0].info.has_xattrs
        ino = fs.lookup(ROOT_INO, b"f").ino
        with pytest.raises(FSError) as caught:
            fs.getxattr(ino, b"security.selinux")
        assert caught.value.errno == errno.ENODATA
        fs.setxattr(ino, b"user.k", b"v")
        assert fs.getxattr(ino, b"user.k") == b"v"
        assert read(fs, "f") == b"plain\n"
    finally:
        fs.close()


def test_the_union_is_exclusive_only_when_each_layer_is(stack):
    # Images never change and the upper's store is locked to the union: the
    # kernel may keep pages and negative entries (see FsInfo.exclusive).
    assert stack.fs.info.exclusive and stack.fs.upper.info.exclusive
    shared = MemFS("changed-elsewhere")
    shared.info = dataclasses.replace(shared.info, exclusive=False)
    union = UnionFS([shared], MemFS("upper"), digests=["0" * 64])
    assert not union.info.exclusive
    assert union.info.cache_timeout == union.upper.info.cache_timeout


def test_a_listing_in_progress_shows_entries_copied_up_meanwhile(stack):
    fs = stack.fs
    tree = lookup_path(fs, "tree").ino
    fs.release(fs.create(tree, b"new", 0o644, os.O_WRONLY, ROOT)[0])  # tree is in the upper now
    fh = fs.opendir(tree)
    try:
        first = {e.name: e.attr.size for e in fs.readdir(fh, 0)}
        assert first[b"top"] == len(b"bottom: tree/top\n")
        wfh = fs.open(lookup_path(fs, "tree/top").ino, os.O_WRONLY | os.O_TRUNC)
        fs.write(wfh, 0, b"now longer than it was below\n")
        fs.release(wfh)
        again = {e.name: e.attr.size for e in fs.readdir(fh, 0)}
    finally:
        fs.releasedir(fh)
    assert again[b"top"] == len(b"now longer than it was below\n")
    assert set(again) == set(first)
