"""Copy a host directory tree into any writable filesystem object.

Used to populate filesystems without FUSE: the conformance suite fills its
writable subjects with the reference tree, SEFS tests seed their volumes, and
``occlum build`` lays out an image root. Everything ``stat`` and ``getfattr``
show survives: file types (regular, directory, symlink, fifo, socket, device
nodes with their rdev), permission bits including setuid/setgid/sticky, owners,
nanosecond atimes and mtimes, hard links (one inode, many names), extended
attributes, and sparse holes, found with SEEK_DATA/SEEK_HOLE and left unwritten.

Names and symlink targets are handled as bytes, so non-UTF-8 names survive.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from occlumfs.fs import AttrChanges, Caller, Filesystem

COPY_CHUNK = 1 << 20


@dataclass
class _PendingDir:
    """A directory whose times are set once all its entries exist (creating
    them changes its mtime)."""

    ino: int
    source: bytes
    st: os.stat_result


def copy_tree_into(
    fs: Filesystem,
    parent_ino: int,
    source: Path,
    caller: Caller = Caller(),  # noqa: B008 - frozen, so a shared default is safe
    *,
    copy_root_attrs: bool = True,
) -> None:
    """Copy the entries of directory ``source`` into directory ``parent_ino`` of ``fs``.

    With ``copy_root_attrs`` (the default) the directory ``parent_ino`` also takes
    the mode, owner, times and xattrs of ``source`` itself, so copying into the
    root of a fresh filesystem reproduces the whole tree. ``caller`` is who
    creates the entries; their owners are then set to those on the host.
    Errors from either side propagate: the host's as ``OSError``, the
    filesystem's as ``FSError``.
    """
    root = os.fsencode(source)
    root_st = os.lstat(root)
    if not stat.S_ISDIR(root_st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", os.fsdecode(root))
    # (st_dev, st_ino) of host files with several links -> our inode number.
    linked: dict[tuple[int, int], int] = {}
    pending: list[_PendingDir] = []
    # Depth-first with an explicit stack: deep trees must not hit the recursion limit.
    stack = [(parent_ino, root)]
    while stack:
        dir_ino, dir_path = stack.pop()
        with os.scandir(dir_path) as scan:
            names = sorted(entry.name for entry in scan)
        for name in names:
            path = os.path.join(dir_path, name)
            st = os.lstat(path)
            mode = st.st_mode
            key = (st.st_dev, st.st_ino)
            if not stat.S_ISDIR(mode) and st.st_nlink > 1 and key in linked:
                fs.link(linked[key], dir_ino, name)
                continue
            if stat.S_ISDIR(mode):
                ino = fs.mkdir(dir_ino, name, stat.S_IMODE(mode), caller).ino
                _copy_xattrs(fs, ino, path)
                _copy_owner_and_mode(fs, ino, st)
                pending.append(_PendingDir(ino, path, st))
                stack.append((ino, path))
                continue
            if stat.S_ISREG(mode) and st.st_size == 0:  # nothing to write: no handle
                ino = fs.mknod(dir_ino, name, mode, 0, caller).ino
            elif stat.S_ISREG(mode):
                ino = _copy_file(fs, dir_ino, name, path, st, caller)
            elif stat.S_ISLNK(mode):
                ino = fs.symlink(dir_ino, name, os.readlink(path), caller).ino
            else:  # fifo, socket, character or block device
                ino = fs.mknod(dir_ino, name, mode, st.st_rdev, caller).ino
            if st.st_nlink > 1:
                linked[key] = ino
            _copy_xattrs(fs, ino, path)
            # One setattr: the owner before the mode (setuid/setgid bits are the
            # last word), the times last; xattrs changed only the ctime.
            changes = AttrChanges(
                uid=st.st_uid, gid=st.st_gid, atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns
            )
            if not stat.S_ISLNK(mode):
                changes.mode = stat.S_IMODE(mode)
            fs.setattr(ino, changes)
    if copy_root_attrs:
        _copy_xattrs(fs, parent_ino, root)
        _copy_owner_and_mode(fs, parent_ino, root_st)
        pending.append(_PendingDir(parent_ino, root, root_st))
    # Children before parents: setting a child's times does not touch the parent,
    # but the order keeps that true for filesystems that propagate changes upward.
    for done in reversed(pending):
        _copy_times(fs, done.ino, done.st)


def _copy_file(
    fs: Filesystem, parent: int, name: bytes, path: bytes, st: os.stat_result, caller: Caller
) -> int:
    fh, attr = fs.create(parent, name, stat.S_IMODE(st.st_mode), os.O_WRONLY, caller)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            for start, end in _data_extents(fd, st.st_size):
                offset = start
                while offset < end:
                    chunk = os.pread(fd, min(COPY_CHUNK, end - offset), offset)
                    if not chunk:  # the host file shrank under us
                        break
                    fs.write(fh, offset, chunk)
                    offset += len(chunk)
        finally:
            os.close(fd)
        # A trailing hole is only a size.
        fs.setattr(attr.ino, AttrChanges(size=st.st_size), fh)
        fs.flush(fh)
    finally:
        fs.release(fh)
    return attr.ino


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, end) ranges of ``fd`` holding data; the rest are holes."""
    extents = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                break
            if exc.errno == errno.EINVAL and not extents:  # no SEEK_DATA: all data
                return [(0, size)]
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end > start:
            extents.append((start, end))
        offset = end
    return extents


def _copy_xattrs(fs: Filesystem, ino: int, path: bytes) -> None:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    for name in names:
        value = os.getxattr(path, name, follow_symlinks=False)
        fs.setxattr(ino, os.fsencode(name), value)


def _copy_owner_and_mode(fs: Filesystem, ino: int, st: os.stat_result) -> None:
    fs.setattr(ino, AttrChanges(uid=st.st_uid, gid=st.st_gid, mode=stat.S_IMODE(st.st_mode)))


def _copy_times(fs: Filesystem, ino: int, st: os.stat_result) -> None:
    fs.setattr(ino, AttrChanges(atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns))
