"""Host files opened so that a planted link can never redirect a read or a write.

A SEFS store (and, to a lesser degree, a state directory or a key file's
directory) may belong to someone other than the user who opens it: root mounts
a user's store as a matter of course. Whoever owns the directory can put a
symlink, a fifo, a device node, a directory or a hard link to another file at
any name we use. So every name is resolved in exactly one way:

* a directory is opened once, as a file descriptor (:meth:`HostDir.open`, with
  ``O_NOFOLLOW`` on its last component unless the caller trusts the path);
  subdirectories are opened relative to it (:meth:`HostDir.subdir`);
* every open, create, rename, unlink and fsync below it goes through that
  descriptor with ``O_NOFOLLOW`` and single-component names: the kernel never
  resolves a path through a link the directory's owner planted;
* a name in use must be a regular file with one link (:meth:`HostDir.open_file`
  checks with ``fstat`` before anything is truncated or written). Anything else
  (symlink, fifo, device, socket, directory, hard link) is an
  :class:`~occlumfs.errors.IntegrityError` naming it, and nothing is touched.
  Opens use ``O_NONBLOCK`` so a fifo cannot hang us before the check.
* :meth:`HostDir.replace_file` (bytes) and :meth:`HostDir.replacing` (a
  descriptor to stream into) are the one atomic replace: write a temporary
  file, fsync it, rename it over the name, fsync the directory.

Typical use, for a file the user named (its directory is theirs, so followed)::

    with HostDir.open(path.parent, follow=True) as parent:
        parent.replace_file(path.name, data)          # or: with parent.replacing(...) as fd

and for a store: ``root = HostDir.open(store)`` once, ``root.subdir("m")``,
then ``open_file``/``read_file``/``write_file``/``rename``/``unlink`` by name.

Only root can make device nodes, so an unprivileged owner cannot race a
device in between the ``lstat`` and the ``open``; the ``fstat`` after the
open catches every other swap.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterator

from occlumfs.errors import (
    FormatError,
    IntegrityError,
    NotFoundError,
    OcclumfsError,
    UsageError,
)

_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "a regular file"),  # where a directory was expected
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _ours(st: os.stat_result) -> bool:
    """A regular file no other name shares. A link count of 0 is a file another
    writer just renamed a replacement over (we hold the old one): not a link
    to anything outside, so not refused."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink <= 1


