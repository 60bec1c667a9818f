"""SEFS metadata on demand: pages read when needed, inodes dropped from memory and read back.

A mount reads the head and the root, then each page when an inode or entry in
it is first used; clean inodes beyond a limit leave memory. These tests hold
the filesystem to MemFS (the reference) with a cache far smaller than the
tree, so that inodes are dropped and read back all the time, and check that a
damaged page is found when it is read.
"""

from __future__ import annotations

import errno
import os
import random
import stat

import pytest

from occlumfs.errors import FSError, IntegrityError
from occlumfs.fs import ROOT_INO, AttrChanges
from occlumfs.memfs import MemFS
from occlumfs.sefs import format as fmt
from occlumfs.sefs.load import materialise, materialise_many
from sefs.helpers import ROOT, fsck_problems, read_path, write_file


def _tree(fs) -> dict[str, tuple]:
    """Every path with what it is: (kind, mode bits, nlink, contents or target, xattrs)."""
    out: dict[str, tuple] = {}
    todo = [(ROOT_INO, "")]
    while todo:
        ino, prefix = todo.pop()
        fh = fs.opendir(ino)
        names = [(e.name, e.attr.ino) for e in fs.readdir(fh, 0)]
        fs.releasedir(fh)
        for name, child in names:
            path = f"{prefix}/{name.decode()}"
            attr = fs.lookup(ino, name)
            assert attr.ino == child
            xattrs = {n: fs.getxattr(child, n) for n in fs.listxattr(child)}
            if stat.S_ISDIR(attr.mode):
                body = b""
                todo.append((child, path))
            elif stat.S_ISLNK(attr.mode):
                body = fs.readlink(child)
            else:
                f = fs.open(child, os.O_RDONLY)
                body = fs.read(f, 0, attr.size + 1)
                fs.release(f)
            out[path] = (stat.S_IFMT(attr.mode), attr.mode & 0o7777, attr.nlink, body, xattrs)
    return out


def _workload(fss: list, seed: int) -> list[int]:
    """The same random changes applied to each filesystem; the handles left open."""
    rng = random.Random(seed)
    dirs = [ROOT_INO]
    files: list[tuple[int, bytes]] = []  # (parent, name)
    where: dict[int, tuple[int, bytes]] = {}  # directory -> (parent, name)
    kept_open = []
    for step in range(1500):
        if step % 150 == 149:  # committed inodes may leave memory (MemFS has no commit)
            fss[0].commit()
        choice = rng.random()
        parent = rng.choice(dirs)
        name = b"n%05d" % step
        if choice < 0.08:
            inos = {fs.mkdir(parent, name, 0o755, ROOT).ino for fs in fss}
            assert len(inos) == 1  # the same inode numbers everywhere
            dirs.append(inos.pop())
            where[dirs[-1]] = (parent, name)
        elif choice < 0.55 or not files:
            data = bytes([step % 251]) * rng.randrange(0, 9000)
            for fs in fss:
                write_file(fs, parent, name, data)
            files.append((parent, name))
        elif choice < 0.65:
            src = rng.choice(files)
            for fs in fss:
                fs.rename(src[0], src[1], parent, name)
            files[files.index(src)] = (parent, name)
        elif choice < 0.72:
            src = rng.choice(files)
            for fs in fss:
                fs.link(fs.lookup(*src).ino, parent, name)
            files.append((parent, name))
        elif choice < 0.80:
            src = rng.choice(files)
            files.remove(src)
            if rng.random() < 0.3:  # unlinked while open, written and kept open
                handles = []
                for fs in fss:
                    fh = fs.open(fs.lookup(*src).ino, os.O_RDWR)
                    fs.unlink(*src)
                    fs.write(fh, 3, b"after unlink")
                    handles.append(fh)
                kept_open.append(handles)
            else:
                for fs in fss:
                    fs.unlink(*src)
        elif choice < 0.90:
            src = rng.choice(files)
            for fs in fss:
                ino = fs.lookup(*src).ino
                fs.setattr(ino, AttrChanges(mode=0o600))
                fs.setxattr(ino, b"user.step", b"%d" % step, 0)
        elif len(dirs) > 2:  # move a directory elsewhere (not under itself)
            moved = rng.choice(dirs[1:])
            target = rng.choice(dirs)
            try:
                for fs in fss:
                    fs.rename(*where[moved], target, name)
                where[moved] = (target, name)
            except FSError as exc:
                assert exc.errno == errno.EINVAL and fs is fss[0]  # alike everywhere
    return [h for handles in kept_open for h in handles]


