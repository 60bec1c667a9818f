"""Images through a real FUSE mount: fidelity, tampering (EIO + log), digests and keys."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from conftest import run_cli

from merkle.trees import GiB, make_golden_tree, pattern
from occlumfs.errors import ExitCode
from occlumfs.keys import write_key_file
from occlumfs.merkle import build_image, open_image_fs
from occlumfs.merkle.format import BLOCK_SIZE, EXTENT, Descriptor, Layout
from occlumfs.mount import mounted_paths

pytestmark = pytest.mark.fuse
KEY = bytes(range(16))


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    base = tmp_path_factory.mktemp("mount")
    src = make_golden_tree(base / "src")
    image = base / "image"
    return src, image, build_image(src, image)


def _tree(root: Path) -> dict[bytes, tuple]:
    """What a user sees under root: stat fields, xattrs, link targets, small contents."""
    top = os.fsencode(root)
    out = {}
    links: dict[int, bytes] = {}
    for dirpath, dirs, files in os.walk(top):
        for name in [b"", *dirs, *files] if dirpath == top else [*dirs, *files]:
            full = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(full, top)
            first = links.setdefault(os.lstat(full).st_ino, rel)  # hard links: one inode
            entry, _ = _tree_entry(full)
            out[rel] = (*entry, first)
    return out


def test_mounted_image_matches_the_source(golden, mount):
    src, image, digest = golden
    expected = _tree(src)
    with mount(image, "--digest", digest) as mnt:
        assert _tree(mnt) == expected
        with open(mnt / "sparse-5g", "rb") as f:
            assert os.pread(f.fileno(), 8, 4 * GiB - 4) == b"\0\x004GiB\0\0"
            assert os.pread(f.fileno(), 10, 5 * GiB - 2) == bytes(5)
        assert os.stat(mnt / "sparse-5g").st_blocks == 24
        with pytest.raises(OSError) as info:
            (mnt / "new").write_bytes(b"x")
        assert info.value.errno == errno.EROFS
        assert os.statvfs(mnt).f_bsize == BLOCK_SIZE


def _data_block_of(image: Path, digest: str, path: str, file_block: int) -> int:
    fs = open_image_fs(image, digest=digest, key=None)
    try:
        from occlumfs.fs import lookup_path

        rec = fs.record(lookup_path(fs, path).ino)
        first, data, _ = EXTENT.unpack(fs.reader.heap(rec.ref, EXTENT.size))
        return fs.reader.layout.data_start + data + file_block - first
    finally:
        fs.close()


def test_a_tampered_block_fails_exactly_its_reads_and_is_logged(golden, mount, tmp_path):
    _, image, digest = golden
    raw = bytearray(image.read_bytes())
    block = _data_block_of(image, digest, "blocks.bin", 2)
    raw[block * BLOCK_SIZE + 100] ^= 0x40
    bad = tmp_path / "bad.img"
    bad.write_bytes(bytes(raw))
    log = tmp_path / "server.log"
    with mount(bad, "--digest", digest, log_file=log, allow_log_errors=True) as mnt:
        fd = os.open(mnt / "blocks.bin", os.O_RDONLY)
        try:
            assert os.pread(fd, 8192, 0) == pattern("blocks", 8192)
            with pytest.raises(OSError) as info:
                os.pread(fd, 100, 8200)
            assert info.value.errno == errno.EIO
            assert os.pread(fd, 100, 3 * BLOCK_SIZE) == pattern("blocks", 3 * BLOCK_SIZE + 7)[-7:]
        finally:
            os.close(fd)
        assert (mnt / "five").read_bytes() == pattern("five", 5000)  # other files unharmed
    text = log.read_text()
    assert "/blocks.bin: data at offset 8192" in text and "failed verification" in text
    assert "Traceback" not in text


def test_tampering_anywhere_gives_eio_or_the_original_bytes(golden, mount, tmp_path):
    src, image, digest = golden
    truth = _walk_tolerant(src)
    original = image.read_bytes()
    layout = Layout.of(Descriptor.parse(original[:156]))
    positions = [
        layout.inode_start * BLOCK_SIZE + 64 * 3 + 17,  # an inode record
        layout.heap_start * BLOCK_SIZE + 40,  # directory entries of the root
        (layout.data_start + 1) * BLOCK_SIZE + 3,  # file data
        layout.tree_start * BLOCK_SIZE + 33,  # level-0 hash of block 2
    ]
    for n, pos in enumerate(positions):
        raw = bytearray(original)
        raw[pos] ^= 0x01
        bad = tmp_path / f"bad{n}.img"
        bad.write_bytes(bytes(raw))
        with mount(bad, "--digest", digest, allow_log_errors=True) as mnt:
            seen = _walk_tolerant(mnt)
        differing = {p for p, v in seen.items() if v != truth.get(p)}
        assert differing, pos  # the flip was noticed somewhere
        for path in differing:
            assert seen[path] == "EIO", (pos, path, seen[path])


def _walk_tolerant(root: Path) -> dict[bytes, object]:
    top = os.fsencode(root)
    out: dict[bytes, object] = {}

    def visit(full: bytes) -> None:
        rel = os.path.relpath(full, top)
        try:
            entry = _tree_entry(full)
        except OSError as exc:
            assert exc.errno == errno.EIO, (rel, exc)
            out[rel] = "EIO"
            return
        out[rel] = entry[0]
        for child in entry[1]:
            visit(os.path.join(full, child))

    visit(top)
    return out


def _tree_entry(full: bytes):
    """One path's stat fields, xattrs and content, and its children if a directory."""
    st = os.lstat(full)
    xattrs = {
        n: os.getxattr(full, n, follow_symlinks=False)
        for n in sorted(os.listxattr(full, follow_symlinks=False))
    }
    extra: object = None
    if stat.S_ISLNK(st.st_mode):
        extra = os.readlink(full)
    elif stat.S_ISREG(st.st_mode) and st.st_size < 1 << 20:
        with open(full, "rb") as f:
            extra = f.read()
    size = None if stat.S_ISDIR(st.st_mode) else st.st_size
    fields = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_mtime_ns, st.st_rdev)
    children = sorted(os.listdir(full)) if stat.S_ISDIR(st.st_mode) else []
    return (*fields, size, xattrs, extra), children