class HostDir:
    """A directory held open by descriptor; every name given to it is one path component."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    # -- opening directories --------------------------------------------------------------
    @classmethod
    def open(cls, path: os.PathLike | str, *, follow: bool = False) -> HostDir:
        """Open directory ``path``; its last component may be a symlink only if ``follow``.

        A missing directory is a NotFoundError; a symlink in its place (where
        not followed) an IntegrityError; any other file a UsageError: the caller
        named a file where a directory belongs.
        """
        path = os.fspath(path)
        flags = _DIR_FLAGS | (0 if follow else os.O_NOFOLLOW)
        try:
            return cls(os.open(path, flags), path)
        except FileNotFoundError:
            raise NotFoundError(f"{path}: no such directory") from None
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            try:
                mode = os.lstat(path).st_mode
            except NotADirectoryError:
                raise UsageError(f"{path}: a component of the path is not a directory") from None
        if stat.S_ISLNK(mode):  # where only a directory was asked for: planted
            raise IntegrityError(f"{path}: is a symlink, not a directory: refusing to use it")
        raise UsageError(f"{path}: is {_kind(mode)}, not a directory")  # the caller named it

    def subdir(self, name: str) -> HostDir:
        """The directory ``name`` inside this one (never through a symlink)."""
        where = self._where(name)
        try:
            return HostDir(os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=self.fd), where)
        except FileNotFoundError:
            raise NotFoundError(f"{where}: no such directory") from None
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            kind = _kind(os.lstat(name, dir_fd=self.fd).st_mode)
        raise IntegrityError(f"{where}: is {kind}, not a directory: refusing to use it")

    def mkdir(self, name: str, mode: int = 0o700) -> None:
        os.mkdir(name, mode, dir_fd=self.fd)

    # -- regular files ----------------------------------------------------------------------
    def _where(self, name: str) -> str:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"not a single path component: {name!r}")
        return os.path.join(self.path, name)

    def _refuse(self, name: str, st: os.stat_result) -> IntegrityError:
        where = self._where(name)
        if stat.S_ISREG(st.st_mode):
            what = f"has {st.st_nlink} hard links (one may be a file outside the directory)"
        else:
            what = f"is {_kind(st.st_mode)}, not a regular file"
        return IntegrityError(f"{where}: {what}: refusing to use it")

    def lstat(self, name: str) -> os.stat_result | None:
        """The entry ``name`` itself (never what a link points to); None when absent."""
        self._where(name)  # one path component, or ValueError
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def check_file(self, name: str) -> bool:
        """True when ``name`` is a regular file with one link, False when absent, else refuse."""
        st = self.lstat(name)
        if st is None:
            return False
        if not _ours(st):
            raise self._refuse(name, st)
        return True

    def open_file(self, name: str, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
        """Open the regular file ``name`` (``flags`` may hold O_CREAT, never O_TRUNC).

        The entry is checked before the open and the descriptor after it, so a
        symlink, fifo, device, directory or hard link is refused untouched.
        """
        if flags & os.O_TRUNC:
            raise ValueError("O_TRUNC would truncate before the check: ftruncate the result")
        if flags & os.O_CREAT:
            # Most creates make a new file (a SEFS data file at a file's first
            # flush): with O_EXCL the kernel makes it or fails with EEXIST on
            # anything at the name, a symlink (even a dangling one) included, and
            # never follows it. What it makes is ours alone: no check needed.
            # Something already there takes the checked path below.
            try:
                return os.open(name, flags | os.O_EXCL | _OPEN_FLAGS, mode, dir_fd=self.fd)
            except FileExistsError:
                pass
            if flags & os.O_EXCL:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), self._where(name))
        self.check_file(name)
        try:
            fd = os.open(name, flags | _OPEN_FLAGS, mode, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR):
                raise
            st = self.lstat(name)
            if st is None:
                raise
            raise self._refuse(name, st) from None
        try:
            st = os.fstat(fd)
            if not _ours(st):
                raise self._refuse(name, st)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_file(self, name: str, limit: int | None = None) -> bytes:
        """The regular file ``name``, at most ``limit`` bytes (FileNotFoundError when absent)."""
        fd = self.open_file(name)
        try:
            parts = []
            left = limit if limit is not None else -1
            while left:
                chunk = os.read(fd, 1 << 20 if left < 0 else min(left, 1 << 20))
                if not chunk:
                    break
                parts.append(chunk)
                left -= len(chunk) if left > 0 else 0
            return b"".join(parts)
        finally:
            os.close(fd)

    def write_file(self, name: str, data: bytes | memoryview, mode: int = 0o600) -> None:
        """Create ``name`` or replace its contents in place (not atomic: see replace_file)."""
        fd = self.open_file(name, os.O_WRONLY | os.O_CREAT, mode)
        try:
            os.ftruncate(fd, 0)
            write_all(fd, data)
        finally:
            os.close(fd)

    def replace_file(
        self, name: str, data: bytes | memoryview, *, tmp: str | None = None, mode: int = 0o600
    ) -> None:
        """Atomically make ``name`` hold ``data``: write ``tmp``, fsync, rename, fsync this dir.

        A crash leaves either the old or the new contents under ``name`` (and
        perhaps ``tmp``, which the caller may clean up later).
        """
        with self.replacing(name, tmp=tmp, mode=mode) as fd:
            write_all(fd, data)

    @contextlib.contextmanager
    def replacing(
        self, name: str, *, tmp: str | None = None, mode: int = 0o600, durable: bool = True
    ) -> Iterator[int]:
        """``with d.replacing(name) as fd:`` write ``fd`` (a new, empty ``tmp``, read-write);
        on a clean exit it replaces ``name`` atomically, on an exception it is removed.

        ``durable`` fsyncs the file before the rename and the directory after
        it; without it a reader still never sees a partial file under ``name``
        but a power cut may lose the replacement.
        """
        # Unique per process and thread: two threads of one process may replace
        # the same name at once (a SEFS commit's state write and a create's).
        tmp = tmp or f".{name}.{os.getpid()}.{threading.get_native_id()}.tmp"
        self.check_file(name)
        fd = self.open_file(tmp, os.O_RDWR | os.O_CREAT, mode)
        try:
            os.ftruncate(fd, 0)
            yield fd
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            raise
        os.close(fd)
        self.rename(tmp, name)
        if durable:
            self.fsync()

    def rename(self, src: str, dst: str) -> None:
        """Rename ``src`` over ``dst``, both regular files (or ``dst`` absent) in this directory."""
        self.check_file(src)
        self.check_file(dst)
        os.rename(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def unlink(self, name: str) -> None:
        """Remove the regular file ``name`` (FileNotFoundError when absent)."""
        if not self.check_file(name):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self._where(name))
        os.unlink(name, dir_fd=self.fd)

    def fsync_file(self, name: str) -> None:
        fd = self.open_file(name)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- the directory itself ----------------------------------------------------------------
    def fsync(self) -> None:
        os.fsync(self.fd)

    def listdir(self) -> list[str]:
        return os.listdir(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> HostDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


WILLNEED_PIECE = 128 * 1024  # within every host's read-ahead size (see willneed)


def willneed(fd: int, offset: int, length: int) -> None:
    """Ask the host to start reading ``length`` bytes at ``offset`` into its page cache.

    One ``POSIX_FADV_WILLNEED`` per 128 KiB: the host reads at most its
    read-ahead size per call (the larger of the device's ``read_ahead_kb`` and
    ``max_sectors_kb``; 128 KiB by default) and silently drops the rest.
    """
    end = offset + length
    for at in range(offset, end, WILLNEED_PIECE):
        os.posix_fadvise(fd, at, min(WILLNEED_PIECE, end - at), os.POSIX_FADV_WILLNEED)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of ``data`` at the descriptor's position (a zero write is ENOSPC)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


def read_named_file(path: os.PathLike | str, what: str, limit: int | None = None) -> bytes:
    """A file the user named (a key, passphrase, signing key or BOM file), or one line.

    The path is the user's, so it is followed as given; what goes wrong is
    said with ``what`` and the path: missing (NotFoundError), a directory
    (FormatError), unreadable (OcclumfsError). ``limit`` caps the bytes read.
    """
    try:
        with open(path, "rb") as f:
            return f.read(-1 if limit is None else limit)
    except FileNotFoundError:
        raise NotFoundError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, not a {what}") from None
    except OSError as exc:
        raise OcclumfsError(f"{path}: cannot read the {what}: {exc.strerror}") from None
