"""Each union rule of docs/unionfs.md, in-process, on an entry that is lower-only,
upper-only, in both layers, whited out, and under an opaque directory.

Every change is checked again after the union is closed and reopened: what
the union records lives in the upper and survives.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest

from occlumfs.fs import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, AttrChanges
from occlumfs.fs import lookup_path as lp
from occlumfs.unionfs import LayerMismatchError, Lower, open_union
from unionfs.helpers import (
    ROOT,
    create,
    errno_of,
    exists,
    listing,
    parent_and_name,
    read,
    rename,
    write,
)

# The entries the rules distinguish, by where they live, and what they hold.
LOWER_ONLY = "low-only"  # bottom layer only
IN_BOTH = "both"  # both lowers: the top one shows
UNDER_OPAQUE = "opaque/shown"  # in a directory the top layer made opaque
MERGED = "merged/shared"  # in a directory both lowers hold
WANT = {
    LOWER_ONLY: b"bottom: low-only\n",
    IN_BOTH: b"top: both\n",
    UNDER_OPAQUE: b"top: opaque/shown\n",
    MERGED: b"top: merged/shared\n",
}
MERGED_LISTING = [b"from-bottom", b"from-top", b"hl-b", b"shared", b"sub-bottom"]


def now_and_after_remount(stack):
    yield stack.fs
    yield stack.reopen()


def _make_upper_only(fs) -> str:
    create(fs, "upper-only", b"upper: upper-only\n")
    return "upper-only"


def test_lookup_goes_top_down(stack):
    fs = stack.fs
    for path, data in WANT.items():
        assert read(fs, path) == data, path
    assert read(fs, "merged/from-bottom") == b"bottom: merged/from-bottom\n"
    assert read(fs, "merged/from-top") == b"top: merged/from-top\n"


def test_whiteouts_and_opaque_directories_hide_what_is_below(stack):
    fs = stack.fs
    for gone in ("deleted-file", "deleted-dir", "deleted-dir/inside", "opaque/hidden"):
        assert not exists(fs, gone), gone
    assert listing(fs, "opaque") == [b"shown"]
    assert listing(fs, "merged") == MERGED_LISTING
    root = listing(fs)
    assert b"deleted-file" not in root and b"deleted-dir" not in root
    assert b".occlumfs-union" not in root
    assert root == sorted(set(root)), "each name once"


def test_a_union_shows_the_top_layers_root_and_hides_its_own_marks(stack):
    fs = stack.fs
    assert fs.listxattr(lp(fs, "opaque").ino) == []
    assert errno_of(fs.getxattr, lp(fs, "opaque").ino, b"trusted.overlay.opaque") == errno.ENODATA
    meta = lp(fs, "meta").ino
    for name in (b"trusted.overlay.opaque", b"trusted.occlumfs.origin"):
        assert errno_of(fs.setxattr, meta, name, b"y") == errno.EPERM
    assert errno_of(fs.mkdir, 1, b".occlumfs-union", 0o755, ROOT) == errno.EPERM
    assert errno_of(fs.mknod, 1, b"dev", stat.S_IFCHR | 0o600, 0, ROOT) == errno.EPERM


@pytest.mark.parametrize("where", [LOWER_ONLY, IN_BOTH, UNDER_OPAQUE, MERGED, "upper-only"])
def test_write_copies_up_and_survives_remount(stack, where):
    fs = stack.fs
    if where == "upper-only":
        _make_upper_only(fs)
    ino = lp(fs, where).ino
    before = read(fs, where)
    write(fs, where, b"CHANGED", offset=2, flags=os.O_RDWR)
    want = before[:2] + b"CHANGED" + before[9:]
    assert read(fs, where) == want
    fs = stack.reopen()
    assert read(fs, where) == want and lp(fs, where).ino == ino


@pytest.mark.parametrize("where", [LOWER_ONLY, IN_BOTH, UNDER_OPAQUE, MERGED, "upper-only"])
def test_unlink_leaves_nothing_visible(stack, where):
    fs = stack.fs
    if where == "upper-only":
        _make_upper_only(fs)
    parent, name = parent_and_name(fs, where)
    fs.unlink(parent, name)
    assert not exists(fs, where)
    assert name not in listing(fs, where.rpartition("/")[0])
    fs = stack.reopen()
    assert not exists(fs, where)
    # A name created over the whiteout is a new, upper-only file.
    create(fs, where, b"new\n")
    assert read(fs, where) == b"new\n"
    fs = stack.reopen()
    assert read(fs, where) == b"new\n"
    assert listing(fs, where.rpartition("/")[0]).count(name) == 1


@pytest.mark.parametrize("where", ["deleted-file", "deleted-dir", "opaque/hidden"])
def test_hidden_names_can_be_created_and_hide_the_lower_for_good(stack, where):
    fs = stack.fs
    parent, name = parent_and_name(fs, where)
    assert errno_of(fs.unlink, parent, name) == errno.ENOENT
    fs.mkdir(parent, name, 0o755, ROOT)
    assert listing(fs, where) == [], "a directory made over a deleted one is opaque"
    fs = stack.reopen()
    assert listing(fs, where) == []


def test_create_over_a_whiteout_made_in_this_upper(stack):
    fs = stack.fs
    fs.rmdir(*parent_and_name(fs, "merged/sub-bottom"))
    fs.mkdir(*parent_and_name(fs, "merged/sub-bottom"), 0o700, ROOT)
    assert listing(fs, "merged/sub-bottom") == []
    fs.unlink(*parent_and_name(fs, "merged/shared"))
    fs.mkdir(*parent_and_name(fs, "merged/shared"), 0o700, ROOT)
    assert stat.S_ISDIR(lp(fs, "merged/shared").mode)
    fs = stack.reopen()
    assert stat.S_ISDIR(lp(fs, "merged/shared").mode)


def test_rmdir_of_a_merged_directory_once_its_visible_children_are_gone(stack):
    fs = stack.fs
    merged = lp(fs, "merged").ino
    assert errno_of(fs.rmdir, 1, b"merged") == errno.ENOTEMPTY
    for name in listing(fs, "merged"):
        if stat.S_ISDIR(lp(fs, f"merged/{name.decode()}").mode):
            fs.rmdir(merged, name)
        else:
            fs.unlink(merged, name)
    assert listing(fs, "merged") == []
    fs.rmdir(1, b"merged")
    assert not exists(fs, "merged")
    fs = stack.reopen()
    assert not exists(fs, "merged")
    fs.mkdir(1, b"merged", 0o755, ROOT)
    assert listing(fs, "merged") == []


@pytest.mark.parametrize("where", [LOWER_ONLY, IN_BOTH, UNDER_OPAQUE, MERGED])
def test_rename_of_lower_files_keeps_data_and_inode(stack, where):
    fs = stack.fs
    ino = lp(fs, where).ino
    rename(fs, where, "merged/moved-here")
    assert not exists(fs, where)
    assert read(fs, "merged/moved-here") == WANT[where]
    assert lp(fs, "merged/moved-here").ino == ino
    fs = stack.reopen()
    assert not exists(fs, where) and read(fs, "merged/moved-here") == WANT[where]
    assert lp(fs, "merged/moved-here").ino == ino


def test_rename_of_a_populated_lower_directory_into_another(stack):
    fs = stack.fs
    inos = {p: lp(fs, p).ino for p in ("tree", "tree/a", "tree/a/b/deep")}
    fs.mkdir(1, b"elsewhere", 0o755, ROOT)
    rename(fs, "tree", "elsewhere/moved")
    rename(fs, "elsewhere/moved/a", "merged/a-moved")  # a lower dir inside a moved one
    for fs in now_and_after_remount(stack):
        assert not exists(fs, "tree")
        assert listing(fs, "elsewhere/moved") == [b"top"]
        assert read(fs, "elsewhere/moved/top") == b"bottom: tree/top\n"
        assert listing(fs, "merged/a-moved") == [b"b", b"empty"]
        assert read(fs, "merged/a-moved/b/deep") == b"bottom: tree/a/b/deep\n"
        assert lp(fs, "elsewhere/moved").ino == inos["tree"]
        assert lp(fs, "merged/a-moved").ino == inos["tree/a"]
        assert lp(fs, "merged/a-moved/b/deep").ino == inos["tree/a/b/deep"]
    # The old name is free, and a directory made there does not see the old contents.
    fs.mkdir(1, b"tree", 0o755, ROOT)
    assert listing(fs, "tree") == []
    # Moving it back brings the contents back where they were.
    fs.rmdir(1, b"tree")
    rename(fs, "elsewhere/moved", "tree")
    assert read(fs, "tree/top") == b"bottom: tree/top\n"


def test_rename_merged_directory_over_an_emptied_one(stack):
    fs = stack.fs
    fs.unlink(*parent_and_name(fs, "opaque/shown"))
    rename(fs, "merged", "opaque")
    assert listing(fs, "opaque") == MERGED_LISTING
    assert not exists(fs, "merged")
    fs = stack.reopen()
    assert read(fs, "opaque/shared") == b"top: merged/shared\n"


def test_rename_flags(stack):
    fs = stack.fs
    _make_upper_only(fs)
    flags_eexist = errno_of(rename, fs, LOWER_ONLY, IN_BOTH, RENAME_NOREPLACE)
    assert flags_eexist == errno.EEXIST
    assert errno_of(rename, fs, LOWER_ONLY, "nowhere", RENAME_EXCHANGE) == errno.ENOENT
    # RENAME_WHITEOUT is refused, as overlayfs refuses it.
    assert errno_of(rename, fs, LOWER_ONLY, "elsewhere", RENAME_WHITEOUT) == errno.EINVAL
    ino_low, ino_dir = lp(fs, LOWER_ONLY).ino, lp(fs, "tree").ino
    rename(fs, LOWER_ONLY, "tree", RENAME_EXCHANGE)
    for fs in now_and_after_remount(stack):
        assert read(fs, "tree") == WANT[LOWER_ONLY] and lp(fs, "tree").ino == ino_low
        assert listing(fs, LOWER_ONLY) == [b"a", b"top"]
        assert lp(fs, LOWER_ONLY).ino == ino_dir
    rename(fs, "upper-only", "merged/shared", RENAME_EXCHANGE)
    assert read(fs, "upper-only") == WANT[MERGED]
    assert read(fs, "merged/shared") == b"upper: upper-only\n"


def test_metadata_changes_copy_no_data_and_keep_the_rest(stack):
    fs = stack.fs
    before = lp(fs, "meta")
    fs.setattr(before.ino, AttrChanges(mode=0o640))
    fs.setxattr(before.ino, b"user.shape", b"round")
    after = lp(fs, "meta")
    assert after.ino == before.ino and stat.S_IMODE(after.mode) == 0o640
    assert (after.uid, after.gid) == (1234, 5678)
    assert after.mtime_ns == 2_000_000_456 and after.atime_ns == before.atime_ns
    assert sorted(fs.listxattr(after.ino)) == [b"user.colour", b"user.shape"]
    # The upper holds the metadata, the data stays below until a write.
    upper_attr = fs.upper.getattr(fs._nodes[after.ino].upper)
    assert upper_attr.blocks == 0 and upper_attr.size == before.size
    big = lp(fs, "big")
    fs.setattr(big.ino, AttrChanges(uid=42, gid=43, atime_ns=5, mtime_ns=6))
    assert fs.upper.getattr(fs._nodes[big.ino].upper).blocks == 0
    fs = stack.reopen()
    assert read(fs, "meta") == b"bottom: meta\n"
    assert lp(fs, "big").uid == 42 and lp(fs, "big").mtime_ns == 6
    assert len(read(fs, "big")) == 3 << 20


def test_data_copy_up_keeps_owner_times_xattrs_and_holes(stack):
    fs = stack.fs
    before = lp(fs, "meta")
    write(fs, "meta", b"B", flags=os.O_RDWR)
    after = lp(fs, "meta")
    assert (after.ino, after.uid, after.gid, after.mode) == (
        before.ino,
        before.uid,
        before.gid,
        before.mode,
    )
    assert fs.getxattr(after.ino, b"user.colour") == b"blue"
    assert read(fs, "meta") == b"Bottom: meta\n"
    sparse = lp(fs, "sparse")
    fs.setattr(sparse.ino, AttrChanges(size=sparse.size + 1))  # a truncate copies the data
    fs = stack.reopen()
    sparse = lp(fs, "sparse")
    assert sparse.blocks * 512 <= 2 * 4096, "holes stay holes in the upper"
    data = read(fs, "sparse")
    assert data[:5] == b"start" and data[-5:] == b"end!\0" and data[5:-5].count(0) == len(data) - 10


def test_truncate_of_a_lower_file_copies_only_what_stays(stack):
    fs = stack.fs
    fs.setattr(lp(fs, "big").ino, AttrChanges(size=10))
    assert fs.upper.getattr(fs._nodes[lp(fs, "big").ino].upper).blocks <= 8
    assert len(read(fs, "big")) == 10
    fh = fs.open(lp(fs, IN_BOTH).ino, os.O_WRONLY | os.O_TRUNC)
    fs.release(fh)
    assert read(fs, IN_BOTH) == b""


def test_inode_numbers_stay_across_copy_up_rename_and_remount(stack):
    fs = stack.fs
    paths = [LOWER_ONLY, IN_BOTH, MERGED, "merged", "link", "tree/a"]
    inos = {p: lp(fs, p).ino for p in paths}
    assert len(set(inos.values())) == len(inos)
    fs.setattr(inos["link"], AttrChanges(uid=7))
    fs.setattr(inos["merged"], AttrChanges(mode=0o700))
    write(fs, IN_BOTH, b"x")
    fs = stack.reopen()
    assert {p: lp(fs, p).ino for p in paths} == inos
    # Entries made in the upper keep their numbers too, and never collide.
    _make_upper_only(fs)
    new = lp(fs, "upper-only").ino
    fs = stack.reopen()
    assert lp(fs, "upper-only").ino == new and new not in inos.values()


def test_hard_links_share_the_inode_and_count(stack):
    fs = stack.fs
    ino = lp(fs, LOWER_ONLY).ino
    fs.link(ino, lp(fs, "merged").ino, b"second")
    assert lp(fs, "merged/second").ino == ino
    assert lp(fs, LOWER_ONLY).nlink == lp(fs, "merged/second").nlink == 2
    write(fs, "merged/second", b"LINKED")
    assert read(fs, LOWER_ONLY).startswith(b"LINKED")
    fs = stack.reopen()
    assert lp(fs, LOWER_ONLY).ino == lp(fs, "merged/second").ino == ino
    fs.unlink(1, LOWER_ONLY.encode())
    assert lp(fs, "merged/second").nlink == 1


def test_symlinks_and_devices_copy_up(stack):
    fs = stack.fs
    link = lp(fs, "link")
    fs.setattr(link.ino, AttrChanges(uid=99))
    assert fs.readlink(link.ino) == b"low-only" and lp(fs, "link").uid == 99
    fs = stack.reopen()
    assert fs.readlink(lp(fs, "link").ino) == b"low-only" and lp(fs, "link").uid == 99


def test_listing_cookies_survive_additions_and_removals(stack):
    fs = stack.fs
    for i in range(20):
        create(fs, f"merged/new-{i:02d}", b"")
    fh = fs.opendir(lp(fs, "merged").ino)
    try:
        entries = list(fs.readdir(fh, 0))
        names = [e.name for e in entries]
        assert len(names) == len(set(names)) == 25
        # Resume from every cookie: exactly the rest, in the same order.
        for i, entry in enumerate(entries):
            assert [e.name for e in fs.readdir(fh, entry.next_offset)] == names[i + 1 :]
        # Remove listed and unlisted entries and add some; resuming in the
        # middle still lists each unchanged entry once.
        middle = 10
        cookie = entries[middle].next_offset
        removed = {names[0], names[middle + 1], names[-1]}
        merged = lp(fs, "merged").ino
        for name in removed:
            fs.unlink(merged, name)
        create(fs, "merged/added", b"")
        rest = [e.name for e in fs.readdir(fh, cookie)]
        unchanged = [n for n in names[middle + 1 :] if n not in removed]
        assert [n for n in rest if n != b"added"] == unchanged
    finally:
        fs.releasedir(fh)


def test_a_listing_in_progress_survives_copy_up(stack):
    fs = stack.fs
    fh = fs.opendir(lp(fs, "merged").ino)
    try:
        first = next(iter(fs.readdir(fh, 0)))
        for name in listing(fs, "merged"):
            fs.setattr(lp(fs, f"merged/{name.decode()}").ino, AttrChanges(mode=0o700))
        rest = [e.name for e in fs.readdir(fh, first.next_offset)]
        assert sorted([first.name, *rest]) == listing(fs, "merged")
    finally:
        fs.releasedir(fh)


def test_read_only_union_refuses_changes(stack):
    stack.fs.close()
    fs = stack.open(read_only=True)
    assert errno_of(fs.setattr, lp(fs, LOWER_ONLY).ino, AttrChanges(mode=0)) == errno.EROFS
    assert errno_of(fs.open, lp(fs, LOWER_ONLY).ino, os.O_WRONLY) == errno.EROFS
    assert read(fs, LOWER_ONLY) == WANT[LOWER_ONLY]


def test_changing_an_unlinked_lower_file_does_not_bring_its_name_back(stack):
    # The kernel flushes cached times of a file after unlinking it (a setattr);
    # an open file stays usable after its name is gone.
    fs = stack.fs
    ino = lp(fs, MERGED).ino
    fh = fs.open(ino, os.O_RDONLY)
    fs.unlink(*parent_and_name(fs, MERGED))
    fs.setattr(ino, AttrChanges(mtime_ns=123))
    assert not exists(fs, MERGED) and b"shared" not in listing(fs, "merged")
    assert fs.read(fh, 0, 100) == WANT[MERGED]
    fs.release(fh)
    fh = fs.open(ino, os.O_RDWR)
    fs.write(fh, 0, b"TOP")
    assert fs.read(fh, 0, 100) == b"TOP" + WANT[MERGED][3:]
    fs.release(fh)
    assert not exists(fs, MERGED)
    fs = stack.reopen()
    assert not exists(fs, MERGED) and b"shared" not in listing(fs, "merged")


def _nlinks(fs, *paths):
    return [(lp(fs, p).ino, lp(fs, p).nlink) for p in paths]


def test_lower_hard_links_stay_one_inode_through_every_change(stack):
    fs = stack.fs
    ino = lp(fs, "hl-a").ino
    assert _nlinks(fs, "hl-a", "merged/hl-b") == [(ino, 2)] * 2
    fs.setattr(ino, AttrChanges(mode=0o600))
    assert stat.S_IMODE(lp(fs, "merged/hl-b").mode) == 0o600
    write(fs, "merged/hl-b", b"TOP")
    assert read(fs, "hl-a") == b"TOP" + b"bottom: hard-linked\n"[3:]
    assert _nlinks(fs, "hl-a", "merged/hl-b") == [(ino, 2)] * 2
    fs.link(ino, 1, b"hl-c")
    assert _nlinks(fs, "hl-a", "merged/hl-b", "hl-c") == [(ino, 3)] * 3
    rename(fs, "hl-a", "tree/hl-moved")
    assert _nlinks(fs, "tree/hl-moved", "merged/hl-b", "hl-c") == [(ino, 3)] * 3
    fs = stack.reopen()
    assert _nlinks(fs, "tree/hl-moved", "merged/hl-b", "hl-c") == [(ino, 3)] * 3
    assert not exists(fs, "hl-a") and b"hl-a" not in listing(fs)
    fs.unlink(*parent_and_name(fs, "merged/hl-b"))
    assert _nlinks(fs, "tree/hl-moved", "hl-c") == [(ino, 2)] * 2
    fs.unlink(*parent_and_name(fs, "hl-c"))
    fs = stack.reopen()
    assert _nlinks(fs, "tree/hl-moved") == [(ino, 1)]
    assert read(fs, "tree/hl-moved") == b"TOP" + b"bottom: hard-linked\n"[3:]


def test_unlinking_a_lower_hard_link_counts(stack):
    fs = stack.fs
    ino = lp(fs, "hl-a").ino
    fs.unlink(1, b"hl-a")
    assert _nlinks(fs, "merged/hl-b") == [(ino, 1)]
    assert read(fs, "merged/hl-b") == b"bottom: hard-linked\n"
    fs = stack.reopen()
    assert _nlinks(fs, "merged/hl-b") == [(ino, 1)] and not exists(fs, "hl-a")


def test_a_metadata_copy_of_a_hard_linked_lower_file_keeps_the_count(stack):
    fs = stack.fs
    ino = lp(fs, "hl-a").ino
    fs.setattr(ino, AttrChanges(mode=0o600))
    assert _nlinks(fs, "hl-a", "merged/hl-b") == [(ino, 2)] * 2
    fs.unlink(1, b"hl-a")
    assert _nlinks(fs, "merged/hl-b") == [(ino, 1)]


def test_an_upper_opens_only_over_its_own_lowers(stack, layers):
    stack.fs.close()
    swapped = [Lower(lo.path, lo.digest) for lo in reversed(layers.lowers())]
    for lowers, difference in (
        (swapped, "lower 0 (bottom first) is " + layers.digests[1]),
        (layers.lowers()[:1], "made over 2 lower(s), 1 given"),
    ):
        with pytest.raises(LayerMismatchError) as raised:
            open_union(lowers, stack.upper, key=stack.key, state_dir=stack.state)
        assert difference in str(raised.value) and "\n" not in str(raised.value)
    stack.open()
