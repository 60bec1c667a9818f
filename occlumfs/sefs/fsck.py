"""fsck for SEFS: verify every page, record, link count and data block; name each problem's path."""

from __future__ import annotations

import os
import stat
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from occlumfs.errors import IntegrityError
from occlumfs.fs import ROOT_INO
from occlumfs.sefs.fs import SefsFS


def check_fs(fs: SefsFS) -> Iterator[str]:
    """Every problem of an opened (tolerant) filesystem, one line each."""
    inodes = fs.recorded()
    paths: dict[int, str] = {ROOT_INO: "/"}
    links: dict[int, int] = {}
    subdirs: dict[int, int] = {}
    queue = deque([ROOT_INO])
    while queue:
        dir_ino = queue.popleft()
        directory = inodes[dir_ino]
        prefix = "" if dir_ino == ROOT_INO else paths[dir_ino]
        for name, child_ino in directory.entries:
            path = f"{prefix}/{os.fsdecode(name)}"
            child = inodes.get(child_ino)
            if child is None:
                yield f"{path}: its inode {child_ino} is missing (metadata lost)"
                continue
            links[child_ino] = links.get(child_ino, 0) + 1
            if child.is_dir:
                subdirs[dir_ino] = subdirs.get(dir_ino, 0) + 1
                if child_ino in paths:
                    yield f"{path}: directory linked twice (also {paths[child_ino]})"
                    continue
                if child.parent != dir_ino:
                    yield f"{path}: parent pointer is inode {child.parent}, not {dir_ino}"
                queue.append(child_ino)
            paths.setdefault(child_ino, path)
    for ino, what in fs.problems:
        where = paths.get(ino, f"inode {ino}") if ino is not None else "metadata"
        yield f"{where}: {what}"
    for ino, node in sorted(inodes.items()):
        path = paths.get(ino)
        if path is None:
            yield f"inode {ino}: not reachable from / (orphaned)"
            continue
        if node.is_dir:
            want = 2 + subdirs.get(ino, 0)
            if node.nlink != want:
                yield f"{path}: link count {node.nlink}, expected {want}"
        elif node.nlink != links.get(ino, 0):
            yield f"{path}: link count {node.nlink}, but {links.get(ino, 0)} entries name it"
        if stat.S_ISREG(node.mode):
            yield from fs.verify_file(ino)
        elif stat.S_ISLNK(node.mode) and not node.target:
            yield f"{path}: symlink without a target"


def fsck(
    path: Path,
    *,
    key: bytes | None = None,
    passphrase_file: Path | None = None,
    passphrase: bytes | None = None,
    state_dir: Path | None = None,
    accept_new_store: bool = False,
) -> list[str]:
    """All problems of the SEFS at ``path`` (empty: clean). Wrong keys and locks raise."""
    from occlumfs.sefs import open_sefs_fs

    try:
        fs = open_sefs_fs(
            path,
            key=key,
            passphrase_file=passphrase_file,
            passphrase=passphrase,
            read_only=True,
            state_dir=state_dir,
            tolerant=True,
            accept_new_store=accept_new_store,
        )
    except IntegrityError as exc:
        return [f"/: cannot verify the filesystem root: {exc}"]
    try:
        return list(check_fs(fs))
    finally:
        fs.close()
