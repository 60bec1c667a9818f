"""SefsFS in-process: what survives a close and reopen, and what the host sees of it."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest

from occlumfs.errors import FSError
from occlumfs.fs import ROOT_INO, AttrChanges, iter_dir, lookup_path
from sefs.helpers import ROOT, fsck_problems, read_path, write_file

GiB = 1 << 30


def test_everything_survives_reopen(volume):
    fs = volume.open()
    d = fs.mkdir(ROOT_INO, b"dir", 0o750, ROOT)
    ino = write_file(fs, d.ino, b"file", b"hello" * 2000)
    fs.link(ino, ROOT_INO, b"hard")
    fs.symlink(d.ino, b"sym", b"../hard", ROOT)
    fs.setxattr(ino, b"user.k", b"v" * 1000)
    fs.mknod(ROOT_INO, b"fifo", stat.S_IFIFO | 0o600, 0, ROOT)
    fs.setattr(ino, AttrChanges(mode=0o4711, uid=7, gid=8, atime_ns=11, mtime_ns=1_234_567_891))
    sparse = write_file(fs, ROOT_INO, b"sparse", b"")
    fh = fs.open(sparse, os.O_WRONLY)
    fs.write(fh, 5 * GiB, b"far away")
    fs.write(fh, 3, b"near")
    fs.release(fh)
    before = {e.name: e.attr for e in iter_dir(fs, ROOT_INO)}
    fs.close()

    fs = volume.open()
    after = {e.name: e.attr for e in iter_dir(fs, ROOT_INO)}
    assert after == before
    attr = lookup_path(fs, "dir/file")
    assert (attr.mode, attr.uid, attr.gid, attr.atime_ns, attr.mtime_ns, attr.nlink) == (
        stat.S_IFREG | 0o4711,
        7,
        8,
        11,
        1_234_567_891,
        2,
    )
    assert read_path(fs, "hard") == b"hello" * 2000
    assert fs.readlink(lookup_path(fs, "dir/sym").ino) == b"../hard"
    assert fs.getxattr(attr.ino, b"user.k") == b"v" * 1000
    assert stat.S_ISFIFO(lookup_path(fs, "fifo").mode)
    fh = fs.open(sparse, os.O_RDONLY)
    assert fs.read(fh, 0, 8) == b"\0\0\0near\0"[:8]
    assert fs.read(fh, 5 * GiB - 2, 100) == b"\0\0far away"
    assert fs.read(fh, 2 * GiB, 4096) == bytes(4096)
    fs.release(fh)
    # Two stored blocks, not a 5 GiB file of encrypted zeros.
    assert lookup_path(fs, "sparse").blocks == 2 * 8
    fs.close()
    data_files = list((volume.dir / "d").iterdir())
    assert sum(p.stat().st_blocks for p in data_files) * 512 < 1 << 20
    assert fsck_problems(volume.open) == []


def test_truncate_shrink_then_grow_reads_zeros_after_reopen(sim):
    fs = sim.open()
    ino = write_file(fs, ROOT_INO, b"f", os.urandom(3 * 4096 + 100))
    fs.setattr(ino, AttrChanges(size=100))
    fs.setattr(ino, AttrChanges(size=20_000))
    fs.close()
    fs = sim.open()
    data = read_path(fs, "f")
    assert len(data) == 20_000 and data[100:] == bytes(19_900)
    assert lookup_path(fs, "f").blocks == 8  # only block 0 is stored
    fs.close()


def test_unlinked_open_file_keeps_data_until_release_and_then_leaves_no_host_file(sim):
    fs = sim.open()
    ino = write_file(fs, ROOT_INO, b"f", b"x" * 10_000)
    fs.commit()
    assert any(n.startswith("d/") for n in sim.storage.files())
    fh = fs.open(ino, os.O_RDWR)
    fs.unlink(ROOT_INO, b"f")
    fs.commit()
    fs.write(fh, 10_000, b"more")
    assert fs.read(fh, 9_998, 10) == b"xxmore"
    fs.release(fh)
    with pytest.raises(FSError) as err:
        fs.getattr(ino)
    assert err.value.errno == errno.ENOENT
    fs.close()
    assert not any(n.startswith("d/") for n in sim.storage.files())


def test_adding_to_a_large_directory_reseals_little(sim):
    fs = sim.open()
    d = fs.mkdir(ROOT_INO, b"big", 0o755, ROOT)
    for i in range(20_000):
        fs.mknod(d.ino, b"entry-%06d" % i, stat.S_IFREG | 0o644, 0, ROOT)
    fs.commit()
    total = sum(len(v) for n, v in sim.storage.files().items() if n.startswith("m/"))
    fs.mknod(d.ino, b"one-more", stat.S_IFREG | 0o644, 0, ROOT)
    fs.commit()
    newest = max(n for n in sim.storage.files() if n.startswith("m/"))
    assert len(sim.storage.read(newest)) < total / 20
    fs.close()


def test_readdir_resumes_from_cookies_while_entries_come_and_go(sim):
    fs = sim.open()
    for i in range(300):
        fs.mknod(ROOT_INO, b"n%03d" % i, stat.S_IFREG | 0o644, 0, ROOT)
    fh = fs.opendir(ROOT_INO)
    first = [e for _, e in zip(range(100), fs.readdir(fh, 0), strict=False)]
    fs.unlink(ROOT_INO, b"n150")
    fs.mknod(ROOT_INO, b"late", stat.S_IFREG | 0o644, 0, ROOT)
    rest = list(fs.readdir(fh, first[-1].next_offset))
    fs.releasedir(fh)
    names = [e.name for e in first + rest]
    assert names == [b"n%03d" % i for i in range(300) if i != 150] + [b"late"]
    fs.close()


def test_pages_split_as_metadata_grows_and_stay_consistent(sim):
    fs = sim.open()
    for i in range(5000):
        write_file(fs, ROOT_INO, b"file-%05d-" % i + b"x" * 200, b"%d" % i)
    fs.close()
    fs = sim.open()
    # pages split as they grew; the table came back from the root
    assert len(fs._pages.starts) > 10
    assert read_path(fs, "file-04999-" + "x" * 200) == b"4999"
    fs.close()
    assert fsck_problems(sim.open) == []


def test_read_only_refuses_writes(sim):
    fs = sim.open(read_only=True)
    with pytest.raises(FSError) as err:
        fs.mkdir(ROOT_INO, b"d", 0o755, ROOT)
    assert err.value.errno == errno.EROFS
    fs.close()


def test_statfs_reports_the_host_in_4k_blocks(volume):
    fs = volume.open()
    got = fs.statfs()
    host = os.statvfs(volume.dir)
    assert got.bsize == 4096
    assert abs(got.blocks * 4096 - host.f_blocks * host.f_frsize) < 4096
    assert 0 < got.bavail <= got.blocks
    fs.close()


def test_slot_runs_match_the_block_by_block_answer():
    import random

    from occlumfs.sefs.blocks import slot_run
    from occlumfs.sefs.inode import Inode as _Inode

    rng = random.Random(5)
    for _ in range(200):
        node = _Inode(9, stat.S_IFREG | 0o644)
        node.chunks = {}
        for c in rng.sample(range(4), rng.randrange(1, 4)):
            entries = rng.randrange(1, 257)
            chunk = bytearray(entries * 29)
            for i in range(entries):
                chunk[i * 29] = rng.choice([0, 1, 1, 1, 2, 2])
            node.chunks[c] = chunk
        present = [b for b in range(1024) if node.slot(b)]
        if not present:
            continue
        block = rng.choice(present)
        last = rng.randrange(block, 1024)
        slot = node.slot(block)
        expected = block
        while expected < last and node.slot(expected + 1) == slot:
            expected += 1
        assert slot_run(node, block, last, slot) == expected


def test_one_read_larger_than_iov_max_blocks(volume):
    """A read spanning more than IOV_MAX (1024) stored blocks in one slot run."""
    fs = volume.open()
    data = os.urandom(9 << 20)
    write_file(fs, ROOT_INO, b"big", data)
    fs.close()
    fs = volume.open()
    assert read_path(fs, "big") == data
    fh = fs.open(lookup_path(fs, "big").ino, os.O_RDONLY)
    assert fs.read(fh, 4097, 8 << 20) == data[4097 : 4097 + (8 << 20)]
    fs.release(fh)
    fs.close()


def test_commits_from_cached_pages_store_what_the_filesystem_holds(sim):
    """Pages re-sealed from their cached records (occlumfs/sefs/pages.py) hold exactly
    what serialising every record afresh would: a reopen sees the live tree."""
    fs = sim.open()
    sub = fs.mkdir(ROOT_INO, b"sub", 0o755, ROOT)
    for i in range(1500):  # several pages, all of them cached by the commit
        write_file(fs, ROOT_INO if i % 2 else sub.ino, b"f%04d-" % i + b"y" * 40, b"%d" % i)
    fs.commit()
    for round_ in range(6):  # changes, removals and additions inside cached pages
        for i in range(round_, 1500, 7):
            parent = ROOT_INO if i % 2 else sub.ino
            name = b"f%04d-" % i + b"y" * 40
            if round_ % 3 == 0:
                fs.unlink(parent, name)
            elif round_ % 3 == 1:
                ino = fs.lookup(parent, name).ino
                fs.setattr(ino, AttrChanges(mode=0o600))
                fs.setxattr(ino, b"user.round", b"%d" % round_, 0)
            else:
                fs.rename(parent, name, sub.ino, b"moved-%d-%04d" % (round_, i), 0)
        write_file(fs, sub.ino, b"new-%d" % round_, b"round %d" % round_)
        fs.commit()
    live = fs.recorded()
    fs.close()
    fs = sim.open()
    assert fs.recorded() == live
    assert read_path(fs, "sub/new-5") == b"round 5"
    fs.close()
    assert fsck_problems(sim.open) == []


def test_the_trusted_state_holds_the_last_commit_once_closed(volume):
    fs = volume.open()
    for i in range(5):
        write_file(fs, ROOT_INO, b"f%d" % i, b"data")
        fs.commit()  # each commit hands its state to the writer thread
    counter, tag = fs._pages.counter, fs._pages.root_tag
    fs_id = fs._pages._fs_id.hex()
    fs.close()
    state = json.loads((volume.state / f"{fs_id}.json").read_text())
    assert (state["counter"], state["root_tag"]) == (counter, tag.hex())
