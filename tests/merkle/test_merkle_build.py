"""Building images and reading them back in-process: fidelity, reproducibility, tar input."""

from __future__ import annotations

import errno
import io
import os
import random
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from merkle.trees import T0, GiB, make_golden_tree, pattern, set_times
from occlumfs.errors import FormatError, FSError, NotFoundError
from occlumfs.fs import ROOT_INO, iter_dir, lookup_path, read_all
from occlumfs.merkle import build_image, open_image_fs, read_digest, verify_image
from occlumfs.merkle.filedata import _filesystem_type, reserve
from occlumfs.merkle.format import BLOCK_SIZE
from occlumfs.merkle.reader import ImageReader


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    base = tmp_path_factory.mktemp("golden")
    src = make_golden_tree(base / "src")
    image = base / "image"
    digest = build_image(src, image)
    fs = open_image_fs(image, digest=digest, key=None)
    yield src, image, digest, fs
    fs.close()


def _walk_source(root: Path):
    """(relative bytes path, lstat) of everything under root, root first."""
    top = os.fsencode(root)
    yield b"", os.lstat(top)
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            full = os.path.join(dirpath, name)
            yield os.path.relpath(full, top), os.lstat(full)


def test_every_stat_field_matches_the_source(golden):
    src, _, _, fs = golden
    inos: dict[tuple[int, int], int] = {}
    for rel, st in _walk_source(src):
        attr = lookup_path(fs, rel)
        assert attr.mode == st.st_mode, rel
        assert (attr.uid, attr.gid) == (st.st_uid, st.st_gid), rel
        assert attr.mtime_ns == st.st_mtime_ns, rel
        assert attr.nlink == st.st_nlink, rel
        if not stat.S_ISDIR(st.st_mode):
            assert attr.size == st.st_size, rel
        assert attr.rdev == st.st_rdev, rel
        if stat.S_ISREG(st.st_mode):
            assert attr.blocks <= st.st_blocks + 8, rel  # holes and zero blocks cost nothing
        # Hard links share an inode number, and only they do.
        key = (st.st_dev, st.st_ino)
        assert inos.setdefault(key, attr.ino) == attr.ino, rel
    assert len(set(inos.values())) == len(inos)
    assert lookup_path(fs, "").ino == ROOT_INO


