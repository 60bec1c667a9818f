"""The small POSIX-like API the conformance tests are written against.

Two implementations:

* :class:`HostView` makes plain ``os`` calls under a root directory. Pointed at
  a FUSE mountpoint it tests a filesystem through the kernel; pointed at a host
  directory it is the oracle that proves the suite's expectations are Linux's.
* :class:`ObjectView` is a miniature VFS over a :class:`occlumfs.fs.Filesystem`
  object: it walks paths with ``lookup`` (following symlinks like the kernel),
  turns file descriptors into handles and keeps file positions. It adds no
  checks of its own beyond what the kernel's VFS does before it calls a
  filesystem, so the filesystem object's own answers are what is tested.

Paths are relative to the view's root, as ``str`` or ``bytes``. Errors are
``OSError`` with the errno the kernel would return.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from occlumfs.errors import FSError
from occlumfs.fs import ROOT_INO, AttrChanges, Caller, Filesystem

PathLike = str | bytes

RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61}[os.uname().machine]
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]


@dataclass(frozen=True)
class Stat:
    mode: int
    ino: int
    nlink: int
    uid: int
    gid: int
    size: int
    rdev: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def from_os(cls, st: os.stat_result) -> Stat:
        return cls(
            st.st_mode,
            st.st_ino,
            st.st_nlink,
            st.st_uid,
            st.st_gid,
            st.st_size,
            st.st_rdev,
            st.st_blocks,
            st.st_atime_ns,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )

    @classmethod
    def from_attr(cls, attr) -> Stat:
        return cls(
            attr.mode,
            attr.ino,
            attr.nlink,
            attr.uid,
            attr.gid,
            attr.size,
            attr.rdev,
            attr.blocks,
            attr.atime_ns,
            attr.mtime_ns,
            attr.ctime_ns,
        )


@dataclass(frozen=True)
class FsStat:
    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    namemax: int


def _b(path: PathLike) -> bytes:
    return os.fsencode(path)


class View:
    """The operations every view offers; see the two implementations."""

    name: str
    writable: bool
    # A real directory (a FUSE mountpoint or a host directory), for tests that
    # only make sense through the kernel: mmap, several processes, getdents.
    host_root: Path | None = None

    # Conveniences shared by both views, built on the primitives.
    def read_file(self, path: PathLike) -> bytes:
        fd = self.open(path, os.O_RDONLY)
        try:
            chunks, offset = [], 0
            while chunk := self.pread(fd, 1 << 20, offset):
                chunks.append(chunk)
                offset += len(chunk)
            return b"".join(chunks)
        finally:
            self.close(fd)

    def write_file(self, path: PathLike, data: bytes, mode: int = 0o644) -> None:
        fd = self.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            offset = 0
            while offset < len(data):
                offset += self.pwrite(fd, data[offset:], offset)
        finally:
            self.close(fd)

    def exists(self, path: PathLike) -> bool:
        try:
            self.lstat(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def listdir(self, path: PathLike) -> list[bytes]:
        """Every name in directory ``path`` (no ``.`` or ``..``), in listing order."""
        handle = self.opendir(path)
        try:
            names = []
            while batch := self.readdir(handle):
                names.extend(name for name, _ in batch)
            return names
        finally:
            self.closedir(handle)


# -- through the kernel ---------------------------------------------------------


@dataclass
class _HostDir:
    fd: int


class HostView(View):
    """Plain system calls under ``root`` (a mountpoint or a host directory)."""

    def __init__(self, root: Path, name: str, writable: bool = True) -> None:
        self.root = Path(root)
        self.host_root = self.root
        self.name = name
        self.writable = writable

    def __repr__(self) -> str:
        return f"HostView({self.name}: {self.root})"

    def p(self, path: PathLike) -> bytes:
        return os.path.join(os.fsencode(self.root), _b(path).lstrip(b"/"))

    def sub(self, name: str) -> HostView:
        os.mkdir(self.p(name))
        return HostView(self.root / name, self.name, self.writable)

    # metadata
    def lstat(self, path: PathLike) -> Stat:
        return Stat.from_os(os.lstat(self.p(path)))

    def stat(self, path: PathLike) -> Stat:
        return Stat.from_os(os.stat(self.p(path)))

    def fstat(self, fd: int) -> Stat:
        return Stat.from_os(os.fstat(fd))

    def readlink(self, path: PathLike) -> bytes:
        return os.readlink(self.p(path))

    def statfs(self) -> FsStat:
        st = os.statvfs(self.root)
        return FsStat(
            st.f_bsize,
            st.f_frsize,
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            st.f_namemax,
        )

    # directories, through getdents64 so that cookies (d_off) are visible
    def opendir(self, path: PathLike) -> _HostDir:
        return _HostDir(os.open(self.p(path), os.O_RDONLY | os.O_DIRECTORY))

    def readdir(self, handle: _HostDir, buffer_size: int = 2048) -> list[tuple[bytes, int]]:
        """One getdents64 call: [(name, d_off)], ``.`` and ``..`` left out; [] at the end."""
        out: list[tuple[bytes, int]] = []
        while not out:
            entries = getdents64(handle.fd, buffer_size)
            if not entries:
                return []
            out = [(name, off) for name, off in entries if name not in (b".", b"..")]
        return out

    def seekdir(self, handle: _HostDir, cookie: int) -> None:
        os.lseek(handle.fd, cookie, os.SEEK_SET)

    def closedir(self, handle: _HostDir) -> None:
        os.close(handle.fd)

    # files
    def open(self, path: PathLike, flags: int, mode: int = 0o644) -> int:
        return os.open(self.p(path), flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def read(self, fd: int, size: int) -> bytes:
        return os.read(fd, size)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def truncate(self, path: PathLike, size: int) -> None:
        os.truncate(self.p(path), size)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    # names
    def mkdir(self, path: PathLike, mode: int = 0o755) -> None:
        os.mkdir(self.p(path), mode)

    def rmdir(self, path: PathLike) -> None:
        os.rmdir(self.p(path))

    def unlink(self, path: PathLike) -> None:
        os.unlink(self.p(path))

    def rename(self, old: PathLike, new: PathLike, flags: int = 0) -> None:
        if not flags:
            os.rename(self.p(old), self.p(new))
            return
        if _libc.renameat2(_AT_FDCWD, self.p(old), _AT_FDCWD, self.p(new), flags) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    def link(self, src: PathLike, dst: PathLike) -> None:
        os.link(self.p(src), self.p(dst), follow_symlinks=False)

    def symlink(self, target: PathLike, path: PathLike) -> None:
        os.symlink(_b(target), self.p(path))

    def mknod(self, path: PathLike, mode: int, rdev: int = 0) -> None:
        os.mknod(self.p(path), mode, rdev)

    # attributes (never following a final symlink, except chmod, like chmod(2))
    def chmod(self, path: PathLike, mode: int) -> None:
        os.chmod(self.p(path), mode)

    def chown(self, path: PathLike, uid: int, gid: int) -> None:
        os.chown(self.p(path), uid, gid, follow_symlinks=False)

    def utimens(self, path: PathLike, atime_ns: int, mtime_ns: int) -> None:
        os.utime(self.p(path), ns=(atime_ns, mtime_ns), follow_symlinks=False)

    def getxattr(self, path: PathLike, name: bytes) -> bytes:
        return os.getxattr(self.p(path), name, follow_symlinks=False)

    def listxattr(self, path: PathLike) -> list[bytes]:
        return [os.fsencode(n) for n in os.listxattr(self.p(path), follow_symlinks=False)]

    def setxattr(self, path: PathLike, name: bytes, value: bytes, flags: int = 0) -> None:
        os.setxattr(self.p(path), name, value, flags, follow_symlinks=False)

    def removexattr(self, path: PathLike, name: bytes) -> None:
        os.removexattr(self.p(path), name, follow_symlinks=False)


_DIRENT_HEAD = struct.Struct("=QqHB")  # d_ino, d_off, d_reclen, d_type


def getdents64(fd: int, buffer_size: int, *, with_type: bool = False) -> list[tuple]:
    """One ``getdents64`` system call on a directory fd: [(name, d_off)], or
    [(name, d_off, d_type)] ``with_type``."""
    buf = ctypes.create_string_buffer(buffer_size)
    got = _libc.syscall(_SYS_GETDENTS64, fd, buf, buffer_size)
    if got < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    raw = buf.raw[:got]
    entries, pos = [], 0
    while pos < got:
        _, d_off, reclen, d_type = _DIRENT_HEAD.unpack_from(raw, pos)
        name = raw[pos + _DIRENT_HEAD.size : pos + reclen].split(b"\0", 1)[0]
        entries.append((name, d_off, d_type) if with_type else (name, d_off))
        pos += reclen
    return entries


# -- in-process -----------------------------------------------------------------


@dataclass
class _OpenFile:
    ino: int
    fh: int
    flags: int
    is_dir: bool = False
    pos: int = 0


@dataclass
class _ObjectDir:
    ino: int
    fh: int
    cookie: int = 0
    batch: int = 37  # small batches, so listings resume from cookies many times


@dataclass
class _Walk:
    parent: int | None  # None when the path names the view's root
    name: bytes
    attr: object | None  # None when the last component does not exist


MAX_SYMLINK_HOPS = 40


@dataclass
class ObjectView(View):
    """A miniature VFS over a filesystem object."""

    fs: Filesystem
    name: str
    writable: bool
    root: int = ROOT_INO
    caller: Caller = field(default_factory=Caller)
    _files: dict[int, _OpenFile] = field(default_factory=dict)
    _next_fd: int = 3

    def __repr__(self) -> str:
        return f"ObjectView({self.name}: ino {self.root})"

    def sub(self, name: str) -> ObjectView:
        self.mkdir(name)
        ino = self._walk(name, follow=False).attr.ino
        return ObjectView(self.fs, self.name, self.writable, root=ino, caller=self.caller)

    # -- path walk ---------------------------------------------------------------
    def _walk(self, path: PathLike, *, follow: bool) -> _Walk:
        parts = [p for p in _b(path).split(b"/") if p not in (b"", b".")]
        stack = [self.root]  # the directories walked so far, for ".."
        hops = 0
        while parts:
            part = parts.pop(0)
            last = not parts
            if part == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            try:
                attr = self.fs.lookup(stack[-1], part)
            except OSError as exc:
                if exc.errno == errno.ENOENT and last:
                    return _Walk(stack[-1], part, None)
                raise
            if attr.is_lnk and (follow or not last):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise FSError(errno.ELOOP)
                target = self.fs.readlink(attr.ino)
                if target.startswith(b"/"):
                    stack = [self.root]
                parts = [p for p in target.split(b"/") if p not in (b"", b".")] + parts
                continue
            if last:
                return _Walk(stack[-1], part, attr)
            if not attr.is_dir:
                raise FSError(errno.ENOTDIR)
            stack.append(attr.ino)
        return _Walk(None, b"", self.fs.getattr(stack[-1]))

    def _existing(self, path: PathLike, *, follow: bool):
        walk = self._walk(path, follow=follow)
        if walk.attr is None:
            raise FSError(errno.ENOENT)
        return walk.attr

    def _new_name(self, path: PathLike) -> _Walk:
        walk = self._walk(path, follow=False)
        if walk.attr is not None:
            raise FSError(errno.EEXIST)
        return walk

    def _file(self, fd: int) -> _OpenFile:
        try:
            return self._files[fd]
        except KeyError:
            raise FSError(errno.EBADF) from None

    # metadata
    def lstat(self, path: PathLike) -> Stat:
        return Stat.from_attr(self._existing(path, follow=False))

    def stat(self, path: PathLike) -> Stat:
        return Stat.from_attr(self._existing(path, follow=True))

    def fstat(self, fd: int) -> Stat:
        return Stat.from_attr(self.fs.getattr(self._file(fd).ino))

    def readlink(self, path: PathLike) -> bytes:
        return self.fs.readlink(self._existing(path, follow=False).ino)

    def statfs(self) -> FsStat:
        st = self.fs.statfs()
        return FsStat(
            st.bsize, st.frsize, st.blocks, st.bfree, st.bavail, st.files, st.ffree, st.namemax
        )

    # directories
    def opendir(self, path: PathLike) -> _ObjectDir:
        attr = self._existing(path, follow=True)
        return _ObjectDir(attr.ino, self.fs.opendir(attr.ino))

    def readdir(self, handle: _ObjectDir) -> list[tuple[bytes, int]]:
        out = []
        for entry in self.fs.readdir(handle.fh, handle.cookie):
            out.append((entry.name, entry.next_offset))
            if len(out) == handle.batch:
                break
        if out:
            handle.cookie = out[-1][1]
        return out

    def seekdir(self, handle: _ObjectDir, cookie: int) -> None:
        handle.cookie = cookie

    def closedir(self, handle: _ObjectDir) -> None:
        self.fs.releasedir(handle.fh)

    # files
    def open(self, path: PathLike, flags: int, mode: int = 0o644) -> int:
        # O_CREAT|O_EXCL never follows a final symlink, even a dangling one.
        exclusive = flags & os.O_CREAT and flags & os.O_EXCL
        walk = self._walk(path, follow=not (flags & os.O_NOFOLLOW or exclusive))
        # Like the kernel, creation flags stay here; the rest reach the filesystem.
        fs_flags = flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY)
        if walk.attr is None:
            if not flags & os.O_CREAT or walk.parent is None:
                raise FSError(errno.ENOENT)
            fh, attr = self.fs.create(walk.parent, walk.name, mode & 0o7777, fs_flags, self.caller)
            opened = _OpenFile(attr.ino, fh, flags)
        else:
            attr = walk.attr
            if flags & os.O_CREAT and flags & os.O_EXCL:
                raise FSError(errno.EEXIST)
            if attr.is_lnk:
                raise FSError(errno.ELOOP)
            if attr.is_dir:
                if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_CREAT:
                    raise FSError(errno.EISDIR)
                opened = _OpenFile(attr.ino, self.fs.opendir(attr.ino), flags, is_dir=True)
            else:
                if flags & os.O_DIRECTORY:
                    raise FSError(errno.ENOTDIR)
                opened = _OpenFile(attr.ino, self.fs.open(attr.ino, fs_flags), flags)
        fd = self._next_fd
        self._next_fd += 1
        self._files[fd] = opened
        return fd

    def close(self, fd: int) -> None:
        opened = self._files.pop(fd, None)
        if opened is None:
            raise FSError(errno.EBADF)
        if opened.is_dir:
            self.fs.releasedir(opened.fh)
            return
        try:
            self.fs.flush(opened.fh)
        finally:
            self.fs.release(opened.fh)

    def _readable(self, fd: int) -> _OpenFile:
        opened = self._file(fd)
        if opened.is_dir:
            raise FSError(errno.EISDIR)
        if opened.flags & os.O_ACCMODE == os.O_WRONLY:
            raise FSError(errno.EBADF)
        return opened

    def _writable(self, fd: int) -> _OpenFile:
        opened = self._file(fd)
        if opened.flags & os.O_ACCMODE == os.O_RDONLY:
            raise FSError(errno.EBADF)
        return opened

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        if offset < 0:
            raise FSError(errno.EINVAL)
        return self.fs.read(self._readable(fd).fh, offset, size)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        if offset < 0:
            raise FSError(errno.EINVAL)
        return self.fs.write(self._writable(fd).fh, offset, bytes(data))

    def read(self, fd: int, size: int) -> bytes:
        opened = self._readable(fd)
        data = self.fs.read(opened.fh, opened.pos, size)
        opened.pos += len(data)
        return data

    def write(self, fd: int, data: bytes) -> int:
        opened = self._writable(fd)
        if opened.flags & os.O_APPEND:
            opened.pos = self.fs.getattr(opened.ino).size
        done = self.fs.write(opened.fh, opened.pos, bytes(data))
        opened.pos += done
        return done

    def ftruncate(self, fd: int, size: int) -> None:
        opened = self._file(fd)
        if opened.flags & os.O_ACCMODE == os.O_RDONLY or opened.is_dir:
            raise FSError(errno.EINVAL)
        self.fs.setattr(opened.ino, AttrChanges(size=size), opened.fh)

    def truncate(self, path: PathLike, size: int) -> None:
        attr = self._existing(path, follow=True)
        if attr.is_dir:
            raise FSError(errno.EISDIR)
        self.fs.setattr(attr.ino, AttrChanges(size=size))

    def fsync(self, fd: int) -> None:
        opened = self._file(fd)
        sync = self.fs.fsyncdir if opened.is_dir else self.fs.fsync
        sync(opened.fh, False)

    def fdatasync(self, fd: int) -> None:
        opened = self._file(fd)
        sync = self.fs.fsyncdir if opened.is_dir else self.fs.fsync
        sync(opened.fh, True)

    # names
    def mkdir(self, path: PathLike, mode: int = 0o755) -> None:
        walk = self._new_name(path)
        self.fs.mkdir(walk.parent, walk.name, mode & 0o7777, self.caller)

    def rmdir(self, path: PathLike) -> None:
        walk = self._walk(path, follow=False)
        if walk.attr is None:
            raise FSError(errno.ENOENT)
        if walk.parent is None:
            raise FSError(errno.EBUSY)
        self.fs.rmdir(walk.parent, walk.name)

    def unlink(self, path: PathLike) -> None:
        walk = self._walk(path, follow=False)
        if walk.attr is None:
            raise FSError(errno.ENOENT)
        self.fs.unlink(walk.parent, walk.name)

    def rename(self, old: PathLike, new: PathLike, flags: int = 0) -> None:
        src = self._walk(old, follow=False)
        if src.attr is None:
            raise FSError(errno.ENOENT)
        dst = self._walk(new, follow=False)
        self.fs.rename(src.parent, src.name, dst.parent, dst.name, flags)

    def link(self, src: PathLike, dst: PathLike) -> None:
        attr = self._existing(src, follow=False)
        if attr.is_dir:
            raise FSError(errno.EPERM)
        walk = self._new_name(dst)
        self.fs.link(attr.ino, walk.parent, walk.name)

    def symlink(self, target: PathLike, path: PathLike) -> None:
        walk = self._new_name(path)
        self.fs.symlink(walk.parent, walk.name, _b(target), self.caller)

    def mknod(self, path: PathLike, mode: int, rdev: int = 0) -> None:
        walk = self._new_name(path)
        if not stat.S_IFMT(mode):
            mode |= stat.S_IFREG
        self.fs.mknod(walk.parent, walk.name, mode, rdev, self.caller)

    # attributes
    def chmod(self, path: PathLike, mode: int) -> None:
        attr = self._existing(path, follow=True)
        self.fs.setattr(attr.ino, AttrChanges(mode=mode & 0o7777))

    def chown(self, path: PathLike, uid: int, gid: int) -> None:
        attr = self._existing(path, follow=False)
        self.fs.setattr(attr.ino, AttrChanges(uid=uid, gid=gid))

    def utimens(self, path: PathLike, atime_ns: int, mtime_ns: int) -> None:
        attr = self._existing(path, follow=False)
        self.fs.setattr(attr.ino, AttrChanges(atime_ns=atime_ns, mtime_ns=mtime_ns))

    def getxattr(self, path: PathLike, name: bytes) -> bytes:
        return self.fs.getxattr(self._existing(path, follow=False).ino, _b(name))

    def listxattr(self, path: PathLike) -> list[bytes]:
        return list(self.fs.listxattr(self._existing(path, follow=False).ino))

    def setxattr(self, path: PathLike, name: bytes, value: bytes, flags: int = 0) -> None:
        self.fs.setxattr(self._existing(path, follow=False).ino, _b(name), bytes(value), flags)

    def removexattr(self, path: PathLike, name: bytes) -> None:
        self.fs.removexattr(self._existing(path, follow=False).ino, _b(name))
