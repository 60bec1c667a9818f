"""The pure format code: offsets, records, head, root and pages (docs/formats/sefs.md)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from occlumfs.errors import FormatError, IntegrityError
from occlumfs.sefs import format as fmt

MAC_KEY = b"m" * 32
FS_ID = bytes(range(16))


@given(st.integers(0, 1 << 45), st.integers(1, 1 << 22))
def test_block_span_covers_exactly_the_bytes(offset, size):
    first, last = fmt.block_span(offset, size)
    assert first * 4096 <= offset < (first + 1) * 4096
    assert last * 4096 <= offset + size - 1 < (last + 1) * 4096


@given(st.integers(0, 1 << 40))
def test_chunk_of_inverts(block):
    chunk, off = fmt.chunk_of(block)
    assert chunk * fmt.CHUNK_BLOCKS + off // fmt.ENTRY_SIZE == block
    assert off % fmt.ENTRY_SIZE == 0 and off < fmt.CHUNK_BLOCKS * fmt.ENTRY_SIZE


@pytest.mark.parametrize(
    ("size", "blocks"),
    [(0, 0), (1, 1), (4095, 1), (4096, 1), (4097, 2), (5000, 2), (5 << 30, 1310720)],
)
def test_blocks_for(size, blocks):
    assert fmt.blocks_for(size) == blocks


def test_trim_chunk_keeps_entries_whose_tag_ends_in_zeros():
    entry = bytes([fmt.SLOT_A]) + b"\x07" * 12 + b"\x09" * 8 + bytes(8)
    chunk = bytearray(entry + bytes(fmt.ENTRY_SIZE * 3))
    assert fmt.trim_chunk(chunk) == entry
    assert fmt.trim_chunk(bytearray(fmt.ENTRY_SIZE * 2)) == b""


def _head() -> fmt.Head:
    return fmt.Head(FS_ID, 7, fmt.ObjectRef(7, 123, 456, b"t" * 16))


def test_head_round_trip_and_size():
    raw = fmt.pack_head(_head(), MAC_KEY)
    assert len(raw) == fmt.HEAD_SIZE == 100
    assert fmt.parse_head(raw, FS_ID, MAC_KEY) == _head()


def test_every_head_byte_is_authenticated():
    raw = fmt.pack_head(_head(), MAC_KEY)
    for i in range(len(raw)):
        flipped = bytearray(raw)
        flipped[i] ^= 0x01
        with pytest.raises(IntegrityError):
            fmt.parse_head(bytes(flipped), FS_ID, MAC_KEY)
    with pytest.raises(IntegrityError):
        fmt.parse_head(raw, FS_ID, b"x" * 32)
    with pytest.raises(IntegrityError, match="another filesystem"):
        other = fmt.pack_head(fmt.Head(b"o" * 16, 7, _head().root), MAC_KEY)
        fmt.parse_head(other, FS_ID, MAC_KEY)


def test_root_round_trip_and_rejects_unordered_ranges():
    firsts = [b"", b"e\x00a", b"i\x00\x01", b"m"]
    pages = [fmt.ObjectRef(i, i * 10, 99, bytes([i]) * 16) for i in range(4)]
    root = fmt.Root(42, firsts, pages)
    assert fmt.parse_root(fmt.pack_root(root)) == root
    for bad in ([b"x", *firsts[1:]], [b"", b"m", b"i", b"z"], [b"", b"a", b"a", b"b"]):
        with pytest.raises(IntegrityError):
            fmt.parse_root(fmt.pack_root(fmt.Root(42, bad, pages)))
    with pytest.raises(IntegrityError):
        fmt.parse_root(fmt.pack_root(fmt.Root(42, [], [])))
    for cut in range(1, len(fmt.pack_root(root))):
        with pytest.raises(IntegrityError):
            fmt.parse_root(fmt.pack_root(root)[:cut])


def test_page_round_trip_and_truncation():
    records = [(fmt.inode_key(5), b"v" * 10), (fmt.entry_key(1, b"name"), fmt.pack_entry(5, 3))]
    raw = fmt.pack_page(records)
    assert fmt.parse_page(raw) == records
    for cut in range(1, len(raw)):
        with pytest.raises(IntegrityError):
            fmt.parse_page(raw[:cut])
    with pytest.raises(IntegrityError):
        fmt.parse_page(raw + b"\0")


def test_inode_record_round_trip():
    rec = fmt.InodeRecord(
        0o40755,
        3,
        1000,
        1000,
        0,
        0,
        -5,
        1_700_000_000_123_456_789,
        3,
        1,
        17,
        4,
        b"",
        {b"user.a": b"1", b"user.b": bytes(300)},
    )
    assert fmt.parse_inode(fmt.pack_inode(rec)) == rec
    link = fmt.InodeRecord(0o120777, 1, 0, 0, 0, 5, 0, 0, 0, target=b"a/b/c")
    assert fmt.parse_inode(fmt.pack_inode(link)) == link
    with pytest.raises(IntegrityError):
        fmt.parse_inode(fmt.pack_inode(link)[:-2])


def test_keys_split_back():
    assert fmt.split_key(fmt.entry_key(9, b"x/y")) == (b"e", 9, b"x/y")
    assert fmt.split_key(fmt.map_key(9, 2)) == (b"m", 9, (2).to_bytes(8, "big"))


def test_host_names_parse_back():
    assert fmt.parse_pack_name(fmt.pack_name(0x1234).split("/")[1]) == 0x1234
    assert fmt.parse_pack_name("0000000000000001.tmp") is None
    for slot in (fmt.SLOT_A, fmt.SLOT_B):
        assert fmt.parse_data_name(fmt.data_name(77, slot).split("/")[1]) == 77
    assert fmt.parse_data_name("junk") is None


def test_associated_data_binds_position_and_identity():
    prefix = fmt.data_ad_prefix(FS_ID)
    ads = {fmt.data_ad(prefix, ino, block) for ino in (1, 2) for block in (0, 1)}
    assert len(ads) == 4
    assert fmt.page_ad(FS_ID, 1, b"i") != fmt.page_ad(FS_ID, 2, b"i")
    assert fmt.page_ad(FS_ID, 1, b"i") != fmt.page_ad(FS_ID, 1, b"m")
    assert fmt.root_ad(FS_ID, 1) != fmt.root_ad(FS_ID, 2)


def test_unknown_version_is_a_format_error():
    fmt.check_version(1)
    with pytest.raises(FormatError, match="version 2"):
        fmt.check_version(2)
