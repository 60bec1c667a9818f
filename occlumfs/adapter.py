"""The one pyfuse3 adapter: serves any :class:`occlumfs.fs.Filesystem` over FUSE.

It only translates: decode the request, call the filesystem object, encode the
answer. Errors are mapped in one place (:func:`_handler`): an ``FSError`` becomes
its errno, an ``IntegrityError`` is logged and answers EIO, and anything else is
logged with the request and answers EIO, because any other exception escaping a
pyfuse3 handler would end the mount.

The filesystem objects are synchronous and the handlers never await: the server
loop (:mod:`occlumfs.mount`) runs each request to completion before it reads the
next, so no locking is needed inside them. Request payloads (file data, xattr
values) are never logged.
"""

from __future__ import annotations

import errno
import functools
import logging
import stat
from collections.abc import Callable, Coroutine
from typing import Any

from occlumfs.errors import FSError, IntegrityError
from occlumfs.fs import Attr, AttrChanges, Caller, Filesystem
from occlumfs.fuselib import pyfuse3

log = logging.getLogger("occlumfs.fuse")

# Host errors that mean the same to the app as to us; any other OSError from
# the backing store is an I/O error of the filesystem.
_PASS_THROUGH_HOST_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

# POSIX ACLs travel as these xattrs. The mounts never enable ACLs (the kernel
# would not enforce one, so `ls -l` would show a "+" and getfacl entries that
# grant or deny nothing): they answer EOPNOTSUPP, as a filesystem without ACL
# support does. `ls -l` then stops asking for each file once per mount.
_ACL_XATTRS = frozenset({b"system.posix_acl_access", b"system.posix_acl_default"})


def _describe(args: tuple[Any, ...]) -> str:
    """Request arguments fit for a log line: numbers and names, never data."""
    shown = []
    for arg in args:
        if isinstance(arg, int):
            shown.append(str(arg))
        elif isinstance(arg, bytes) and len(arg) <= 255:
            shown.append(repr(arg))
    return ", ".join(shown)


