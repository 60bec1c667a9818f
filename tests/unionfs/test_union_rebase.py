"""``occlumfs union rebase``: the user's changes survive a rebuild of the images below."""

from __future__ import annotations

import stat

import pytest
from conftest import run_cli

from occlumfs.fs import AttrChanges
from occlumfs.fs import lookup_path as lp
from occlumfs.merkle import build_image
from occlumfs.unionfs import LayerMismatchError, Lower, open_union
from unionfs.helpers import ROOT, build_bottom, create, exists, listing, read, rename, write


def test_rebase_keeps_the_users_changes_over_rebuilt_images(stack, tmp_path):
    fs = stack.fs
    old_big = read(fs, "big")
    write(fs, "both", b"USER DATA")
    fs.setattr(lp(fs, "big").ino, AttrChanges(mode=0o600))  # metadata only: data below
    fs.setattr(lp(fs, "hl-a").ino, AttrChanges(mode=0o640))  # hard-linked: in the index
    rename(fs, "tree", "moved")
    fs.unlink(1, b"low-only")
    create(fs, "mine", b"mine\n")
    fs.mkdir(1, b"my-dir", 0o700, ROOT)
    stack.fs.close()
    stack.fs = None
    # The image is rebuilt: "big" has new contents, a file appears, tree/top changes.
    rebuilt = tmp_path / "bottom2-tree"
    rebuilt.mkdir()
    build_bottom(rebuilt)
    (rebuilt / "added-by-rebuild").write_bytes(b"added\n")
    (rebuilt / "tree/top").write_bytes(b"rebuilt: tree/top\n")
    bottom2 = tmp_path / "bottom2.img"
    bottom2_digest = build_image(rebuilt, bottom2)
    old_images, top = stack.layers.images, stack.layers.images[1]
    done = run_cli(
        "union",
        "rebase",
        *stack.upper_args(),
        "--from",
        old_images[0],
        "--from",
        top,
        "--to",
        bottom2,
        "--to",
        top,
    )
    assert "rebased" in done.stdout
    new_lowers = [Lower(bottom2, bottom2_digest), Lower(top, stack.layers.digests[1])]
    fs = open_union(new_lowers, stack.upper, key=stack.key, state_dir=stack.state)
    try:
        assert read(fs, "both").startswith(b"USER DATA")
        assert read(fs, "big") == old_big and stat.S_IMODE(lp(fs, "big").mode) == 0o600
        links = [lp(fs, p) for p in ("hl-a", "merged/hl-b")]
        assert links[0].ino == links[1].ino and [a.nlink for a in links] == [2, 2]
        assert stat.S_IMODE(links[1].mode) == 0o640
        assert not exists(fs, "low-only") and not exists(fs, "tree")
        assert read(fs, "moved/top") == b"rebuilt: tree/top\n", "a rename applies to the new image"
        assert read(fs, "mine") == b"mine\n" and listing(fs, "my-dir") == []
        assert read(fs, "added-by-rebuild") == b"added\n"
        inos = [lp(fs, p).ino for p in ("both", "big", "hl-a", "mine", "added-by-rebuild")]
        assert len(set(inos)) == len(inos)
        write(fs, "big", b"after")
        assert read(fs, "big")[:5] == b"after"
    finally:
        fs.close()
    # Bound to the new images now: the old ones are refused.
    with pytest.raises(LayerMismatchError):
        open_union(stack.layers.lowers(), stack.upper, key=stack.key, state_dir=stack.state)


def test_rebase_refuses_a_bad_new_image_before_changing_anything(stack, tmp_path):
    stack.fs.close()
    stack.fs = None
    bad = tmp_path / "bad.img"
    bad.write_bytes(b"not an image")
    done = run_cli(
        "union",
        "rebase",
        *stack.upper_args(),
        *[a for i in stack.layers.images for a in ("--from", i)],
        "--to",
        bad,
        check=False,
    )
    assert done.returncode == 15 and done.stderr.count("\n") == 1, done.stderr
    fs = stack.open()
    assert read(fs, "both") == b"top: both\n"