def test_a_cache_far_smaller_than_the_tree_keeps_every_change(sim):
    fs = sim.open()
    fs._nodes.limit = fs._nodes._check_at = 8
    model = MemFS()
    _workload([fs, model], seed=11)
    assert fs._nodes.loaded > 100  # inodes really were dropped and read back
    assert _tree(fs) == _tree(model)
    fs.commit()
    assert _tree(fs) == _tree(model)
    fs.close()
    fs = sim.open(read_only=True)
    fs._nodes.limit = fs._nodes._check_at = 8
    assert _tree(fs) == _tree(model)
    fs.close()
    assert fsck_problems(sim.open) == []


def test_open_reads_only_the_pages_it_needs(sim):
    fs = sim.open()
    for d in range(3):
        parent = fs.mkdir(ROOT_INO, b"d%d" % d, 0o755, ROOT).ino
        for i in range(1000):
            write_file(fs, parent, b"file-%04d-" % i + b"x" * 40, b"%d-%d" % (d, i))
    fs.close()
    fs = sim.open(read_only=True)
    assert len(fs._pages.table) > 20
    assert fs._pages.pages_read <= 2  # the root directory's inode (and its entries)
    assert len(fs._nodes) == 1
    assert read_path(fs, "d2/file-0999-" + "x" * 40) == b"2-999"
    assert fs._pages.pages_read <= 8
    fs.close()


def test_removed_inodes_are_not_read_back_from_the_committed_pages(sim):
    fs = sim.open()
    inos = [write_file(fs, ROOT_INO, b"f%03d" % i, b"x") for i in range(200)]
    fs.close()
    fs = sim.open()
    fs._nodes.limit = fs._nodes._check_at = 8
    for i in range(0, 200, 2):
        fs.unlink(ROOT_INO, b"f%03d" % i)
    for i in range(1, 200, 2):  # push the removed ones out of memory, if they were in it
        fs.getattr(inos[i])
    for i in range(0, 200, 2):
        with pytest.raises(FSError) as err:
            fs.getattr(inos[i])
        assert err.value.errno == errno.ENOENT
    fs.commit()
    with pytest.raises(FSError):
        fs.getattr(inos[0])
    assert fs.getattr(inos[1]).nlink == 1
    assert fs._nodes.pop(inos[3]) is not None  # as the log's replay removes one
    assert fs._nodes.get(inos[3]) is None and fs._nodes.pop(inos[3]) is None
    fs.close()


def test_a_damaged_page_is_found_when_it_is_read(volume):
    fs = volume.open()
    parents = [fs.mkdir(ROOT_INO, b"d%d" % d, 0o755, ROOT).ino for d in range(2)]
    for parent in parents:
        for i in range(1200):
            write_file(fs, parent, b"file-%04d-" % i + b"y" * 40, b"%d" % i)
    fs.close()
    fs = volume.open(read_only=True)
    victim = fs.lookup(parents[1], b"file-1100-" + b"y" * 40).ino
    page = fs._pages.page_of(fmt.inode_key(victim))
    needed = {fs._pages.page_of(k) for k in (fmt.inode_key(ROOT_INO), fmt.entry_key(ROOT_INO, b""))}
    assert page not in needed
    ref = fs._pages.table[page]
    spared = next(  # a file none of whose records is in the damaged page
        b"file-%04d-" % i + b"y" * 40
        for i in range(1200)
        if page
        not in {
            fs._pages.page_of(key(fs.lookup(parents[0], b"file-%04d-" % i + b"y" * 40).ino))
            for key in (fmt.inode_key, lambda ino: fmt.map_key(ino, 0))
        }
    )
    fs.close()
    pack = volume.dir / "m" / fmt.pack_name(ref.pack).split("/")[-1]
    raw = bytearray(pack.read_bytes())
    raw[ref.offset + 40] ^= 1
    pack.write_bytes(bytes(raw))
    fs = volume.open(read_only=True)  # the damaged page is not needed yet
    assert read_path(fs, "d0/" + spared.decode()) == b"%d" % int(spared[5:9])
    with pytest.raises(IntegrityError, match=f"metadata page {page}: authentication failed"):
        fs.lookup(parents[1], b"file-1100-" + b"y" * 40)
    fs.close()
    problems = fsck_problems(volume.open)
    assert any("authentication failed" in line for line in problems)


