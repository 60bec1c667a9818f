"""Read-side behaviour: every subject holding the reference tree, in-process and over FUSE.

Each test states what the reference tree holds (the constants of
:mod:`conformance.reference`) and checks a subject against it; the ``host``
subject, a plain directory on the host's filesystem, proves the expectation
is what Linux itself does.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest

from conformance import reference as ref
from conformance.helpers import errno_of
from conformance.views import View


def _host_lstat(tree, rel: bytes) -> os.stat_result:
    return os.lstat(os.path.join(os.fsencode(tree), rel))


def test_every_entry_matches_the_host(ro_view: View, reference_tree):
    """Type, permission bits, owner, size, link count, mtime (ns) and rdev of every entry."""
    mismatches = []
    for rel in ref.walk_reference(reference_tree):
        want = _host_lstat(reference_tree, rel)
        got = ro_view.lstat(rel)
        fields = {
            "mode": (got.mode, want.st_mode),
            "uid": (got.uid, want.st_uid),
            "gid": (got.gid, want.st_gid),
            "nlink": (got.nlink, want.st_nlink),
            "mtime_ns": (got.mtime_ns, want.st_mtime_ns),
        }
        if not stat.S_ISDIR(want.st_mode):  # a directory's size is the filesystem's own
            fields["size"] = (got.size, want.st_size)
        if stat.S_ISCHR(want.st_mode) or stat.S_ISBLK(want.st_mode):
            fields["rdev"] = (got.rdev, want.st_rdev)
        mismatches += [f"{rel!r} {k}: {g!r} != {w!r}" for k, (g, w) in fields.items() if g != w]
    assert not mismatches, f"{len(mismatches)} mismatches:\n" + "\n".join(mismatches[:30])


def test_stat_fields_hold_the_stated_values(ro_view: View):
    for rel, data in ref.FILES.items():
        st = ro_view.lstat(rel)
        assert stat.S_ISREG(st.mode) and st.size == len(data), rel
    assert ro_view.lstat(ref.FUTURE_MTIME_PATH).mtime_ns == ref.FUTURE_MTIME_NS
    assert ro_view.lstat("names").mtime_ns % 1000 != 0  # sub-microsecond digits survive
    assert stat.S_ISDIR(ro_view.lstat("tree").mode)
    assert stat.S_ISDIR(ro_view.lstat("").mode)
    for rel, target in ref.SYMLINKS.items():
        st = ro_view.lstat(rel)
        assert stat.S_ISLNK(st.mode) and st.size == len(target), rel
    # A directory's link count: its name, its ".", and each subdirectory's "..".
    assert ro_view.lstat("tree").nlink == 4  # tree/a, tree/empty-dir
    assert ro_view.lstat("tree/empty-dir").nlink == 2


def test_permission_bits_and_owners(ro_view: View):
    for rel, (mode, uid, gid) in {**ref.MODES, **ref.DIR_MODES}.items():
        st = ro_view.lstat(rel)
        assert (stat.S_IMODE(st.mode), st.uid, st.gid) == (mode, uid, gid), rel
    assert ro_view.lstat("modes/setuid").mode & stat.S_ISUID
    assert ro_view.lstat("modes/sticky-dir").mode & stat.S_ISVTX
    assert stat.S_ISDIR(ro_view.lstat("modes/sticky-dir").mode)
    assert ro_view.read_file("modes/sticky-dir/inside") == b"inside"
    assert ro_view.read_file("modes/none") == b"modes/none"  # root reads mode 000


def test_device_nodes_and_fifos(ro_view: View):
    for rel, (kind, rdev) in ref.SPECIAL.items():
        st = ro_view.lstat(rel)
        assert stat.S_IFMT(st.mode) == kind, rel
        assert stat.S_IMODE(st.mode) == 0o640, rel
        if kind != stat.S_IFIFO:
            assert st.rdev == rdev, rel
            assert (os.major(st.rdev), os.minor(st.rdev)) == (os.major(rdev), os.minor(rdev))


def test_file_contents(ro_view: View):
    for rel, data in ref.FILES.items():
        assert ro_view.read_file(rel) == data, rel
    assert ro_view.read_file("tree/a/b/leaf") == b"leaf"
    assert ro_view.read_file(ref.DEEP_FILE) == b"at the bottom"


@pytest.mark.parametrize("rel", ["blocks.bin", "big.bin"])
def test_pread_at_any_offset(ro_view: View, rel):
    data = ref.FILES[rel]
    n = len(data)
    offsets = [0, 1, 4095, 4096, 4097, 8191, 8192, 12288, n - 1, n, n + 1, n + 4096]
    offsets += [1 << 20, (1 << 20) - 5, 1 << 32, (1 << 32) + 1, 1 << 40, 1 << 62]
    sizes = [0, 1, 2, 4095, 4096, 4097, 10_000, 1 << 20]
    fd = ro_view.open(rel, os.O_RDONLY)
    try:
        for offset in offsets:
            for size in sizes:
                got = ro_view.pread(fd, size, offset)
                assert got == data[offset : offset + size], (offset, size)
        # Reading sequentially with the file position gives the same bytes.
        chunks = []
        while chunk := ro_view.read(fd, 7000):
            chunks.append(chunk)
        assert b"".join(chunks) == data
    finally:
        ro_view.close(fd)


def test_sparse_files_read_zeros_in_holes(ro_view: View):
    for rel, (size, pieces) in ref.SPARSE.items():
        st = ro_view.lstat(rel)
        assert st.size == size, rel
        fd = ro_view.open(rel, os.O_RDONLY)
        try:
            for offset, data in pieces.items():
                assert ro_view.pread(fd, len(data), offset) == data, (rel, offset)
                # The block around each piece: zeros, the piece, zeros.
                lo = max(0, offset - 4096)
                around = ro_view.pread(fd, len(data) + 8192, lo)
                want = bytes(offset - lo) + data
                want += bytes(min(size, lo + len(data) + 8192) - lo - len(want))
                assert around == want, (rel, offset)
            for hole in (8192, size // 2, size - 4096, 3 << 30):
                if hole >= size or any(o - 8192 <= hole < o + len(d) for o, d in pieces.items()):
                    continue
                assert ro_view.pread(fd, 65536, hole) == bytes(min(65536, size - hole)), hole
            assert ro_view.pread(fd, 100, size) == b""
            assert ro_view.pread(fd, 100, size - 10) == ro_view.pread(fd, 10, size - 10)
        finally:
            ro_view.close(fd)
    assert ro_view.read_file("sparse/all-hole") == bytes(3 * ref.MiB)
    # Holes take no space: st_blocks counts what is stored, not the size.
    huge = ro_view.lstat("sparse/huge")
    assert huge.size > 4 * ref.GiB and huge.blocks * 512 < 64 * ref.MiB


def test_symlinks(ro_view: View):
    for rel, target in ref.SYMLINKS.items():
        assert ro_view.readlink(rel) == target, rel
    assert ro_view.stat("links/relative").size == len(ref.SMALL)
    assert ro_view.read_file("links/relative") == ref.SMALL
    assert stat.S_ISDIR(ro_view.stat("links/to-dir").mode)
    assert sorted(ro_view.listdir("links/to-dir")) == [b"a", b"empty-dir"]
    assert ro_view.read_file("links/to-dir/a/b/leaf") == b"leaf"
    assert errno_of(ro_view.stat, "links/dangling") == errno.ENOENT
    assert errno_of(ro_view.readlink, "small.txt") == errno.EINVAL
    assert errno_of(ro_view.open, "links/relative", os.O_RDONLY | os.O_NOFOLLOW) == errno.ELOOP


def test_hard_links_share_an_inode(ro_view: View):
    inodes = set()
    for group in ref.HARDLINKS:
        stats = [ro_view.lstat(rel) for rel in group]
        assert {st.ino for st in stats} == {stats[0].ino}, group
        assert [st.nlink for st in stats] == [len(group)] * len(group), group
        for rel in group:
            assert ro_view.read_file(rel) == ref.HARDLINK_DATA[group[0]], rel
        inodes.add(stats[0].ino)
    assert len(inodes) == len(ref.HARDLINKS)
    # Distinct files have distinct inode numbers.
    others = {ro_view.lstat(rel).ino for rel in ref.FILES}
    assert len(others) == len(ref.FILES) and not others & inodes


def test_xattrs(ro_view: View):
    for rel, attrs in ref.XATTRS.items():
        names = [n for n in ro_view.listxattr(rel) if n.startswith(b"user.")]
        assert sorted(names) == sorted(attrs), rel
        for name, value in attrs.items():
            assert ro_view.getxattr(rel, name) == value, (rel, name)
        assert errno_of(ro_view.getxattr, rel, b"user.absent") == errno.ENODATA
    assert not [n for n in ro_view.listxattr("small.txt") if n.startswith(b"user.")]


def test_names_are_bytes(ro_view: View):
    names = ro_view.listdir("names")
    expected = [*ref.NON_UTF8_NAMES, ref.UTF8_NAME, *ref.LONG_NAMES]
    assert sorted(names) == sorted(expected)
    for name in expected:
        assert ro_view.read_file(b"names/" + name) == name
    assert all(len(n) == 255 for n in ref.LONG_NAMES)
    assert errno_of(ro_view.lstat, b"names/" + b"L" * 256) == errno.ENAMETOOLONG


def test_deep_nesting(ro_view: View):
    path = "deep"
    for _ in range(ref.DEEP_LEVELS):
        path += "/d"
        assert stat.S_ISDIR(ro_view.lstat(path).mode)
    assert ro_view.listdir(ref.DEEP_PATH) == [b"bottom"]


def test_empty_file_and_directory(ro_view: View):
    assert ro_view.read_file("empty") == b""
    assert ro_view.lstat("empty").size == 0
    assert ro_view.listdir("tree/empty-dir") == []


def test_lookup_errors(ro_view: View):
    assert errno_of(ro_view.lstat, "no-such-file") == errno.ENOENT
    assert errno_of(ro_view.lstat, "small.txt/below") == errno.ENOTDIR
    assert errno_of(ro_view.listdir, "small.txt") == errno.ENOTDIR
    assert errno_of(ro_view.open, "tree", os.O_WRONLY) == errno.EISDIR


def test_listing_names_every_entry_once(ro_view: View, reference_tree):
    for rel in ["", "tree", "links", "hard", "special", "modes", "sparse"]:
        names = ro_view.listdir(rel)
        assert len(names) == len(set(names)), rel
        assert sorted(names) == sorted(
            os.listdir(os.path.join(os.fsencode(reference_tree), rel.encode()))
        )


def test_readdir_of_10k_entries_resumes_from_any_cookie(ro_view: View):
    want = ref.big_dir_names()
    handle = ro_view.opendir(ref.BIG_DIR)
    try:
        listing: list[tuple[bytes, int]] = []
        while batch := ro_view.readdir(handle):
            listing += batch
    finally:
        ro_view.closedir(handle)
    names = [name for name, _ in listing]
    assert len(names) == len(want) and sorted(names) == want
    # Resume right after entries at several positions, each time with the
    # directory closed and opened again, as NFS servers and `ls` on big dirs do.
    for index in (0, 1, 36, 37, 38, 999, 5000, len(listing) - 2, len(listing) - 1):
        handle = ro_view.opendir(ref.BIG_DIR)
        try:
            ro_view.seekdir(handle, listing[index][1])
            rest: list[bytes] = []
            while batch := ro_view.readdir(handle):
                rest += [name for name, _ in batch]
                if len(rest) > 300:  # enough to see it continue in order
                    break
        finally:
            ro_view.closedir(handle)
        assert rest[:300] == names[index + 1 : index + 301], index


def test_read_only_subjects_refuse_every_change(read_only_view: View):
    view = read_only_view
    refused = {
        "open for writing": lambda: view.open("small.txt", os.O_WRONLY),
        "create": lambda: view.open("new", os.O_WRONLY | os.O_CREAT),
        "truncate": lambda: view.truncate("small.txt", 0),
        "mkdir": lambda: view.mkdir("new-dir"),
        "unlink": lambda: view.unlink("small.txt"),
        "rmdir": lambda: view.rmdir("tree/empty-dir"),
        "rename": lambda: view.rename("small.txt", "renamed"),
        "link": lambda: view.link("small.txt", "linked"),
        "symlink": lambda: view.symlink("small.txt", "new-link"),
        "chmod": lambda: view.chmod("small.txt", 0o600),
        "chown": lambda: view.chown("small.txt", 1, 1),
        "utimens": lambda: view.utimens("small.txt", 0, 0),
        "setxattr": lambda: view.setxattr("small.txt", b"user.new", b"v"),
        "removexattr": lambda: view.removexattr("xattr/file", b"user.plain"),
    }
    got = {what: errno_of(change) for what, change in refused.items()}
    assert got == dict.fromkeys(refused, errno.EROFS)
    assert view.read_file("small.txt") == ref.SMALL


def test_allocation_and_statfs_are_real(ro_view: View):
    # `du` and `df` read these: a dense file occupies at least its size, and the
    # filesystem reports 4 KiB blocks and the name limit it enforces.
    for rel in ("big.bin", "blocks.bin"):
        st = ro_view.lstat(rel)
        assert st.blocks * 512 >= st.size, rel
    assert ro_view.lstat("empty").blocks == 0
    fs = ro_view.statfs()
    assert fs.bsize == 4096 and fs.namemax == 255
    assert fs.blocks > 0 and 0 <= fs.bavail <= fs.bfree <= fs.blocks