def test_contents_xattrs_and_links_match(golden):
    src, _, _, fs = golden
    for rel, st in _walk_source(src):
        attr = lookup_path(fs, rel)
        full = os.path.join(os.fsencode(src), rel) if rel else os.fsencode(src)
        names = sorted(os.fsencode(n) for n in os.listxattr(full, follow_symlinks=False))
        assert fs.listxattr(attr.ino) == names, rel
        for name in names:
            assert fs.getxattr(attr.ino, name) == os.getxattr(full, name, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            assert fs.readlink(attr.ino) == os.readlink(full)
        elif stat.S_ISREG(st.st_mode) and st.st_size < 1 << 20:
            with open(full, "rb") as f:
                assert b"".join(read_all(fs, attr.ino)) == f.read(), rel
    with pytest.raises(FSError) as info:
        fs.getxattr(lookup_path(fs, "one").ino, b"user.absent")
    assert info.value.errno == errno.ENODATA


def test_sparse_file_over_4gib_reads_at_any_offset(golden):
    _, image, _, fs = golden
    attr = lookup_path(fs, "sparse-5g")
    assert attr.size == 5 * GiB + 3 and attr.blocks == 24  # "head", and "4GiB" across two
    assert image.stat().st_size < 200_000  # the holes cost nothing
    fh = fs.open(attr.ino, os.O_RDONLY)
    assert fs.read(fh, 0, 6) == b"head\0\0"
    assert fs.read(fh, 4 * GiB - 4, 8) == b"\0\x004GiB\0\0"
    assert fs.read(fh, 3 * GiB, 5) == bytes(5)
    assert fs.read(fh, 5 * GiB, 100) == bytes(3)
    assert fs.read(fh, 5 * GiB + 3, 100) == b""


def test_pread_at_random_offsets_matches_the_source(golden):
    src, _, _, fs = golden
    rng = random.Random(7)
    for name in ("blocks.bin", "five", "zeros-inside", "one"):
        data = (src / name).read_bytes()
        fh = fs.open(lookup_path(fs, name).ino, os.O_RDONLY)
        for _ in range(300):
            off = rng.randrange(0, len(data) + 10)
            size = rng.choice([0, 1, 7, 4096, 4097, 131072, rng.randrange(1, 20000)])
            assert fs.read(fh, off, size) == data[off : off + size], (name, off, size)


def test_readdir_is_sorted_and_resumes_from_every_cookie(golden):
    _, _, _, fs = golden
    entries = list(iter_dir(fs, ROOT_INO))
    names = [e.name for e in entries]
    assert names == sorted(names) and b"caf\xe9" in names
    for i, entry in enumerate(entries):
        assert entry.next_offset == i + 1
        assert [e.name for e in fs.readdir(ROOT_INO, entry.next_offset)] == names[i + 1 :]
    assert list(fs.readdir(ROOT_INO, len(entries) + 5)) == []


def test_dot_and_dotdot_lookups(golden):
    _, _, _, fs = golden
    sub = lookup_path(fs, "dir/sub")
    parent = lookup_path(fs, "dir")
    assert fs.lookup(sub.ino, b"..").ino == parent.ino
    assert fs.lookup(parent.ino, b"..").ino == ROOT_INO
    assert fs.lookup(ROOT_INO, b"..").ino == ROOT_INO
    assert fs.lookup(sub.ino, b".").ino == sub.ino
    assert sub.mtime_ns == T0 + 5


def test_errors_of_the_read_side(golden):
    _, _, _, fs = golden
    cases = [
        (lambda: fs.lookup(ROOT_INO, b"nope"), errno.ENOENT),
        (lambda: fs.lookup(lookup_path(fs, "one").ino, b"x"), errno.ENOTDIR),
        (lambda: fs.lookup(ROOT_INO, b"x" * 256), errno.ENAMETOOLONG),
        (lambda: fs.getattr(10**6), errno.ENOENT),
        (lambda: fs.open(lookup_path(fs, "one").ino, os.O_WRONLY), errno.EROFS),
        (lambda: fs.open(lookup_path(fs, "dir").ino, os.O_RDONLY), errno.EISDIR),
        (lambda: fs.readlink(lookup_path(fs, "one").ino), errno.EINVAL),
        (lambda: fs.opendir(lookup_path(fs, "one").ino), errno.ENOTDIR),
        (lambda: fs.unlink(ROOT_INO, b"one"), errno.EROFS),
    ]
    for call, want in cases:
        with pytest.raises(FSError) as info:
            call()
        assert info.value.errno == want
    assert fs.info.read_only and fs.info.immutable and fs.info.cache_timeout >= 3600
    assert fs.statfs().files == fs.reader.desc.inode_count


def test_identical_contents_are_stored_once(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(pattern("dup", 100_000))
    one = build_image(src, tmp_path / "one.img")
    (src / "b").write_bytes(pattern("dup", 100_000))
    two = build_image(src, tmp_path / "two.img")
    assert one != two
    grown = (tmp_path / "two.img").stat().st_size - (tmp_path / "one.img").stat().st_size
    assert grown <= BLOCK_SIZE  # a second name and inode, no second copy of the data
    fs = open_image_fs(tmp_path / "two.img", digest=two, key=None)
    assert b"".join(read_all(fs, lookup_path(fs, "b").ino)) == pattern("dup", 100_000)
    assert lookup_path(fs, "a").ino != lookup_path(fs, "b").ino  # not hard links
    fs.close()


def test_ten_thousand_entries_list_and_look_up_fast(tmp_path):
    src = tmp_path / "src"
    (src / "big").mkdir(parents=True)
    names = [f"entry-{i:05d}" for i in range(10_000)]
    for name in names:
        (src / "big" / name).touch()
    digest = build_image(src, tmp_path / "img")
    fs = open_image_fs(tmp_path / "img", digest=digest, key=None)
    big = lookup_path(fs, "big").ino
    start = time.perf_counter()
    # Resume like the kernel does, a small batch at a time: no re-scan per call.
    got = []
    cookie = 0
    while True:
        batch = []
        for entry in fs.readdir(big, cookie):
            batch.append(entry)
            if len(batch) == 50:
                break
        if not batch:
            break
        got += [e.name for e in batch]
        cookie = batch[-1].next_offset
    for name in names[::97]:
        assert fs.lookup(big, name.encode()).ino > big
    elapsed = time.perf_counter() - start
    assert got == [n.encode() for n in names]
    assert elapsed < 5, elapsed
    fs.close()


def test_same_tree_in_other_creation_orders_gives_identical_bytes(tmp_path):
    a = make_golden_tree(tmp_path / "a", "forward")
    b = make_golden_tree(tmp_path / "b", "reverse")
    da = build_image(a, tmp_path / "a.img", jobs=1)
    db = build_image(b, tmp_path / "b.img", jobs=4)
    assert da == db
    assert (tmp_path / "a.img").read_bytes() == (tmp_path / "b.img").read_bytes()


def test_sparse_and_dense_zeros_give_the_same_image(tmp_path):
    contents = {0: b"start", 3 * BLOCK_SIZE + 5: b"middle", 20 * BLOCK_SIZE: b"end"}
    size = 20 * BLOCK_SIZE + 3
    images = []
    for how in ("dense", "sparse"):
        src = tmp_path / how
        src.mkdir()
        with open(src / "f", "wb") as f:
            if how == "dense":
                f.write(bytes(size))
            else:
                f.truncate(size)
            for off, data in contents.items():
                f.seek(off)
                f.write(data)
        set_times(src)
        images.append(build_image(src, tmp_path / f"{how}.img"))
    assert (
        os.stat(tmp_path / "dense" / "f").st_blocks > os.stat(tmp_path / "sparse" / "f").st_blocks
    )
    assert images[0] == images[1]
    fs = open_image_fs(tmp_path / "sparse.img", digest=images[1], key=None)
    attr = lookup_path(fs, "f")
    assert attr.blocks == 3 * 8  # three blocks hold data; the rest are holes
    data = b"".join(read_all(fs, attr.ino))
    assert len(data) == size and data[3 * BLOCK_SIZE + 5 : 3 * BLOCK_SIZE + 11] == b"middle"
    with pytest.raises(FSError):
        fs.read(attr.ino, -1, 10)
    fs.close()


@pytest.mark.parametrize("jobs", [1, 2])
def test_all_zero_blocks_of_any_length_are_holes_and_others_are_not(tmp_path, jobs):
    """The builder finds all-zero blocks by their hash among the hashes of every
    block (a short last block padded with zeros first): a zero block anywhere, a
    short all-zero last block, a file of a few zero bytes become holes; a block
    with one non-zero byte (first, last, or in a short last block) is stored."""
    one_at = [bytes(BLOCK_SIZE - 1) + b"x", b"x" + bytes(BLOCK_SIZE - 1)]
    files = {
        "ten_zeros": (bytes(10), 0),
        "zero_tail": (b"a" * BLOCK_SIZE + bytes(100), 1),
        "zero_middle": (b"a" * BLOCK_SIZE + bytes(BLOCK_SIZE) + b"b" * 7, 2),
        "nonzero_edges": (one_at[0] + bytes(2 * BLOCK_SIZE) + one_at[1], 2),
        "tail_last_byte": (bytes(BLOCK_SIZE) + bytes(99) + b"z", 1),
        # Larger than a read (1 MiB): the zero blocks sit in the second read.
        "big": (b"c" * (1 << 20) + bytes(3 * BLOCK_SIZE) + b"d" * 5000, 256 + 2),
    }
    # Enough files for several batches, so that a forked build hashes in workers.
    files.update({f"pad{i:03}": (b"p%03d" % i * 3000, 3) for i in range(300)})
    src = tmp_path / "src"
    src.mkdir()
    for name, (data, _) in files.items():
        (src / name).write_bytes(data)
    set_times(src)
    digest = build_image(src, tmp_path / "img", jobs=jobs)
    fs = open_image_fs(tmp_path / "img", digest=digest, key=None)
    for name, (data, stored) in files.items():
        attr = lookup_path(fs, name)
        assert (name, attr.blocks) == (name, stored * 8)
        assert b"".join(read_all(fs, attr.ino)) == data
    fs.close()
    verify_image(tmp_path / "img", digest=digest, key=None)


@pytest.mark.parametrize("where", ["tmp_path", "/dev/shm"])
def test_the_image_file_is_allocated_up_front_where_its_filesystem_can(tmp_path, where):
    """reserve() sizes the image and allocates its blocks on filesystems whose
    fallocate allocates (ext4, tmpfs...): the data's writes then skip per-page
    reservations. The file reads as zeros either way."""
    directory = tmp_path if where == "tmp_path" else Path(where)
    fstypes = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "--target", str(directory)],
        capture_output=True,
        check=True,
        text=True,
    ).stdout.split()  # one a mount: stacked mounts give several
    path = directory / f"reserve-test-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fstype = _filesystem_type(fd).decode()
        assert fstype in fstypes
        reserve(fd, 10 * BLOCK_SIZE)
        st = os.fstat(fd)
        assert st.st_size == 10 * BLOCK_SIZE
        assert os.pread(fd, 11 * BLOCK_SIZE, 0) == bytes(10 * BLOCK_SIZE)
        if fstype in ("ext4", "xfs", "tmpfs", "f2fs"):
            assert st.st_blocks * 512 >= 10 * BLOCK_SIZE
        else:
            assert st.st_blocks == 0
    finally:
        os.close(fd)
        path.unlink()


