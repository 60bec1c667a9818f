"""The filesystem contract every occlumfs filesystem implements.

A filesystem is a plain synchronous object addressed by inode numbers, close to
the FUSE low-level interface so that the adapter (:mod:`occlumfs.adapter`) only
translates. Offline tools (ls, cat, verify, fsck, build) and UnionFS call the
same methods directly, without FUSE.

Rules every implementation keeps:

* Errors are :class:`occlumfs.errors.FSError` carrying an errno; stored data that
  fails verification raises :class:`occlumfs.errors.IntegrityError` (EIO).
* Names are ``bytes`` (any byte except ``/`` and NUL) of at most 255 bytes:
  ``lookup`` of a longer one is ENAMETOOLONG, as on ext4. So are symlink
  targets and xattr names and values.
* ``readdir`` offsets are opaque cookies: each entry carries the cookie that
  resumes the listing right after it, and a cookie stays valid while the
  directory is unchanged. ``0`` starts from the beginning. ``.`` and ``..`` are
  not listed (the kernel does not need them; ``lookup`` answers them).
* Permission checks are the kernel's (the mount uses ``default_permissions``);
  in-process callers are trusted.
* A read-only filesystem inherits the write methods below, which raise EROFS.
* Attributes cross the contract as values: each :class:`Attr` returned is new.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from occlumfs.errors import FSError
from occlumfs.units import BLOCK_SIZE

ROOT_INO = 1


RENAME_NOREPLACE = 1  # renameat2 flags, as the kernel passes them
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4


@dataclass(slots=True)
class Attr:
    """What ``stat`` shows of an inode. Times are nanoseconds since the epoch.

    A value: every call that returns one returns a new object that the caller
    owns (a union may rewrite ``ino`` on it); a filesystem never keeps one it
    handed out. It is not frozen because a frozen dataclass costs ~1 us more
    to build, which doubled the in-process cost of a MemFS lookup.
    """

    ino: int
    mode: int  # file type bits and permission bits, as st_mode
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    size: int = 0
    rdev: int = 0
    blocks: int = 0  # 512-byte units actually allocated
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    blksize: int = BLOCK_SIZE

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_lnk(self) -> bool:
        return stat.S_ISLNK(self.mode)


@dataclass(slots=True)
class AttrChanges:
    """The fields a ``setattr`` changes; ``None`` leaves a field as it is."""

    mode: int | None = None  # permission bits only; the file type never changes
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    # Only from a kernel that keeps the file's times itself (writeback cache): the
    # ctime it shows. Otherwise the filesystem sets ctime to the time of the change.
    ctime_ns: int | None = None

    def apply_to(self, target: object) -> None:
        """Set permission bits, owner and times on ``target`` (any object named like Attr).

        The size is left to the caller: shrinking and growing are the
        filesystem's own business.
        """
        if self.mode is not None:
            target.mode = stat.S_IFMT(target.mode) | (self.mode & 0o7777)
        for name in ("uid", "gid", "atime_ns", "mtime_ns", "ctime_ns"):
            value = getattr(self, name)
            if value is not None:
                setattr(target, name, value)


@dataclass(slots=True)
class StatFs:
    """What ``statvfs`` shows, in units of ``frsize`` bytes."""

    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int = BLOCK_SIZE
    frsize: int = BLOCK_SIZE
    namemax: int = 255


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks: the owner of anything the request creates."""

    uid: int = 0
    gid: int = 0
    pid: int = 0


@dataclass(slots=True)
class DirEntry:
    name: bytes
    attr: Attr
    next_offset: int  # the cookie that resumes the listing after this entry


@dataclass(slots=True)
class FsInfo:
    """Facts about a filesystem; the adapter and the mount decide what to do with them.

    A filesystem states what it is (immutable, without xattrs, best read in
    large runs); it never tunes the mount it may or may not be served by.
    """

    name: str  # shown as the mount's fsname, e.g. "occlumfs:/srv/app.img"
    subtype: str  # shown as fuse.<subtype> in /proc/mounts
    read_only: bool = False
    # Contents never change at all: besides what ``exclusive`` allows, nothing
    # is ever dirty to flush.
    immutable: bool = False
    # Every change to the contents goes through this object while it is served:
    # a SEFS store is locked to its one mount, a memfs lives in its server, an
    # image never changes, a union's upper is locked to it and its lowers are
    # images. Then what the kernel was told (names, their absence, attributes,
    # file pages) stays true until the kernel itself changes it through the
    # mount, and the kernel updates or drops its own copy when it does. So the
    # kernel may keep pages across opens and remember names that do not exist.
    # A filesystem whose contents can change other than through its mount must
    # say False and set a short cache_timeout.
    exclusive: bool = True
    # How long the kernel may trust a name or attributes it was told before it
    # asks again (seconds). Long by default, for the reason above: an hour, after
    # which one LOOKUP or GETATTR revalidates what the kernel still holds.
    cache_timeout: float = 3600.0
    # False when no inode has an xattr and none can get one: the kernel can be
    # told once instead of asking for every file.
    has_xattrs: bool = True
    # Kernel read-ahead (KiB) the filesystem wants on a mount of its own, or
    # None for the kernel's default.
    readahead_kb: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


