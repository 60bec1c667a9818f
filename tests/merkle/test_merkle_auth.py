"""Encrypted images authenticate their own header: spliced blocks never verify unpinned.

Sealing binds a block to its position, not to its image. Before format
version 2, blocks (and their seal entries) copied from other images built
with the same key, under a recomputed tree and header, opened and verified
whenever no digest was pinned (issue 6, section 3).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from merkle.trees import reseal, set_times
from occlumfs.errors import ExitCode, IntegrityError
from occlumfs.fs import lookup_path, read_all
from occlumfs.keys import write_key_file
from occlumfs.merkle import build_image, open_image_fs, read_digest, verify_image
from occlumfs.merkle.crypto import ImageKeys
from occlumfs.merkle.format import (
    BLOCK_SIZE,
    DESCRIPTOR_SIZE,
    EXTENT,
    SEAL_SIZE,
    Descriptor,
    Layout,
)
from occlumfs.mount import mounted_paths

KEY = bytes(range(16))
GOLDEN = Path(__file__).resolve().parent.parent / "fixtures" / "golden"
BLOCKS = 3


def _image(base: Path, name: str, fill: bytes) -> Path:
    """An image of one 3-block file whose blocks are all ``fill``: same layout every time."""
    src = base / f"src-{name}"
    src.mkdir()
    (src / "f").write_bytes(fill * (BLOCKS * BLOCK_SIZE))
    set_times(src)
    image = base / f"{name}.img"
    build_image(src, image, key=KEY)
    return image


def _data_block(image: Path, file_block: int) -> int:
    fs = open_image_fs(image, digest=None, key=KEY)
    try:
        rec = fs.record(lookup_path(fs, "f").ino)
        first, data, _count = EXTENT.unpack(fs.reader.heap(rec.ref, EXTENT.size))
        return fs.reader.layout.data_start + data + file_block - first
    finally:
        fs.close()


@pytest.fixture(scope="module")
def spliced(tmp_path_factory):
    """A third image with one data block (and its seal) from each of two others."""
    base = tmp_path_factory.mktemp("splice")
    donor_a, donor_b = _image(base, "a", b"A"), _image(base, "b", b"B")
    victim = _image(base, "c", b"C")
    blocks = [_data_block(victim, 0), _data_block(victim, 1)]
    assert blocks == [_data_block(donor_a, 0), _data_block(donor_b, 1)]
    forged = base / "forged.img"
    shutil.copyfile(victim, forged)

    def splice(raw: bytearray, layout: Layout) -> None:
        for donor, block in zip((donor_a, donor_b), blocks, strict=True):
            theirs = donor.read_bytes()
            at = block * BLOCK_SIZE
            raw[at : at + BLOCK_SIZE] = theirs[at : at + BLOCK_SIZE]
            seal = layout.seal_start * BLOCK_SIZE + (block - 1) * SEAL_SIZE
            raw[seal : seal + SEAL_SIZE] = theirs[seal : seal + SEAL_SIZE]

    reseal(forged, splice)
    return forged, blocks


def test_spliced_blocks_still_open_on_their_own(spliced):
    # The premise of the attack: each spliced block is a valid seal at its
    # position, so nothing but the header can tell this image was never built.
    forged, blocks = spliced
    raw = forged.read_bytes()
    layout = Layout.of(Descriptor.parse(raw[:DESCRIPTOR_SIZE]))
    keys = ImageKeys(KEY)
    for block, fill in zip(blocks, (b"A", b"B"), strict=True):
        ciphertext = raw[block * BLOCK_SIZE : (block + 1) * BLOCK_SIZE]
        at = layout.seal_start * BLOCK_SIZE + (block - 1) * SEAL_SIZE
        assert keys.open(block, ciphertext, raw[at : at + SEAL_SIZE]) == fill * BLOCK_SIZE


def test_a_spliced_image_fails_open_and_verify(spliced):
    forged, _ = spliced
    with pytest.raises(IntegrityError, match="header is not authenticated by this key"):
        open_image_fs(forged, digest=None, key=KEY)
    with pytest.raises(IntegrityError, match="header is not authenticated by this key"):
        verify_image(forged, key=KEY)


def test_a_spliced_image_fails_verify_and_mount_from_the_cli(spliced, tmp_path):
    forged, _ = spliced
    key_file = tmp_path / "key"
    write_key_file(key_file, KEY)
    done = run_cli("verify", forged, "--key-file", key_file, check=False)
    assert done.returncode == ExitCode.INTEGRITY, done.stderr
    assert "not authenticated by this key" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = run_cli("mount", forged, mnt, "--key-file", key_file, check=False)
    assert done.returncode == ExitCode.INTEGRITY, done.stderr
    assert mnt.resolve() not in mounted_paths()


def test_any_header_mac_bit_flip_is_refused(tmp_path):
    image = _image(tmp_path, "one", b"x")
    raw = image.read_bytes()
    for pos in (DESCRIPTOR_SIZE, DESCRIPTOR_SIZE + 17, DESCRIPTOR_SIZE + 31):
        bad = tmp_path / f"bad-{pos}.img"
        data = bytearray(raw)
        data[pos] ^= 0x01
        bad.write_bytes(bytes(data))
        assert read_digest(bad) == read_digest(image)  # the MAC is not part of the digest
        for digest in (None, read_digest(image)):
            with pytest.raises(IntegrityError, match="not authenticated"):
                open_image_fs(bad, digest=digest, key=KEY)
    # A MAC on a plain image is a byte where zeros belong.
    src = tmp_path / "plain-src"
    src.mkdir()
    plain = tmp_path / "plain.img"
    build_image(src, plain)
    data = bytearray(plain.read_bytes())
    data[DESCRIPTOR_SIZE + 3] = 1
    plain.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="non-zero bytes after the descriptor"):
        open_image_fs(plain, digest=None, key=None)


def test_version_1_encrypted_images_open_only_when_pinned(tmp_path):
    image = GOLDEN / "image-v1-encrypted.img"
    digest = (GOLDEN / "image-v1-encrypted.digest").read_text().strip()
    with pytest.raises(IntegrityError, match="version 1 encrypted image is not authenticated"):
        open_image_fs(image, digest=None, key=KEY)
    fs = open_image_fs(image, digest=digest, key=KEY)
    try:
        assert b"".join(read_all(fs, lookup_path(fs, "one").ino)) == b"A"
    finally:
        fs.close()
    key_file = tmp_path / "key"
    write_key_file(key_file, KEY)
    done = run_cli("verify", image, "--key-file", key_file, check=False)
    assert done.returncode == ExitCode.INTEGRITY and "pin its digest" in done.stderr
    run_cli("verify", image, "--key-file", key_file, "--digest", digest)
    # A plain v1 image was never authenticated by anything but a pin: it reads as before.
    plain = open_image_fs(GOLDEN / "image-v1.img", digest=None, key=None)
    try:
        assert plain.reader.desc.version == 1
    finally:
        plain.close()


def test_unpinned_warnings_say_what_authenticates_the_image(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    plain, encrypted = tmp_path / "plain.img", tmp_path / "enc.img"
    digest = build_image(src, plain)
    build_image(src, encrypted, key=KEY)
    for image, key, words in (
        (plain, None, "authenticated by nothing"),
        (encrypted, KEY, "authenticated by its key"),
    ):
        fs = open_image_fs(image, digest=None, key=key)
        try:
            assert words in fs.unpinned_warning()
        finally:
            fs.close()
    fs = open_image_fs(plain, digest=digest, key=None)
    try:
        assert fs.unpinned_warning() is None
    finally:
        fs.close()