def _fields(node) -> tuple:
    chunks = None if node.chunks is None else {n: bytes(c) for n, c in node.chunks.items()}
    return (node.mode, node.nlink, node.size, node.present, chunks, node.target, node.xattrs)


def test_a_listing_reads_its_children_together_as_one_by_one(sim):
    fs = sim.open()
    parent = fs.mkdir(ROOT_INO, b"d", 0o755, ROOT).ino
    for i in range(700):
        name = b"f-%04d-" % i + b"z" * 30
        if i % 50 == 7:  # sparse, several block-map chunks (a chunk maps 1 MiB)
            fh, _ = fs.create(parent, name, 0o644, os.O_WRONLY, ROOT)
            many = range(1500) if i == 107 else ()  # its map spans more than a page
            for chunk in many or ((0, 2, 5) if i % 100 == 7 else (3,)):
                fs.write(fh, chunk << 20, b"c%d" % chunk)
            fs.release(fh)
        elif i % 50 == 8:
            fs.mkdir(parent, name, 0o700, ROOT)
        elif i % 50 == 9:
            fs.symlink(parent, name, b"target-%d" % i, ROOT)
        else:
            ino = write_file(fs, parent, name, b"%d" % i)
            if i % 3 == 0:
                fs.setxattr(ino, b"user.n", b"%d" % i, 0)
    unlinked = fs.lookup(parent, b"f-0010-" + b"z" * 30).ino
    fs.unlink(parent, b"f-0010-" + b"z" * 30)
    fs.close()
    fs = sim.open(read_only=True)
    pages, last = fs._pages, fs._nodes.peek(ROOT_INO).ino + 720
    one_by_one = {ino: materialise(pages, ino) for ino in range(1, last)}
    together = materialise_many(pages, list(range(1, last)))
    assert unlinked not in together and one_by_one[unlinked] is None
    assert {ino for ino, node in one_by_one.items() if node is not None} == set(together)
    assert all(_fields(together[ino]) == _fields(one_by_one[ino]) for ino in together)
    assert sum(len(node.chunks) > 1 for node in together.values()) >= 7
    fs.close()
    fs = sim.open(read_only=True)
    fh = fs.opendir(fs.lookup(ROOT_INO, b"d").ino)
    before = fs._pages.pages_read
    listed = {e.name: e.attr for e in fs.readdir(fh, 0)}
    assert len(listed) == 699 and fs._nodes.loaded >= 699
    assert fs._pages.pages_read - before <= len(fs._pages.table)  # each page once at most
    assert all(listed[name].size == fs.getattr(attr.ino).size for name, attr in listed.items())
    fs.close()


def test_a_burst_of_changes_commits_before_its_records_outgrow_the_bound(sim, monkeypatch):
    from occlumfs.sefs import fs as sefs_fs

    monkeypatch.setattr(sefs_fs, "DIRTY_RECORDS_MAX", 64)
    fs = sim.open()
    first = fs._pages.counter
    for i in range(600):  # no fsync, no commit asked for, and far less than 10 s
        write_file(fs, ROOT_INO, b"f%04d" % i, b"%d" % i)
        # A create changes a few records (inode, entry, parent): never many past the bound.
        assert len(fs._dirty_keys) <= 64 + 8
    assert fs._pages.counter - first >= 600 // 64  # commits the burst made by itself
    fs.close()
    fs = sim.open(read_only=True)
    assert all(read_path(fs, f"/f{i:04d}") == b"%d" % i for i in range(600))
    fs.close()
    assert fsck_problems(sim.open) == []
