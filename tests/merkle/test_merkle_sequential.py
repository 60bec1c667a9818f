"""Sequential reads of a large file in big requests (as the kernel sends them): the
right bytes, plain and encrypted, and only the reads touching a bad block fail."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from merkle.trees import big_file_tree
from occlumfs.errors import IntegrityError
from occlumfs.merkle import build_image, open_image_fs
from occlumfs.merkle.format import BLOCK_SIZE

KEY = bytes(range(16))
MiB = 1 << 20
# Ten requests of 1 MiB plus a ragged end.
SIZE = 10 * MiB + 3 * BLOCK_SIZE + 17


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, bytes]:
    src = tmp_path_factory.mktemp("readahead") / "src"
    return src, big_file_tree(src, SIZE, 11, {"after.bin": b"next file" * 1000})


def _image(tree, tmp_path: Path, key: bytes | None) -> tuple[Path, str]:
    image = tmp_path / "big.img"
    return image, build_image(tree[0], image, key=key)


def _file_offset(image: Path, digest: str, key: bytes | None) -> int:
    """Byte offset in the image of the first data block of big.bin."""
    fs = open_image_fs(image, digest=digest, key=key)
    try:
        rec = fs.record(fs.lookup(1, b"big.bin").ino)
        ((first, data, _count),) = list(fs.extents(rec))
        assert first == 0
        return (fs.reader.layout.data_start + data) * BLOCK_SIZE
    finally:
        fs.close()


def _read_sequentially(image: Path, digest: str, key: bytes | None, size: int):
    """(offset, bytes or 'EIO') of each request of ``size`` over big.bin, in order."""
    fs = open_image_fs(image, digest=digest, key=key)
    out = []
    try:
        ino = fs.lookup(1, b"big.bin").ino
        fh = fs.open(ino, os.O_RDONLY)
        for off in range(0, SIZE, size):
            try:
                out.append((off, fs.read(fh, off, size)))
            except IntegrityError:
                out.append((off, "EIO"))
        return out, fs
    except BaseException:
        fs.close()
        raise


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
@pytest.mark.parametrize("size", [MiB, 128 * 1024, 300 * BLOCK_SIZE + 5])
def test_sequential_reads_match_the_source(tree, tmp_path, key, size):
    image, digest = _image(tree, tmp_path, key)
    got, fs = _read_sequentially(image, digest, key, size)
    fs.close()
    data = tree[1]
    for off, chunk in got:
        assert chunk == data[off : off + size], off


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
@pytest.mark.parametrize("bad_block", [5, 256, 300, 1000, 2559, 2561])
def test_a_flipped_block_fails_exactly_the_reads_touching_it(tree, tmp_path, key, bad_block):
    image, digest = _image(tree, tmp_path, key)
    at = _file_offset(image, digest, key) + bad_block * BLOCK_SIZE + 1234
    with open(image, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x40]))
    got, fs = _read_sequentially(image, digest, key, MiB)
    fs.close()
    data = tree[1]
    for off, chunk in got:
        touches = off // BLOCK_SIZE <= bad_block < (off + MiB) // BLOCK_SIZE
        if touches:
            assert chunk == "EIO", off
        else:
            assert chunk == data[off : off + MiB], off


@pytest.mark.parametrize("bad_block", [300, 1500])
def test_a_bad_seal_block_fails_only_the_reads_needing_it(tree, tmp_path, bad_block):
    image, digest = _image(tree, tmp_path, KEY)
    fs = open_image_fs(image, digest=digest, key=KEY)
    try:
        layout = fs.reader.layout
        first = (_file_offset(image, digest, KEY)) // BLOCK_SIZE
    finally:
        fs.close()
    # The seal-table block holding the seal of file block ``bad_block`` (one
    # holds the seals of 128 consecutive blocks): every block it covers fails.
    seals_per_block = BLOCK_SIZE // 32
    seal_block = layout.seal_start + (first + bad_block - 1) // seals_per_block
    covered = range(
        (seal_block - layout.seal_start) * seals_per_block + 1 - first,
        (seal_block - layout.seal_start + 1) * seals_per_block + 1 - first,
    )
    with open(image, "r+b") as f:
        f.seek(seal_block * BLOCK_SIZE + 7)
        byte = f.read(1)
        f.seek(seal_block * BLOCK_SIZE + 7)
        f.write(bytes([byte[0] ^ 1]))
    got, fs = _read_sequentially(image, digest, KEY, MiB)
    fs.close()
    data = tree[1]
    for off, chunk in got:
        blocks = range(off // BLOCK_SIZE, -(-min(off + MiB, SIZE) // BLOCK_SIZE))
        if set(blocks) & set(covered):
            assert chunk == "EIO", off
        else:
            assert chunk == data[off : off + MiB], off