def test_source_date_epoch_clamps_newer_mtimes_only(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "old").write_bytes(b"o")
    (src / "new").write_bytes(b"n")
    os.utime(src / "old", ns=(1000, 1_000_000_000_123))
    os.utime(src / "new", ns=(1000, 2_000_000_000_999_999_999))
    os.utime(src, ns=(1000, 1_500_000_000_000_000_000))
    digest = build_image(src, tmp_path / "img", source_date_epoch=1_600_000_000)
    fs = open_image_fs(tmp_path / "img", digest=digest, key=None)
    assert lookup_path(fs, "old").mtime_ns == 1_000_000_000_123
    assert lookup_path(fs, "new").mtime_ns == 1_600_000_000 * 10**9
    assert lookup_path(fs, "").mtime_ns == 1_500_000_000_000_000_000
    fs.close()
    # Touching a file after the epoch changes nothing once clamped.
    os.utime(src / "new", ns=(1000, 2_100_000_000_000_000_000))
    assert build_image(src, tmp_path / "img2", source_date_epoch=1_600_000_000) == digest


def _plain_tree(root: Path) -> Path:
    """A tree whose metadata a tar archive carries completely."""
    root.mkdir()
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "f").write_bytes(pattern("f", 9000))
    (root / "g").write_bytes(b"g\n")
    os.link(root / "g", root / "d" / "g-link")
    os.symlink("d/f", root / "s")
    os.chmod(root / "g", 0o640)
    set_times(root, 1_700_000_000 * 10**9)
    return root


