"""Tampering, wrong keys and digests, and crafted images: detected, never wrong bytes."""

from __future__ import annotations

import os
import shutil
import stat
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merkle.trees import make_golden_tree, pattern, reseal
from occlumfs.errors import FormatError, FSError, IntegrityError, OcclumfsError, WrongKeyError
from occlumfs.fs import ROOT_INO, Filesystem, lookup_path, read_all
from occlumfs.merkle import build_image, open_image_fs, verify_image
from occlumfs.merkle.format import (
    BLOCK_SIZE,
    DESCRIPTOR_SIZE,
    DIRENT,
    DIRENT_SIZE,
    EXTENT,
    INODE_SIZE,
    Descriptor,
    InodeRecord,
    Layout,
    MalformedImageError,
)

KEY = bytes(range(16))
OTHER_KEY = bytes(16)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    base = tmp_path_factory.mktemp("tamper")
    src = make_golden_tree(base / "src")
    plain = base / "plain.img"
    encrypted = base / "encrypted.img"
    return {
        "src": src,
        "plain": (plain, build_image(src, plain), None),
        "encrypted": (encrypted, build_image(src, encrypted, key=KEY), KEY),
    }


def _snapshot(fs: Filesystem) -> dict[bytes, object]:
    """Everything a reader can see, path -> attributes and content; errors as values."""
    seen: dict[bytes, object] = {}

    def visit(ino: int, path: bytes) -> None:
        try:
            attr = fs.getattr(ino)
            entry: list[object] = [attr, fs.listxattr(ino)]
            if attr.is_dir:
                for child in list(fs.readdir(ino, 0)):
                    visit(child.attr.ino, path + b"/" + child.name)
            elif attr.is_lnk:
                entry.append(fs.readlink(ino))
            elif attr.is_reg and attr.size < 1 << 20:
                entry.append(b"".join(read_all(fs, ino)))
            elif attr.is_reg:
                fh = fs.open(ino, os.O_RDONLY)
                entry.append([fs.read(fh, off, 64) for off in (0, 4 * (1 << 30) - 8)])
        except FSError as exc:
            entry = ["error", exc.errno]
        seen[path] = entry

    visit(ROOT_INO, b"")
    return seen


