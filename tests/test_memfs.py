"""MemFS internals the conformance suite cannot see: sparse storage and cookie bookkeeping."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from occlumfs.errors import FSError
from occlumfs.fs import BLOCK_SIZE, ROOT_INO, Caller
from occlumfs.memfs import MemFS, _SparseData

ME = Caller()

_offsets = st.integers(0, 6 * BLOCK_SIZE)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), _offsets, st.binary(max_size=3 * BLOCK_SIZE)),
        st.tuples(st.just("truncate"), _offsets, st.none()),
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(ops=_ops, reads=st.lists(st.tuples(_offsets, _offsets), max_size=10))
def test_sparse_data_behaves_like_a_byte_array(ops, reads):
    data, model = _SparseData(), bytearray()
    for op, offset, payload in ops:
        if op == "write":
            data.write(offset, payload)
            if offset + len(payload) > len(model):
                model.extend(bytes(offset + len(payload) - len(model)))
            model[offset : offset + len(payload)] = payload
        else:
            data.truncate(offset)
            del model[offset:]
            model.extend(bytes(offset - len(model)))
        assert data.size == len(model)
        assert data.allocated <= -(-len(model) // BLOCK_SIZE) * BLOCK_SIZE + BLOCK_SIZE
    for offset, size in reads:
        assert data.read(offset, size) == bytes(model[offset : offset + size])
    assert data.read(0, len(model)) == bytes(model)


def test_holes_cost_no_memory():
    data = _SparseData()
    data.write(1 << 40, b"far")
    assert data.size == (1 << 40) + 3 and data.allocated == BLOCK_SIZE
    assert data.read((1 << 40) - 2, 10) == b"\0\0far"
    data.truncate(10)
    assert data.allocated == 0 and data.read(0, 100) == bytes(10)


def test_readdir_cookies_survive_removals_and_compaction():
    fs = MemFS()
    names = [f"f{i:04d}".encode() for i in range(1000)]
    for name in names:
        fs.mknod(ROOT_INO, name, stat.S_IFREG | 0o644, 0, ME)
    listing = list(fs.readdir(ROOT_INO, 0))
    resume_after = listing[499].next_offset
    for name in names[:499] + names[600:]:  # enough removals to compact the cookie list
        fs.unlink(ROOT_INO, name)
    assert [e.name for e in fs.readdir(ROOT_INO, resume_after)] == names[500:600]
    assert [e.name for e in fs.readdir(ROOT_INO, 0)] == names[499:600]
    fs.mknod(ROOT_INO, b"new", stat.S_IFREG, 0, ME)
    assert [e.name for e in fs.readdir(ROOT_INO, listing[-1].next_offset)] == [b"new"]


def test_a_listing_in_progress_survives_compaction():
    fs = MemFS()
    for i in range(300):
        fs.mknod(ROOT_INO, f"f{i:03d}".encode(), stat.S_IFREG, 0, ME)
    listing = fs.readdir(ROOT_INO, 0)
    seen = [next(listing).name]
    for i in range(1, 300, 2):
        fs.unlink(ROOT_INO, f"f{i:03d}".encode())
    seen += [e.name for e in listing]
    assert seen == [b"f000"] + [f"f{i:03d}".encode() for i in range(2, 300, 2)]


def test_nodes_are_freed_at_last_link_and_last_close():
    fs = MemFS()
    fh, attr = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, ME)
    fs.link(attr.ino, ROOT_INO, b"g")
    fs.unlink(ROOT_INO, b"f")
    fs.unlink(ROOT_INO, b"g")
    assert fs.getattr(attr.ino).nlink == 0  # open: still there
    with pytest.raises(FSError) as info:
        fs.link(attr.ino, ROOT_INO, b"h")  # no resurrection of an unlinked inode
    assert info.value.errno == errno.ENOENT
    fs.release(fh)
    with pytest.raises(FSError) as info:
        fs.getattr(attr.ino)
    assert info.value.errno == errno.ENOENT


def test_statfs_counts_stored_blocks():
    fs = MemFS()
    before = fs.statfs()
    fh, _ = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, ME)
    fs.write(fh, 0, bytes(10 * BLOCK_SIZE))
    fs.write(fh, 1 << 30, b"x")  # a hole costs nothing
    fs.release(fh)
    after = fs.statfs()
    assert before.bfree - after.bfree == 11
    assert after.bsize == after.frsize == BLOCK_SIZE


def test_mknod_without_a_type_is_a_regular_file_and_symlink_targets_are_checked():
    fs = MemFS()
    assert stat.S_ISREG(fs.mknod(ROOT_INO, b"plain", 0o600, 0, ME).mode)
    with pytest.raises(FSError) as info:
        fs.mknod(ROOT_INO, b"dir", stat.S_IFDIR | 0o755, 0, ME)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(FSError) as info:
        fs.symlink(ROOT_INO, b"empty", b"", ME)
    assert info.value.errno == errno.ENOENT