def _handler(
    method: Callable[..., Any],
) -> Callable[..., Coroutine[Any, Any, Any]]:
    """Wrap a synchronous translation as a pyfuse3 handler with the error mapping."""

    @functools.wraps(method)
    async def handle(self: FuseOperations, *args: Any) -> Any:
        try:
            return method(self, *args)
        except pyfuse3.FUSEError:
            raise
        except IntegrityError as exc:
            log.error("%s(%s): %s", method.__name__, _describe(args), exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except FSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except OSError as exc:
            if exc.errno in _PASS_THROUGH_HOST_ERRNOS:
                raise pyfuse3.FUSEError(exc.errno) from None
            log.error("%s(%s): host storage error: %s", method.__name__, _describe(args), exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s(%s) failed", method.__name__, _describe(args))
            raise pyfuse3.FUSEError(errno.EIO) from None

    return handle


def _reply_dot(token, name: bytes, ino: int, cookie: int) -> bool:
    """Add ``.`` or ``..`` (directory ``ino``) to a listing; False when it is full."""
    dot = pyfuse3.EntryAttributes()
    dot.st_ino = ino
    dot.st_mode = stat.S_IFDIR
    return pyfuse3.readdir_reply(token, name, dot, cookie)


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(uid=ctx.uid, gid=ctx.gid, pid=ctx.pid)


class FuseOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = True
    enable_acl = False

    def __init__(self, fs: Filesystem) -> None:
        super().__init__()
        self.fs = fs
        self._has_xattrs = fs.info.has_xattrs
        self._timeout = fs.info.cache_timeout
        self._immutable = fs.info.immutable
        self._dir_handles: dict[int, tuple[int, int]] = {}  # ours: (the fs's handle, ino)
        self._next_dir_handle = 1
        # Pages of a file stay true across opens when nothing but this mount
        # changes it: a file read again is not read again through the server.
        self._keep_cache = fs.info.immutable or fs.info.exclusive
        # The kernel remembers that a name does not exist (a negative entry) as
        # long as it remembers names, when only this mount can create one.
        self._negative_timeout = self._timeout if self._keep_cache else 0.0
        # Writeback caching only makes sense where the kernel may write. With it the
        # kernel keeps regular files' c/mtime and sends them with setattr.
        self.enable_writeback_cache = not fs.info.read_only
        if self.enable_writeback_cache:
            fs.kernel_keeps_file_times()

    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = attr.ino
        entry.entry_timeout = self._timeout
        entry.attr_timeout = self._timeout
        entry.st_mode = attr.mode
        entry.st_nlink = attr.nlink
        entry.st_uid = attr.uid
        entry.st_gid = attr.gid
        entry.st_rdev = attr.rdev
        entry.st_size = attr.size
        entry.st_blksize = attr.blksize
        entry.st_blocks = attr.blocks
        entry.st_atime_ns = attr.atime_ns
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_ctime_ns = attr.ctime_ns
        return entry

    def _file_info(self, fh: int) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=fh, keep_cache=self._keep_cache)

    # -- read side -----------------------------------------------------------
    @_handler
    def lookup(self, parent, name, ctx):
        if name == b".":
            return self._entry(self.fs.getattr(parent))
        try:
            return self._entry(self.fs.lookup(parent, name))
        except FSError as exc:
            if exc.errno != errno.ENOENT or not self._negative_timeout:
                raise
        # Inode 0 answers "no such name" and lets the kernel keep that answer.
        absent = pyfuse3.EntryAttributes()
        absent.st_ino = 0
        absent.entry_timeout = self._negative_timeout
        absent.attr_timeout = 0
        return absent

    async def forget(self, inode_list):
        # The kernel takes no answer to a forget, and pyfuse3 has nowhere to send
        # an error: anything escaping here, even an FSError, would end the mount.
        for ino, nlookup in inode_list:
            try:
                self.fs.forget(ino, nlookup)
            except Exception:
                log.exception("forget(%d, %d) failed", ino, nlookup)

    @_handler
    def getattr(self, inode, ctx):
        return self._entry(self.fs.getattr(inode))

    @_handler
    def readlink(self, inode, ctx):
        return self.fs.readlink(inode)

    # A listing starts with "." and ".." as on any kernel filesystem (`ls -a`, and
    # code that counts a directory's entries to find it empty). They take the
    # cookies 1 and 2; the filesystem's own cookie c is c + 2 here. The kernel
    # neither links nor counts "." and ".." entries of READDIRPLUS, so only their
    # inode numbers and type matter. Directory handles are the adapter's own, to
    # know which directory a handle lists.
    _DOTS = 2

    @_handler
    def opendir(self, inode, ctx):
        fh = self.fs.opendir(inode)
        handle = self._next_dir_handle
        self._next_dir_handle += 1
        self._dir_handles[handle] = (fh, inode)
        return handle

    @_handler
    def readdir(self, handle, start_id, token):
        fh, ino = self._dir_handles[handle]
        if start_id < 1 and not _reply_dot(token, b".", ino, 1):
            return
        if start_id < 2 and not _reply_dot(token, b"..", self._parent(ino), 2):
            return
        dots = self._DOTS
        for entry in self.fs.readdir(fh, max(0, start_id - dots)):
            attr = self._entry(entry.attr)
            if not pyfuse3.readdir_reply(token, entry.name, attr, entry.next_offset + dots):
                break

    def _parent(self, ino: int) -> int:
        if ino == pyfuse3.ROOT_INODE:
            return ino  # the mount's root: the kernel shows what is above it
        try:
            return self.fs.lookup(ino, b"..").ino
        except FSError:
            return ino

    @_handler
    def releasedir(self, handle):
        fh, _ = self._dir_handles.pop(handle)
        self.fs.releasedir(fh)

    @_handler
    def open(self, inode, flags, ctx):
        return self._file_info(self.fs.open(inode, flags))

    @_handler
    def read(self, fh, off, size):
        # pyfuse3 writes the reply before this request ends: a borrowed view is safe.
        return self.fs.read_for_reply(fh, off, size)

    @_handler
    def flush(self, fh):
        if self._immutable:
            # Nothing of an immutable filesystem is ever dirty. ENOSYS makes the
            # kernel stop sending FLUSH on every close (it then succeeds alone).
            raise pyfuse3.FUSEError(errno.ENOSYS)
        self.fs.flush(fh)

    @_handler
    def release(self, fh):
        self.fs.release(fh)

    @_handler
    def statfs(self, ctx):
        got = self.fs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = got.bsize
        out.f_frsize = got.frsize
        out.f_blocks = got.blocks
        out.f_bfree = got.bfree
        out.f_bavail = got.bavail
        out.f_files = got.files
        out.f_ffree = got.ffree
        out.f_favail = got.ffree
        out.f_namemax = got.namemax
        return out

    @_handler
    def getxattr(self, inode, name, ctx):
        if not self._has_xattrs:
            # ENOSYS makes the kernel answer EOPNOTSUPP itself from now on:
            # without it `ls -l` costs two requests per file.
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if name in _ACL_XATTRS:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        return self.fs.getxattr(inode, name)

    @_handler
    def listxattr(self, inode, ctx):
        return [name for name in self.fs.listxattr(inode) if name not in _ACL_XATTRS]

    # -- write side ------------------------------------------------------------
    @_handler
    def setattr(self, inode, attr, fields, fh, ctx):
        changes = AttrChanges(
            mode=attr.st_mode & 0o7777 if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
        )
        return self._entry(self.fs.setattr(inode, changes, fh))

    @_handler
    def write(self, fh, off, buf):
        return self.fs.write(fh, off, buf)

    @_handler
    def fsync(self, fh, datasync):
        self.fs.fsync(fh, datasync)

    @_handler
    def fsyncdir(self, handle, datasync):
        self.fs.fsyncdir(self._dir_handles[handle][0], datasync)

    @_handler
    def create(self, parent_inode, name, mode, flags, ctx):
        fh, attr = self.fs.create(parent_inode, name, mode, flags, _caller(ctx))
        return self._file_info(fh), self._entry(attr)

    @_handler
    def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._entry(self.fs.mknod(parent_inode, name, mode, rdev, _caller(ctx)))

    @_handler
    def mkdir(self, parent_inode, name, mode, ctx):
        return self._entry(self.fs.mkdir(parent_inode, name, mode, _caller(ctx)))

    @_handler
    def symlink(self, parent_inode, name, target, ctx):
        return self._entry(self.fs.symlink(parent_inode, name, target, _caller(ctx)))

    @_handler
    def link(self, inode, new_parent_inode, new_name, ctx):
        return self._entry(self.fs.link(inode, new_parent_inode, new_name))

    @_handler
    def unlink(self, parent_inode, name, ctx):
        self.fs.unlink(parent_inode, name)

    @_handler
    def rmdir(self, parent_inode, name, ctx):
        self.fs.rmdir(parent_inode, name)

    @_handler
    def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_handler
    def setxattr(self, inode, name, value, ctx):
        if name in _ACL_XATTRS:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        self.fs.setxattr(inode, name, value)

    @_handler
    def removexattr(self, inode, name, ctx):
        if name in _ACL_XATTRS:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        self.fs.removexattr(inode, name)
