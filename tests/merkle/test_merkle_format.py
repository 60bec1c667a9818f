"""The pure format code: offset math over thousands of values, pack/parse round trips."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from occlumfs.errors import FormatError
from occlumfs.merkle.crypto import ImageKeys
from occlumfs.merkle.format import (
    BLOCK_SIZE,
    DESCRIPTOR_SIZE,
    DIRENT,
    EXTENT,
    HASH_SIZE,
    HASHES_PER_BLOCK,
    INODE_SIZE,
    SEALS_PER_BLOCK,
    Descriptor,
    InodeRecord,
    Layout,
    MalformedImageError,
    TreeGeometry,
    blocks_for,
    dir_size,
    pack_xattrs,
    parse_digest,
    unpack_xattrs,
)
from occlumfs.merkle.tree import build_levels, hash_blocks


def _naive_counts(leaves: int) -> list[int]:
    counts = [(leaves + 127) // 128]
    while counts[-1] > 1:
        counts.append((counts[-1] + 127) // 128)
    return counts


LEAF_COUNTS = [*range(1, 3000), 16383, 16384, 16385, 128**2, 128**2 + 1, 128**3, 128**3 + 1, 10**9]


def test_tree_geometry_matches_a_naive_count():
    for leaves in LEAF_COUNTS:
        geo = TreeGeometry.for_leaves(leaves)
        assert list(geo.counts) == _naive_counts(leaves), leaves
        assert geo.starts[0] == 0
        for k in range(1, geo.levels):
            assert geo.starts[k] == geo.starts[k - 1] + geo.counts[k - 1]
        assert geo.blocks == sum(geo.counts)
        assert geo.counts[-1] == 1


def test_every_tree_block_has_one_parent_slot_in_range():
    for leaves in [*range(1, 600, 7), 128**2 + 5]:
        geo = TreeGeometry.for_leaves(leaves)
        for level in range(geo.levels):
            slots = set()
            for index in range(geo.counts[level]):
                parent = geo.parent(level, index)
                if level == geo.levels - 1:
                    assert parent is None
                    continue
                p_level, p_index, off = parent
                assert p_level == level + 1
                assert 0 <= p_index < geo.counts[p_level]
                assert 0 <= off <= BLOCK_SIZE - HASH_SIZE and off % HASH_SIZE == 0
                slots.add((p_index, off))
            if level < geo.levels - 1:
                assert len(slots) == geo.counts[level]  # no two blocks share a slot


def test_leaf_slots_are_distinct_and_dense():
    geo = TreeGeometry.for_leaves(5000)
    seen = set()
    for i in range(5000):
        index, off = geo.leaf_slot(i)
        assert index * HASHES_PER_BLOCK + off // HASH_SIZE == i
        assert 0 <= index < geo.counts[0]
        seen.add((index, off))
    assert len(seen) == 5000


@pytest.mark.parametrize("encrypted", [False, True])
def test_layout_regions_are_contiguous_and_sized(encrypted):
    for inodes in (1, 2, 63, 64, 65, 127, 128, 129, 1000, 100_000):
        for heap in (0, 1, 4095, 4096, 4097, 10**6):
            for data in (0, 1, 127, 128, 129, 5000, 262_144):
                lay = Layout.compute(inodes, heap, data, encrypted)
                assert lay.inode_start == 1
                assert lay.heap_start - lay.inode_start == blocks_for(inodes * INODE_SIZE)
                assert lay.data_start - lay.heap_start == blocks_for(heap)
                assert lay.seal_start - lay.data_start == data
                sealed = lay.seal_start - 1
                want_seals = -(-sealed // SEALS_PER_BLOCK) if encrypted else 0
                assert lay.seal_blocks == want_seals
                assert lay.tree_start == lay.seal_start + lay.seal_blocks
                assert lay.tree.leaves == lay.covered_blocks == lay.tree_start - 1
                assert lay.image_blocks == lay.tree_start + lay.tree.blocks


def test_region_names_cover_every_block():
    lay = Layout.compute(100, 9000, 300, True)
    names = [lay.region_of(b) for b in range(lay.image_blocks + 1)]
    assert names[0] == "header"
    assert names[lay.inode_start] == "inode table"
    assert names[lay.heap_start] == "metadata heap"
    assert names[lay.data_start] == "data"
    assert names[lay.seal_start] == "seal table"
    assert names[lay.tree_start] == "merkle tree level 0"
    assert names[lay.image_blocks - 1] == f"merkle tree level {lay.tree.levels - 1}"
    assert names[lay.image_blocks] == "beyond the image"


def test_tree_block_addresses_are_distinct_and_inside_the_tree():
    lay = Layout.compute(10, 100, 128**2 + 3, False)
    addresses = [
        lay.tree_block(level, i)
        for level in range(lay.tree.levels)
        for i in range(lay.tree.counts[level])
    ]
    assert len(set(addresses)) == len(addresses) == lay.tree.blocks
    assert min(addresses) == lay.tree_start and max(addresses) == lay.image_blocks - 1


def _descriptor(encrypted=False, **changes) -> Descriptor:
    lay = Layout.compute(10, 5000, 20, encrypted)
    fields = dict(
        flags=1 if encrypted else 0,
        image_blocks=lay.image_blocks,
        inode_count=10,
        heap_bytes=5000,
        data_blocks=20,
        sealed_blocks=lay.seal_start - 1 if encrypted else 0,
        root_hash=bytes(range(32)),
        key_check=ImageKeys(bytes(16)).key_check if encrypted else bytes(32),
    )
    fields.update(changes)
    return Descriptor(**fields)


@pytest.mark.parametrize("encrypted", [False, True])
def test_descriptor_round_trips(encrypted):
    desc = _descriptor(encrypted)
    raw = desc.pack()
    assert len(raw) == DESCRIPTOR_SIZE
    assert Descriptor.parse(raw) == desc
    assert desc.digest() == "sha256:" + hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "message"),
    [
        (0, "8s", b"NOTANIMG", "bad magic"),
        (8, "I", 3, "version 3"),
        (8, "I", 0, "version 0"),
        (12, "I", 4, "unknown flags"),
        (16, "I", 512, "block size"),
        (20, "I", 2, "hash algorithm"),
        (24, "Q", 0, "image size"),
        (24, "Q", 1 << 50, "image size"),
        (32, "Q", 0, "inode count"),
        (32, "Q", 1 << 40, "inode count"),
        (40, "Q", 1 << 45, "region size"),
        (48, "Q", 21, "inconsistent"),
        (24, "Q", 26, "do not add up"),
        (56, "Q", 3, "seals or key check"),
        (64, "Q", 1, "inconsistent"),
        (72, "Q", 9, "inconsistent"),
        (80, "Q", 9, "inconsistent"),
        (88, "I", 3, "inconsistent"),
    ],
)
def test_descriptor_parse_rejects_each_bad_field(offset, fmt, value, message):
    raw = bytearray(_descriptor().pack())
    struct.pack_into("<" + fmt, raw, offset, value)
    with pytest.raises(FormatError, match=message):
        Descriptor.parse(bytes(raw))


def test_descriptor_parse_rejects_key_check_mismatches():
    with pytest.raises(FormatError, match="without a key check"):
        Descriptor.parse(_descriptor(True, key_check=bytes(32)).pack())
    with pytest.raises(FormatError, match="short"):
        Descriptor.parse(b"OCCLUMIM")


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=DESCRIPTOR_SIZE, max_size=DESCRIPTOR_SIZE))
def test_random_descriptors_parse_or_fail_cleanly(raw):
    try:
        desc = Descriptor.parse(b"OCCLUMIM" + raw[8:])
    except FormatError:
        return
    assert desc.image_blocks == Layout.of(desc).image_blocks


@settings(max_examples=200, deadline=None)
@given(
    mode=st.integers(0, 2**32 - 1),
    nlink=st.integers(0, 2**32 - 1),
    size=st.integers(0, 2**64 - 1),
    mtime=st.integers(-(2**63), 2**63 - 1),
    aux=st.integers(0, 2**64 - 1),
    count=st.integers(0, 2**32 - 1),
)
def test_inode_records_round_trip(mode, nlink, size, mtime, aux, count):
    rec = InodeRecord(mode, nlink, 7, 8, size, mtime, aux, 12345, count, 3, 99)
    raw = rec.pack()
    assert len(raw) == INODE_SIZE
    assert InodeRecord.unpack(b"x" * 64 + raw, 64) == rec


def test_fixed_records_have_the_documented_sizes():
    assert (DIRENT.size, EXTENT.size, INODE_SIZE, DESCRIPTOR_SIZE) == (16, 24, 64, 156)
    assert DIRENT.unpack(DIRENT.pack(5, 255, 1 << 40)) == (5, 255, 1 << 40)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.binary(min_size=1, max_size=255), st.binary(max_size=300), max_size=20))
def test_xattrs_round_trip(xattrs):
    items = sorted(xattrs.items())
    raw = pack_xattrs(list(xattrs.items()))
    assert unpack_xattrs(raw, len(items)) == items
    if items:
        with pytest.raises(MalformedImageError):
            unpack_xattrs(raw[:-1] if raw else raw, len(items) + 1)


def test_dir_size_is_whole_blocks():
    assert dir_size(0, 0) == BLOCK_SIZE
    assert dir_size(1, 4080) == BLOCK_SIZE
    assert dir_size(1, 4081) == 2 * BLOCK_SIZE
    for n in range(0, 3000, 37):
        assert dir_size(n, n * 9) % BLOCK_SIZE == 0 and dir_size(n, n * 9) >= n * 25


def test_parse_digest_normalises_and_refuses():
    hexd = "ab" * 32
    assert parse_digest(f"  SHA256:{hexd.upper()} ") == f"sha256:{hexd}"
    assert parse_digest(hexd) == f"sha256:{hexd}"
    for bad in ("", "sha256:", "sha256:" + "g" * 64, "sha256:" + "a" * 63, "md5:" + hexd):
        with pytest.raises(FormatError, match="not an image digest"):
            parse_digest(bad)


def test_tree_levels_hash_what_the_spec_says():
    leaves = b"".join(hashlib.sha256(i.to_bytes(2, "little")).digest() for i in range(300))
    geo = TreeGeometry.for_leaves(300)
    levels, root = build_levels(leaves, geo)
    assert [len(level) // BLOCK_SIZE for level in levels] == list(geo.counts) == [3, 1]
    assert levels[0][: len(leaves)] == leaves and not any(levels[0][len(leaves) :])
    assert levels[1][: 3 * HASH_SIZE] == hash_blocks(levels[0])
    assert root == hashlib.sha256(levels[1]).digest()


def test_sealing_is_deterministic_bound_to_position_and_key():
    keys = ImageKeys(bytes(range(16)))
    plain = bytes(range(256)) * 16
    ct, seal = keys.seal(7, plain)
    assert (ct, seal) == keys.seal(7, plain)  # reproducible
    assert ct != plain and len(ct) == BLOCK_SIZE and len(seal) == 32
    assert keys.open(7, ct, seal) == plain
    assert keys.seal(8, plain)[0] != ct  # equal blocks at other positions look unrelated
    assert keys.open(8, ct, seal) is None  # a moved block fails its tag
    assert ImageKeys(bytes(16)).open(7, ct, seal) is None
    assert not ImageKeys(bytes(16)).matches(keys.key_check)
    assert keys.matches(ImageKeys(bytes(range(16))).key_check)