class Filesystem:
    """Base class: the read side is abstract, the write side answers EROFS."""

    info: FsInfo

    # -- lifecycle -----------------------------------------------------------
    def started_serving(self) -> None:
        """Called in the process that serves the mount, before the first request.

        A mount forks to the background after opening the filesystem; anything
        that records the serving pid (a lock file) updates it here.
        """

    def close(self) -> None:
        """Flush and commit everything; the object is not used afterwards."""

    def kernel_keeps_file_times(self) -> None:
        """Served with the kernel's writeback cache: from here on the kernel keeps a
        regular file's mtime and ctime as ``stat`` shows them and sends them with
        ``setattr``; ``write`` (which may arrive after that ``setattr``) must not
        stamp the filesystem's own clock over them.
        """

    # -- read side -----------------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> Attr:
        raise NotImplementedError

    def forget(self, ino: int, nlookup: int) -> None:
        """The kernel dropped ``nlookup`` references to ``ino``.

        The kernel takes no answer: the adapter logs and drops any error.
        """

    def getattr(self, ino: int) -> Attr:
        raise NotImplementedError

    def readlink(self, ino: int) -> bytes:
        raise NotImplementedError

    def opendir(self, ino: int) -> int:
        attr = self.getattr(ino)
        if not attr.is_dir:
            raise FSError(errno.ENOTDIR)
        return ino

    def readdir(self, fh: int, offset: int) -> Iterator[DirEntry]:
        """Entries after cookie ``offset`` (0: from the start), in a stable order."""
        raise NotImplementedError

    def releasedir(self, fh: int) -> None:
        pass

    def open(self, ino: int, flags: int) -> int:
        """Open ``ino``; returns a handle for read/write/release."""
        raise NotImplementedError

    def read(self, fh: int, offset: int, size: int) -> bytes:
        raise NotImplementedError

    def read_for_reply(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        """:meth:`read` for a caller that is done with the result before its next call
        into this filesystem (the FUSE adapter, which writes the reply at once): the
        result may be a view of memory the filesystem reuses after that call."""
        return self.read(fh, offset, size)

    def release(self, fh: int) -> None:
        pass

    def flush(self, fh: int) -> None:
        pass

    def statfs(self) -> StatFs:
        raise NotImplementedError

    def getxattr(self, ino: int, name: bytes) -> bytes:
        raise FSError(errno.ENODATA)

    def listxattr(self, ino: int) -> list[bytes]:
        return []

    # -- write side (EROFS unless overridden) ----------------------------------
    def setattr(self, ino: int, changes: AttrChanges, fh: int | None = None) -> Attr:
        raise FSError(errno.EROFS)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        raise FSError(errno.EROFS)

    def fsync(self, fh: int, datasync: bool) -> None:
        pass

    def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    def create(
        self, parent: int, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[int, Attr]:
        raise FSError(errno.EROFS)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Attr:
        raise FSError(errno.EROFS)

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Attr:
        raise FSError(errno.EROFS)

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Attr:
        raise FSError(errno.EROFS)

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        raise FSError(errno.EROFS)

    def unlink(self, parent: int, name: bytes) -> None:
        raise FSError(errno.EROFS)

    def rmdir(self, parent: int, name: bytes) -> None:
        raise FSError(errno.EROFS)

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        raise FSError(errno.EROFS)

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        raise FSError(errno.EROFS)

    def removexattr(self, ino: int, name: bytes) -> None:
        raise FSError(errno.EROFS)


def lookup_path(fs: Filesystem, path: str | bytes) -> Attr:
    """Walk ``path`` (relative to the root, ``/``-separated) without following symlinks.

    A trailing ``/`` asks for a directory, as in POSIX: anything else there is ENOTDIR.
    """
    if isinstance(path, str):
        path = path.encode("utf-8", "surrogateescape")
    attr = fs.getattr(ROOT_INO)
    for part in path.split(b"/"):
        if part in (b"", b"."):
            continue
        if not attr.is_dir:
            raise FSError(errno.ENOTDIR)
        attr = fs.lookup(attr.ino, part)
    if path.endswith(b"/") and not attr.is_dir:
        raise FSError(errno.ENOTDIR)
    return attr


def iter_dir(fs: Filesystem, ino: int) -> Iterator[DirEntry]:
    """Every entry of directory ``ino``, in readdir order."""
    fh = fs.opendir(ino)
    try:
        yield from fs.readdir(fh, 0)
    finally:
        fs.releasedir(fh)


def read_all(fs: Filesystem, ino: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The contents of regular file ``ino`` in chunks of at most ``chunk`` bytes."""
    fh = fs.open(ino, 0)
    try:
        offset = 0
        while True:
            data = fs.read(fh, offset, chunk)
            if not data:
                return
            offset += len(data)
            yield data
    finally:
        fs.release(fh)


def check_rename_target(
    flags: int, *, same_inode: bool, src_is_dir: bool, dst_is_dir: bool, dst_is_empty: bool
) -> bool:
    """POSIX rules for renaming onto a name that exists; False when there is nothing to do.

    Only RENAME_NOREPLACE is supported among the flags (the caller refuses others).
    """
    if flags & RENAME_NOREPLACE:
        raise FSError(errno.EEXIST)
    if same_inode:
        return False
    if src_is_dir and not dst_is_dir:
        raise FSError(errno.ENOTDIR)
    if dst_is_dir and not src_is_dir:
        raise FSError(errno.EISDIR)
    if dst_is_dir and not dst_is_empty:
        raise FSError(errno.ENOTEMPTY)
    return True


def check_xattr_flags(flags: int, present: bool) -> None:
    """XATTR_CREATE refuses an existing name, XATTR_REPLACE a missing one."""
    if flags & os.XATTR_CREATE and present:
        raise FSError(errno.EEXIST)
    if flags & os.XATTR_REPLACE and not present:
        raise FSError(errno.ENODATA)
