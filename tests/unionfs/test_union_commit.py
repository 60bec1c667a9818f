"""``occlumfs commit``: the upper as a new image layer that, stacked on the same
lowers, shows exactly the union's view; ``--flatten``: the whole view alone."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest
from conftest import run_cli

from occlumfs.fs import AttrChanges, iter_dir, read_all
from occlumfs.fs import lookup_path as lp
from occlumfs.keys import write_key_file
from occlumfs.merkle import open_image_fs
from occlumfs.unionfs import Lower, open_union
from unionfs.helpers import ROOT, create, parent_and_name, rename, write

# A commit reads the upper through a FUSE mount of its layer view.
pytestmark = pytest.mark.fuse


def view_of(fs, ino: int = 1, prefix: bytes = b"") -> dict:
    """Everything a user sees: per path its type, permissions, owner, size,
    contents or target, user xattrs and, but for directories, link count."""
    out = {}
    for entry in iter_dir(fs, ino):
        path = prefix + b"/" + entry.name
        a = entry.attr
        if stat.S_ISREG(a.mode):
            body = hashlib.sha256(b"".join(read_all(fs, a.ino))).hexdigest()
        elif stat.S_ISLNK(a.mode):
            body = fs.readlink(a.ino)
        else:
            body = None
        xattrs = sorted((n, fs.getxattr(a.ino, n)) for n in fs.listxattr(a.ino))
        nlink = None if stat.S_ISDIR(a.mode) else a.nlink
        out[path] = (a.mode, a.uid, a.gid, a.size if a.is_reg else None, body, xattrs, nlink)
        if stat.S_ISDIR(a.mode):
            out.update(view_of(fs, a.ino, path))
    return out


def _assert_shows(want: dict, lowers: list, scratch, key: bytes) -> None:
    """A fresh upper over ``lowers`` shows exactly ``want``."""
    scratch.mkdir()
    fs = open_union(lowers, scratch / "upper", key=key, state_dir=scratch / "state", create=True)
    try:
        assert view_of(fs) == want
    finally:
        fs.close()


def _change_everything(fs) -> None:
    write(fs, "both", b"TOP", flags=os.O_RDWR)
    fs.setattr(lp(fs, "meta").ino, AttrChanges(mode=0o600, uid=3))
    fs.setxattr(lp(fs, "low-only").ino, b"user.added", b"1")
    fs.unlink(*parent_and_name(fs, "merged/shared"))
    rename(fs, "tree", "merged/moved-tree")
    fs.rmdir(*parent_and_name(fs, "merged/sub-bottom"))
    fs.mkdir(*parent_and_name(fs, "merged/sub-bottom"), 0o700, ROOT)
    create(fs, "merged/sub-bottom/inside", b"new inside\n")
    fs.mkdir(1, b"fresh", 0o755, ROOT)
    create(fs, "fresh/file", b"fresh\n")
    fs.link(lp(fs, "hl-a").ino, 1, b"hl-third")
    write(fs, "hl-a", b"HARD")
    fs.symlink(1, b"new-link", b"fresh/file", ROOT)
    fs.unlink(*parent_and_name(fs, "opaque/shown"))


def test_commit_then_stack_shows_the_same_tree(stack, tmp_path):
    fs = stack.fs
    _change_everything(fs)
    want = view_of(fs)
    stack.fs.close()
    new_image = tmp_path / "new.img"
    lowers = ["--lower", stack.layers.images[0], "--lower", stack.layers.images[1]]
    done = run_cli(
        "commit",
        *stack.upper_args(),
        *lowers,
        new_image,
    )
    digest = done.stdout.split()[-1]
    assert digest.startswith("sha256:")
    # The new layer alone: only what changed, whiteouts and opaque marks included.
    layer = open_image_fs(new_image, digest=digest, key=None)
    names = sorted(e.name for e in iter_dir(layer, 1))
    assert b"big" not in names and b"sparse" not in names, "unchanged entries stay below"
    assert {b"both", b"meta", b"fresh", b"new-link", b"merged"} <= set(names)
    merged = layer.lookup(1, b"merged")
    whiteout = layer.lookup(merged.ino, b"shared")
    assert stat.S_ISCHR(whiteout.mode) and whiteout.rdev == 0
    moved = layer.lookup(merged.ino, b"moved-tree")
    assert (
        layer.getxattr(layer.lookup(merged.ino, b"sub-bottom").ino, b"trusted.overlay.opaque")
        == b"y"
    )
    assert sorted(e.name for e in iter_dir(layer, moved.ino)) == [b"a", b"top"]
    layer.close()
    stack.fs = None
    key = write_key_file(tmp_path / "k2")
    _assert_shows(want, [*stack.layers.lowers(), Lower(new_image, digest)], tmp_path / "s2", key)
    # Flattened: the whole view as one layer, alone.
    flat = tmp_path / "flat.img"
    stack.open(read_only=True).close()
    done = run_cli(
        "commit",
        "--flatten",
        *stack.upper_args(),
        *lowers,
        flat,
    )
    _assert_shows(want, [Lower(flat, done.stdout.split()[-1])], tmp_path / "s3", key)
    # Nothing of the upper's plaintext was written on the host beside the images.
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith("occlumfs-commit")]
    assert leftovers == []