def test_tar_input_equals_directory_input(tmp_path):
    src = _plain_tree(tmp_path / "src")
    for name, mode in (("t.tar", "w"), ("t.tar.gz", "w:gz")):
        with tarfile.open(tmp_path / name, mode, format=tarfile.PAX_FORMAT) as tf:
            tf.add(src, arcname=".")
        assert build_image(tmp_path / name, tmp_path / f"{name}.img") == build_image(
            src, tmp_path / "dir.img"
        ), name
        assert (tmp_path / f"{name}.img").read_bytes() == (tmp_path / "dir.img").read_bytes()


def _tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return path


def _member(name, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    return info


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([(_member("../x"), b"evil")], "contains '..'"),
        ([(_member("a/../../x"), b"evil")], "contains '..'"),
        ([(_member("/etc/x"), b"evil")], "absolute path"),
        (
            [
                (_member("link", tarfile.SYMTYPE, "/etc"), None),
                (_member("link/passwd"), b"evil"),
            ],
            "not a directory",
        ),
        ([(_member("h", tarfile.LNKTYPE, "../../etc/shadow"), None)], "contains '..'"),
        ([(_member("h", tarfile.LNKTYPE, "missing"), None)], "not earlier in the archive"),
    ],
)
def test_tar_slip_is_refused_and_no_image_is_left(tmp_path, members, message):
    archive = _tar_with(tmp_path / "evil.tar", members)
    with pytest.raises(FormatError, match=message):
        build_image(archive, tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar"]


def _pax_member(name, **pax):
    info = _member(name)
    info.pax_headers = {k: str(v) for k, v in pax.items()}
    return info


@pytest.mark.parametrize(
    ("pax", "message"),
    [({"uid": 1 << 40}, "owner out of range"), ({"mtime": "1e30"}, "mtime out of range")],
)
def test_tar_numbers_the_image_cannot_hold_are_refused(tmp_path, pax, message):
    archive = tmp_path / "big.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
        info = _pax_member("f", **pax)
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(FormatError, match=message):
        build_image(archive, tmp_path / "out.img")


def test_tar_symlinks_with_outside_targets_are_stored_not_followed(tmp_path):
    archive = _tar_with(
        tmp_path / "ok.tar",
        [
            (_member("up", tarfile.SYMTYPE, "../../../etc/passwd"), None),
            (_member("abs", tarfile.SYMTYPE, "/etc/shadow"), None),
            (_member("dir/file"), b"data"),
            (_member("dir/hard", tarfile.LNKTYPE, "dir/file"), None),
        ],
    )
    digest = build_image(archive, tmp_path / "img")
    fs = open_image_fs(tmp_path / "img", digest=digest, key=None)
    assert fs.readlink(lookup_path(fs, "up").ino) == b"../../../etc/passwd"
    assert fs.readlink(lookup_path(fs, "abs").ino) == b"/etc/shadow"
    assert lookup_path(fs, "dir/hard").ino == lookup_path(fs, "dir/file").ino
    assert lookup_path(fs, "dir/file").nlink == 2
    assert lookup_path(fs, "dir").mode == stat.S_IFDIR | 0o755  # implied directory
    fs.close()


def test_directory_symlinks_are_never_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(outside, src / "escape")
    digest = build_image(src, tmp_path / "img")
    fs = open_image_fs(tmp_path / "img", digest=digest, key=None)
    escape = lookup_path(fs, "escape")
    assert escape.is_lnk and fs.readlink(escape.ino) == os.fsencode(outside)
    assert b"secret" not in (tmp_path / "img").read_bytes()
    fs.close()


def test_non_utf8_names_survive(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    names = [b"caf\xe9", b"\xff\xfe", "日本".encode(), b"L" * 255]
    for name in names:
        with open(os.path.join(os.fsencode(src), name), "wb") as f:
            f.write(name)
    digest = build_image(src, tmp_path / "img")
    fs = open_image_fs(tmp_path / "img", digest=digest, key=None)
    assert sorted(e.name for e in iter_dir(fs, ROOT_INO)) == sorted(names)
    for name in names:
        assert b"".join(read_all(fs, fs.lookup(ROOT_INO, name).ino)) == name
    fs.close()


def test_build_errors_are_clear_and_leave_nothing(tmp_path):
    with pytest.raises(NotFoundError, match="does not exist"):
        build_image(tmp_path / "missing", tmp_path / "img")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(FormatError, match="not a readable tar"):
        build_image(tmp_path / "junk.tar", tmp_path / "img")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.tar"]


def test_an_image_written_inside_its_source_is_reproducible(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    set_times(src)
    first = build_image(src, tmp_path / "outside.img")
    assert build_image(src, src / "inside.img") == first  # the scan saw no scratch file
    assert sorted(p.name for p in src.iterdir()) == ["f", "inside.img"]


def test_empty_directory_and_exact_block_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    digest = build_image(src, tmp_path / "empty.img")
    fs = open_image_fs(tmp_path / "empty.img", digest=digest, key=None)
    assert list(iter_dir(fs, ROOT_INO)) == [] and fs.getattr(ROOT_INO).nlink == 2
    fs.close()
    (src / "block").write_bytes(pattern("b", BLOCK_SIZE))
    (src / "two").write_bytes(pattern("t", 2 * BLOCK_SIZE))
    digest = build_image(src, tmp_path / "blocks.img")
    fs = open_image_fs(tmp_path / "blocks.img", digest=digest, key=None)
    for name, size in (("block", BLOCK_SIZE), ("two", 2 * BLOCK_SIZE)):
        attr = lookup_path(fs, name)
        assert attr.blocks == size // 512
        data = b"".join(read_all(fs, attr.ino))
        assert data == (src / name).read_bytes()
        assert fs.read(attr.ino, size, 10) == b""
    fs.close()
    verify_image(tmp_path / "blocks.img", digest=digest)


def test_a_damaged_compressed_tar_is_a_format_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"compressible text " * 20_000)  # a real deflate stream
    with tarfile.open(tmp_path / "t.tar.gz", "w:gz") as tf:
        tf.add(src, arcname=".")
    raw = bytearray((tmp_path / "t.tar.gz").read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 64):
        raw[i] ^= 0x5A
    (tmp_path / "bad.tar.gz").write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="tar archive"):
        build_image(tmp_path / "bad.tar.gz", tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists()


def test_progress_reports_every_byte(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(pattern("a", 20_000_000))
    (src / "b").write_bytes(b"bb")
    seen = []
    build_image(src, tmp_path / "img", progress=seen.append, jobs=2)
    assert sum(seen) == 20_000_002 and len(seen) >= 3


def test_digest_is_read_from_the_header_alone(golden):
    _, image, digest, _ = golden
    assert read_digest(image) == digest
    verify_image(image, digest=digest)
    reader = ImageReader(image, digest=None, key=None)
    assert reader.digest == digest
    assert not reader._tree and not reader._meta  # nothing read beyond the header
    reader.close()
