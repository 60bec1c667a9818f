"""What unmodified programs rely on, through the union's contract (its upper a SEFS)."""

from __future__ import annotations

import os
import stat

from occlumfs.fs import AttrChanges, Caller, lookup_path

USER = Caller(uid=1000, gid=1000)


def test_a_lower_directory_made_setgid_passes_its_group_down(stack):
    """The directory is copied up by the chmod; what is then made in it takes its
    group. An image directory below it keeps its own (it was not made in it)."""
    fs = stack.fs
    shared = lookup_path(fs, "tree/a").ino
    fs.setattr(shared, AttrChanges(mode=0o2777, gid=4321))
    _, made = fs.create(shared, b"new", 0o644, os.O_WRONLY, USER)
    sub = fs.mkdir(shared, b"sub", 0o755, USER)
    assert (made.uid, made.gid, sub.gid) == (1000, 4321, 4321)
    assert sub.mode & stat.S_ISGID and not made.mode & stat.S_ISGID
    deeper = lookup_path(fs, "tree/a/b").ino  # an image directory, not setgid
    _, plain = fs.create(deeper, b"plain", 0o644, os.O_WRONLY, USER)
    assert plain.gid == 1000
    fs = stack.reopen()
    assert lookup_path(fs, "tree/a/new").gid == 4321
    assert lookup_path(fs, "tree/a/sub").mode & stat.S_ISGID
