"""The errors that cross module boundaries.

Two families:

* :class:`FSError` carries an errno. Filesystem objects raise it for POSIX
  outcomes (ENOENT, EEXIST, ENOTEMPTY...); the FUSE adapter turns it into the
  same errno for the kernel, in one place.
* :class:`OcclumfsError` and its subclasses are user-facing failures with a
  one-line message and a documented exit code (docs/cli.md). The CLI prints the
  message and exits with the code; no traceback.

:class:`IntegrityError` is both: a read that hits tampered data answers EIO
through a mount, and exits 13 from an offline command.
"""

from __future__ import annotations

import errno as _errno
import functools
import os


class ExitCode:
    """Exit codes of the ``occlumfs`` and ``occlum`` commands (see docs/cli.md)."""

    OK = 0
    ERROR = 1  # any other failure
    USAGE = 2  # bad command line (click's own code)
    MOUNTPOINT = 10  # mountpoint missing, not a directory, not empty, or already mounted
    WRONG_KEY = 12  # the key does not open this image or filesystem
    INTEGRITY = 13  # tampered, truncated or rolled-back data; digest mismatch
    NOT_FOUND = 14  # a named file, path or key file does not exist
    FORMAT = 15  # malformed image, manifest, header or config
    IN_USE = 16  # the filesystem is mounted or locked by another process
    NOT_SAVED = 17  # a final commit (unmount) failed or was never confirmed
    FSCK = 26  # fsck found problems


_strerror = functools.cache(os.strerror)  # a negative lookup raises one of these


class FSError(OSError):
    """A POSIX error from a filesystem operation: ``FSError(errno.ENOENT)``."""

    def __init__(self, errno: int, message: str | None = None) -> None:
        super().__init__(errno, message or _strerror(errno))


class OcclumfsError(Exception):
    """A failure to report to the user as one line, with an exit code."""

    exit_code = ExitCode.ERROR


class UsageError(OcclumfsError):
    exit_code = ExitCode.USAGE


class MountpointError(OcclumfsError):
    exit_code = ExitCode.MOUNTPOINT


class WrongKeyError(OcclumfsError):
    exit_code = ExitCode.WRONG_KEY


class IntegrityError(OcclumfsError, FSError):
    """Stored data failed verification. Through a mount, the read answers EIO."""

    exit_code = ExitCode.INTEGRITY

    def __init__(self, message: str) -> None:
        FSError.__init__(self, _errno.EIO, message)

    def __str__(self) -> str:
        return self.strerror


class NotFoundError(OcclumfsError):
    exit_code = ExitCode.NOT_FOUND


class FormatError(OcclumfsError):
    exit_code = ExitCode.FORMAT


class InUseError(OcclumfsError):
    exit_code = ExitCode.IN_USE


class MountpointNotEmptyError(MountpointError):
    """The mountpoint holds entries that a mount would hide."""


class NotSavedError(OcclumfsError):
    """A filesystem's final commit failed or was never confirmed: data was lost."""

    exit_code = ExitCode.NOT_SAVED