def _flip_positions(size: int) -> list[int]:
    """Byte positions spread over every block: start, middle and end of each."""
    out = []
    for block in range(size // BLOCK_SIZE):
        base = block * BLOCK_SIZE
        out += [base, base + 1000 + block % 7, base + BLOCK_SIZE - 1]
    return [*out, 8, 30, 100, DESCRIPTOR_SIZE - 1, DESCRIPTOR_SIZE]


@pytest.mark.parametrize("kind", ["plain", "encrypted"])
def test_flipping_any_byte_fails_verify_and_never_yields_other_bytes(images, tmp_path, kind):
    image, digest, key = images[kind]
    original = image.read_bytes()
    fs = open_image_fs(image, digest=digest, key=key)
    truth = _snapshot(fs)
    fs.close()
    copy = tmp_path / "copy.img"
    positions = _flip_positions(len(original))
    assert len(positions) > 60
    layout = Layout.of(Descriptor.parse(original[:DESCRIPTOR_SIZE]))
    regions = set()
    for pos in positions:
        data = bytearray(original)
        data[pos] ^= 0x01
        copy.write_bytes(bytes(data))
        regions.add(layout.region_of(pos // BLOCK_SIZE))
        with pytest.raises(IntegrityError) as info:
            verify_image(copy, digest=digest, key=key)
        assert str(copy) in str(info.value)
        # A pinned mount of the tampered image: every read gives the original
        # answer or fails with EIO; never different bytes.
        try:
            fs = open_image_fs(copy, digest=digest, key=key)
        except IntegrityError:
            continue
        try:
            for path, got in _snapshot(fs).items():
                if got != truth.get(path):
                    assert got == ["error", 5], (pos, path, got)
        finally:
            fs.close()
    assert {"header", "inode table", "metadata heap", "data", "merkle tree level 0"} <= regions


def test_verify_names_the_file_and_offset_of_a_bad_data_block(images, tmp_path):
    image, digest, _ = images["plain"]
    fs = open_image_fs(image, digest=digest, key=None)
    layout = fs.reader.layout
    rec = fs.record(lookup_path(fs, "blocks.bin").ino)
    _file_block, data_block, _count = EXTENT.unpack(fs.reader.heap(rec.ref, EXTENT.size))
    fs.close()
    bad = (layout.data_start + data_block + 2) * BLOCK_SIZE + 5  # third block of the file
    data = bytearray(image.read_bytes())
    data[bad] ^= 0xFF
    copy = tmp_path / "bad.img"
    copy.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"/blocks\.bin at offset 8192 \(data block"):
        verify_image(copy, digest=digest)
    fs = open_image_fs(copy, digest=digest, key=None)
    ino = lookup_path(fs, "blocks.bin").ino
    assert fs.read(ino, 0, 8192) == pattern("blocks", 8192)  # untouched blocks still read
    with pytest.raises(IntegrityError, match=r"/blocks\.bin: data at offset 8192"):
        fs.read(ino, 8000, 300)
    fs.close()


def test_truncated_extended_and_swapped_images_are_refused(images, tmp_path):
    image, digest, _ = images["plain"]
    data = image.read_bytes()
    cases = {
        "truncated": data[:-BLOCK_SIZE],
        "extended": data + bytes(BLOCK_SIZE),
        "cut mid-block": data[:-1],
    }
    for name, content in cases.items():
        copy = tmp_path / name
        copy.write_bytes(content)
        with pytest.raises(IntegrityError, match="truncated or extended"):
            open_image_fs(copy, digest=digest, key=None)
    # Two blocks of the data region swapped: both reads fail.
    layout = Layout.of(Descriptor.parse(data[:DESCRIPTOR_SIZE]))
    a, b = layout.data_start, layout.data_start + 1
    swapped = bytearray(data)
    swapped[a * BLOCK_SIZE : (a + 1) * BLOCK_SIZE] = data[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE]
    swapped[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE] = data[a * BLOCK_SIZE : (a + 1) * BLOCK_SIZE]
    (tmp_path / "swapped").write_bytes(bytes(swapped))
    with pytest.raises(IntegrityError, match="data block"):
        verify_image(tmp_path / "swapped", digest=digest)


def test_a_rebuilt_image_is_a_digest_mismatch(images, tmp_path):
    _image, digest, _ = images["plain"]
    changed = make_golden_tree(tmp_path / "src")
    (changed / "one").write_bytes(b"B")  # roll one file to another version
    other = build_image(changed, tmp_path / "other.img")
    with pytest.raises(IntegrityError, match="digest mismatch"):
        open_image_fs(tmp_path / "other.img", digest=digest, key=None)
    assert open_image_fs(tmp_path / "other.img", digest=other, key=None).digest == other


def test_wrong_and_missing_keys_are_clear(images):
    image, digest, _ = images["encrypted"]
    with pytest.raises(WrongKeyError, match="wrong key"):
        open_image_fs(image, digest=digest, key=OTHER_KEY)
    with pytest.raises(WrongKeyError, match="is encrypted: give its key"):
        open_image_fs(image, digest=digest, key=None)
    with pytest.raises(WrongKeyError, match="wrong key"):
        verify_image(image, key=OTHER_KEY)


def test_encrypted_images_hide_names_and_contents(images):
    image, _, _ = images["encrypted"]
    raw = image.read_bytes()
    for secret in (b"five-copy", b"zeros-inside", b"user.plain", b"in a dir", b"../one", b"linked"):
        assert secret not in raw
    assert pattern("five", 5000)[:64] not in raw
    plain, _, _ = images["plain"]
    assert b"five-copy" in plain.read_bytes()  # the check above could fail


def test_encrypted_build_is_reproducible_per_key(images, tmp_path):
    src = images["src"]
    image, digest, _ = images["encrypted"]
    assert build_image(src, tmp_path / "again.img", key=KEY) == digest
    assert (tmp_path / "again.img").read_bytes() == image.read_bytes()
    assert build_image(src, tmp_path / "other.img", key=OTHER_KEY) != digest


def test_not_an_image_is_a_format_error(tmp_path):
    cases = {
        "empty": b"",
        "text": b"hello\n" * 1000,
        "magic only": b"OCCLUMIM" + bytes(BLOCK_SIZE),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(FormatError):
            open_image_fs(tmp_path / name, digest=None, key=None)
    with pytest.raises(FormatError, match="is a directory"):
        open_image_fs(tmp_path, digest=None, key=None)


# -- crafted images: a consistent tree over inconsistent metadata ---------------------------

ALLOWED = (FormatError, FSError, IntegrityError)


def _exercise(image: Path) -> None:
    """Open and read everything; only clean errors may escape, quickly."""
    try:
        fs = open_image_fs(image, digest=None, key=None)
    except ALLOWED:
        return
    try:
        _snapshot(fs)
        verify_image(image)
    except ALLOWED:
        pass
    finally:
        fs.close()


@pytest.fixture(scope="module")
def small_image(tmp_path_factory):
    base = tmp_path_factory.mktemp("crafted")
    src = base / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "f").write_bytes(pattern("f", 9000))
    (src / "s").symlink_to("d/f")
    os.setxattr(src / "d", "user.x", b"y")
    image = base / "small.img"
    build_image(src, image)
    return image


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_crafted_metadata_gives_clean_errors_in_bounded_time(small_image, tmp_path, data):
    copy = tmp_path / "crafted.img"
    shutil.copyfile(small_image, copy)
    raw = copy.read_bytes()
    layout = Layout.of(Descriptor.parse(raw[:DESCRIPTOR_SIZE]))
    meta_end = layout.data_start * BLOCK_SIZE
    edits = data.draw(
        st.lists(
            st.tuples(
                st.integers(BLOCK_SIZE, meta_end - 8),
                st.sampled_from(["<Q", "<I", "<H", "<B"]),
                st.one_of(
                    st.integers(0, 255),
                    st.sampled_from([0, 1, 2, 3, 2**16 - 1, 2**31, 2**32 - 1]),
                ),
            ),
            min_size=1,
            max_size=6,
        )
    )

    def mutate(buf, _layout):
        for pos, fmt, value in edits:
            struct.pack_into(fmt, buf, pos, value & ((1 << (8 * struct.calcsize(fmt))) - 1))

    reseal(copy, mutate)
    start = time.perf_counter()
    _exercise(copy)
    assert time.perf_counter() - start < 5


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    fields=st.lists(
        st.tuples(st.integers(8, DESCRIPTOR_SIZE - 8), st.integers(0, 2**64 - 1)),
        min_size=1,
        max_size=4,
    )
)
def test_crafted_headers_give_clean_errors(small_image, tmp_path, fields):
    raw = bytearray(small_image.read_bytes())
    for pos, value in fields:
        struct.pack_into("<Q", raw, pos, value)
    copy = tmp_path / "header.img"
    copy.write_bytes(bytes(raw))
    start = time.perf_counter()
    _exercise(copy)
    assert time.perf_counter() - start < 5


def _record_at(raw, layout, ino) -> tuple[int, InodeRecord]:
    pos = layout.inode_start * BLOCK_SIZE + (ino - 1) * INODE_SIZE
    return pos, InodeRecord.unpack(raw, pos)


def _crafted(small_image: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "crafted.img"
    shutil.copyfile(small_image, copy)
    reseal(copy, edit)
    return copy


def test_a_directory_cycle_is_refused(small_image, tmp_path):
    def loop(raw, layout):
        # Point the entry "e" of /d at the root directory.
        fs_heap = layout.heap_start * BLOCK_SIZE
        _, d = _record_at(raw, layout, 2)
        for i in range(d.count):
            at = fs_heap + d.ref + i * DIRENT_SIZE
            _ino, nlen, noff = DIRENT.unpack_from(raw, at)
            if raw[fs_heap + noff : fs_heap + noff + nlen] == b"e":
                DIRENT.pack_into(raw, at, ROOT_INO, nlen, noff)

    fs = open_image_fs(_crafted(small_image, tmp_path, loop), digest=None, key=None)
    d = fs.lookup(ROOT_INO, b"d").ino
    with pytest.raises(MalformedImageError, match="wrong parent"):
        fs.lookup(d, b"e")
    with pytest.raises(MalformedImageError):
        list(fs.readdir(d, 0))
    assert (
        isinstance(MalformedImageError("x"), OcclumfsError) and MalformedImageError("x").errno == 5
    )


def test_huge_counts_fail_fast_without_allocating(small_image, tmp_path):
    def huge(raw, layout):
        for ino in (1, 2, 3):
            pos, rec = _record_at(raw, layout, ino)
            rec = rec._replace(count=2**32 - 1, xattr_count=2**32 - 1)
            raw[pos : pos + INODE_SIZE] = rec.pack()

    fs = open_image_fs(_crafted(small_image, tmp_path, huge), digest=None, key=None)
    start = time.perf_counter()
    for call in (
        lambda: list(fs.readdir(ROOT_INO, 0)),
        lambda: fs.lookup(ROOT_INO, b"d"),
        lambda: fs.listxattr(ROOT_INO),
        lambda: fs.readlink(3),
        lambda: fs.read(3, 0, 10),
    ):
        with pytest.raises((MalformedImageError, FSError)):
            call()
    assert time.perf_counter() - start < 1


def test_unknown_file_types_and_bad_extents_are_malformed(small_image, tmp_path):
    def bad(raw, layout):
        pos, rec = _record_at(raw, layout, 1)
        rec = rec._replace(mode=0o170000 | 0o755)
        raw[pos : pos + INODE_SIZE] = rec.pack()

    fs = open_image_fs(_crafted(small_image, tmp_path, bad), digest=None, key=None)
    with pytest.raises(MalformedImageError, match="bad type"):
        fs.getattr(ROOT_INO)
    fs.close()

    def far_extent(raw, layout):
        heap = layout.heap_start * BLOCK_SIZE
        for ino in range(1, 6):
            _pos, rec = _record_at(raw, layout, ino)
            if stat.S_ISREG(rec.mode) and rec.count:
                EXTENT.pack_into(raw, heap + rec.ref, 0, 2**40, 3)

    image = _crafted(small_image, tmp_path, far_extent)
    fs = open_image_fs(image, digest=None, key=None)
    f = fs.lookup(fs.lookup(ROOT_INO, b"d").ino, b"f").ino
    with pytest.raises(MalformedImageError, match="bad extent"):
        fs.read(f, 0, 100)
    fs.close()
    with pytest.raises(MalformedImageError, match="extent"):
        verify_image(image)
