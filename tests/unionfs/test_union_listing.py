"""Listings take shortcuts (UnionFS.readdir): over one lower directory an entry the
upper does not hold is shown from the lower's listing alone, a whiteout the upper
holds is skipped without a lookup, and the upper's phase skips the names the lower
phases showed without looking them up again. Whichever way an entry is shown,
a listing shows each visible name once, with what a lookup shows of it, in one
call or resumed from any cookie, and while the directory changes."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest
from conftest import mounted

from occlumfs.fs import AttrChanges, iter_dir
from occlumfs.fs import lookup_path as lp
from occlumfs.keys import write_key_file
from occlumfs.merkle import build_image
from unionfs.helpers import ROOT, create, parent_and_name, write


def _edit(fs) -> None:
    """One change of each kind in "tree" (one lower below it) and "merged" (two)."""
    write(fs, "tree/top", b"longer than it was below\n")  # a copy of the data
    fs.setattr(lp(fs, "tree/a").ino, AttrChanges(mode=0o700))  # a directory's metadata
    fs.unlink(*parent_and_name(fs, "tree/a/b/deep"))  # a whiteout
    create(fs, "tree/new", b"upper only\n")
    fs.mkdir(lp(fs, "tree").ino, b"new-dir", 0o755, ROOT)
    fs.setattr(lp(fs, "merged/from-bottom").ino, AttrChanges(mode=0o600))  # metadata only
    fs.unlink(*parent_and_name(fs, "merged/shared"))
    create(fs, "merged/new", b"upper only\n")


def _listed(fs, ino: int) -> dict[bytes, tuple]:
    shown = {}
    for entry in iter_dir(fs, ino):
        assert entry.name not in shown, f"{entry.name!r} listed twice"
        shown[entry.name] = dataclasses.astuple(entry.attr)
    return shown


def _check_tree(fs, ino: int) -> int:
    """Every listing below ``ino`` shows what lookups and getattr show; how many entries."""
    listed = _listed(fs, ino)
    looked_up = {name: dataclasses.astuple(fs.lookup(ino, name)) for name in listed}
    assert listed == looked_up
    # getattr asks the layers afresh.
    assert {name: dataclasses.astuple(fs.getattr(a[0])) for name, a in listed.items()} == listed
    count = len(listed)
    for name, attr in listed.items():
        if stat.S_ISDIR(attr[1]):
            count += _check_tree(fs, fs.lookup(ino, name).ino)
    return count


def test_a_listing_shows_what_lookups_show(stack):
    fs = stack.fs
    _check_tree(fs, 1)  # the lowers alone: nothing in the upper yet
    assert fs.lookup(1, b"merged").nlink == 1  # merged from two lowers
    _edit(fs)
    count = _check_tree(fs, 1)
    assert set(_listed(fs, lp(fs, "tree").ino)) == {b"a", b"top", b"new", b"new-dir"}
    assert set(_listed(fs, lp(fs, "tree/a/b").ino)) == set()
    assert b"shared" not in _listed(fs, lp(fs, "merged").ino)
    # Again with nothing remembered: the listings come first, then the lookups.
    fs = stack.reopen()
    assert _check_tree(fs, 1) == count


def test_a_listing_resumes_from_every_cookie(stack):
    fs = stack.fs
    _edit(fs)
    for path in ("tree", "merged", "tree/a"):
        ino = lp(fs, path).ino
        fh = fs.opendir(ino)
        try:
            entries = list(fs.readdir(fh, 0))
            names = [e.name for e in entries]
            for i, entry in enumerate(entries):
                assert [e.name for e in fs.readdir(fh, entry.next_offset)] == names[i + 1 :]
        finally:
            fs.releasedir(fh)
        # A handle that never saw the start resumes the same.
        for i, entry in enumerate(entries):
            fh = fs.opendir(ino)
            try:
                assert [e.name for e in fs.readdir(fh, entry.next_offset)] == names[i + 1 :]
            finally:
                fs.releasedir(fh)


def test_a_listing_sees_names_deleted_and_made_meanwhile(stack):
    fs = stack.fs
    _edit(fs)
    tree = lp(fs, "tree").ino
    fh = fs.opendir(tree)
    try:
        entries = list(fs.readdir(fh, 0))  # the upper's names are read and kept
        first = entries[0]
        rest = {e.name for e in entries[1:]}
        assert {b"top", b"new"} <= rest
        fs.unlink(tree, b"top")  # a lower name: now a whiteout in the upper
        fs.unlink(tree, b"new")  # an upper-only name: gone
        create(fs, "tree/newer", b"made during the listing\n")
        resumed = [e.name for e in fs.readdir(fh, first.next_offset)]
    finally:
        fs.releasedir(fh)
    assert sorted(resumed) == sorted(rest - {b"top", b"new"} | {b"newer"})
    # A name only the lower holds, deleted after the upper's names were read.
    a = lp(fs, "tree/a").ino
    fh = fs.opendir(a)
    try:
        entries = list(fs.readdir(fh, 0))
        assert [e.name for e in entries] == [b"b", b"empty"]
        fs.rmdir(a, b"empty")
        assert list(fs.readdir(fh, entries[0].next_offset)) == []
    finally:
        fs.releasedir(fh)


def _wide_tree(root: Path, names: int) -> None:
    (root / "wide").mkdir(parents=True)
    for i in range(names):
        (root / "wide" / f"entry-{i:04d}").write_bytes(b"%d\n" % i)
    (root / "wide" / "sub").mkdir()
    (root / "wide" / "sub" / "inside").write_bytes(b"inside\n")


@pytest.mark.fuse
def test_a_wide_merged_directory_lists_once_through_fuse(tmp_path):
    # Far more entries than one readdir request carries: the kernel resumes the
    # listing many times, in the lower's phase and in the upper's.
    _wide_tree(tmp_path / "tree", 1500)
    image = tmp_path / "wide.img"
    digest = build_image(tmp_path / "tree", image)
    key = tmp_path / "upper.key"
    write_key_file(key)
    args = [
        *("--type", "union", "--lower", image, "--digest", digest),
        *("--key-file", key, "--state-dir", tmp_path / "state"),
    ]
    upper, mnt = tmp_path / "upper", tmp_path / "mnt"
    want: dict[str, tuple[int, int]] = {}  # name -> (permission bits, size)
    with mounted(upper, mnt, *args):
        wide = mnt / "wide"
        for i in range(1500):
            path = wide / f"entry-{i:04d}"
            size = len(b"%d\n" % i)
            if i % 10 == 0:
                with open(path, "ab") as f:  # a copy of the data
                    f.write(b"more\n")
                want[path.name] = (0o644, size + 5)
            elif i % 10 == 5:
                path.unlink()  # a whiteout
            elif i % 10 == 7:
                path.chmod(0o600)  # a copy of the metadata
                want[path.name] = (0o600, size)
            else:
                want[path.name] = (0o644, size)
        for k in range(200):
            (wide / f"upper-{k:03d}").write_bytes(b"new\n")
            want[f"upper-{k:03d}"] = (0o644, 4)
        want["sub"] = (0o755, 0)
    # A new server and a new kernel cache: every entry comes from readdir.
    with mounted(upper, mnt, *args):
        seen = [(e.name, e.inode()) for e in os.scandir(mnt / "wide")]
        assert len(seen) == len({name for name, _ in seen}), "a name listed twice"
        assert {name for name, _ in seen} == set(want)
        for name, ino in seen:
            st = os.lstat(mnt / "wide" / name)
            assert st.st_ino == ino, name
            if name != "sub":
                assert (stat.S_IMODE(st.st_mode), st.st_size) == want[name], name
        assert os.listdir(mnt / "wide" / "sub") == ["inside"]