def test_wrong_digest_refuses_to_mount(golden, tmp_path):
    _, image, _ = golden
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = run_cli("mount", image, mnt, "--digest", "sha256:" + "1" * 64, check=False)
    assert done.returncode == ExitCode.INTEGRITY
    assert "digest mismatch" in done.stderr and "Traceback" not in done.stderr
    assert mnt.resolve() not in mounted_paths()


def test_encrypted_image_mounts_only_with_its_key(golden, mount, tmp_path):
    src, _, _ = golden
    image = tmp_path / "enc.img"
    digest = build_image(src, image, key=KEY)
    key_file = tmp_path / "key"
    write_key_file(key_file, KEY)
    with mount(image, "--digest", digest, "--key-file", key_file) as mnt:
        assert (mnt / "five").read_bytes() == pattern("five", 5000)
        assert os.getxattr(mnt / "one", "user.plain") == b"value"
        assert sorted(os.listdir(mnt / "dir")) == ["file", "hard-b", "rel-link", "sub"]
    other = tmp_path / "other"
    write_key_file(other, bytes(16))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for args, words in (
        (("--key-file", other), "wrong key"),
        ((), "give its key with --key-file"),
    ):
        done = run_cli("mount", image, mnt, "--digest", digest, *args, check=False)
        assert done.returncode == ExitCode.WRONG_KEY, done.stderr
        assert words in done.stderr and "Traceback" not in done.stderr
        assert mnt.resolve() not in mounted_paths()


def test_serving_shortcuts_for_an_xattr_less_image(mount, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(pattern("f", 3 * BLOCK_SIZE))
    image = tmp_path / "plain.img"
    digest = build_image(src, image)
    fs = open_image_fs(image, digest=digest, key=None)
    with pytest.raises(OSError) as info:
        fs.getxattr(2, b"user.x")
    assert info.value.errno == errno.ENODATA  # in-process: the plain answer
    fs.close()
    with mount(image, "--digest", digest) as mnt:
        assert (mnt / "f").read_bytes() == pattern("f", 3 * BLOCK_SIZE)
        # The kernel was told once that this image has no xattrs, and answers itself.
        for _ in range(2):
            with pytest.raises(OSError) as info:
                os.getxattr(mnt / "f", "user.x")
            assert info.value.errno == errno.EOPNOTSUPP
        assert os.listxattr(mnt / "f") == []
        # Read-ahead on the mount was raised from the kernel's 128 KiB default.
        bdi = f"{os.major(os.stat(mnt).st_dev)}:{os.minor(os.stat(mnt).st_dev)}"
        assert Path(f"/sys/class/bdi/{bdi}/read_ahead_kb").read_text().strip() == "4096"
        for _ in range(3):  # close() without FLUSH round trips still succeeds
            with open(mnt / "f", "rb") as f:
                assert f.read(5) == pattern("f", 5)
