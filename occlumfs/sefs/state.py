"""What SEFS keeps outside the untrusted directory, and who may use the directory.

* :class:`TrustedState`: the last committed counter and root tag, MAC'd, in a
  trusted place (not inside the SEFS directory), so rolling the whole directory
  back to an older snapshot is caught.
* :func:`pin_store`: which store (fs id) lives at which path, so a store
  replaced wholesale by another one is refused unless the user accepts it.
* :class:`DirLock`: an ``flock`` on ``DIR/lock`` held for as long as the
  filesystem is open. The lock belongs to the open file description, so it
  survives the mount's fork into the background and vanishes when the server
  dies; a lock file left by a crash is then just a file, recovered silently.

Every file here is opened through :mod:`occlumfs.hostio`: a symlink, fifo,
directory or hard link at one of these names is refused, never followed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import os
import struct
from pathlib import Path

from occlumfs.errors import (
    IntegrityError,
    InUseError,
    NotFoundError,
    OcclumfsError,
    UsageError,
)
from occlumfs.hostio import HostDir
from occlumfs.sefs.format import LOCK_NAME

log = logging.getLogger("occlumfs.sefs")

STATE_ENV = "OCCLUMFS_STATE_DIR"
_STATE_MAX = 4096  # bytes; a state file is a few hundred


def default_state_dir() -> Path:
    env = os.environ.get(STATE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "occlumfs" / "sefs"


def prepare_state_dir(state_dir: Path | None, store: Path) -> Path:
    """The trusted state directory for ``store``, made (mode 0700) when missing.

    It must lie outside the store, and the store outside it. A directory the
    user named (argument or $OCCLUMFS_STATE_DIR) is created without parents, so
    a typo cannot make a tree appear; only the built-in default gets its parents.
    """
    named = state_dir is not None or bool(os.environ.get(STATE_ENV))
    path = Path(os.path.abspath(state_dir or default_state_dir()))
    real, real_store = Path(os.path.realpath(path)), Path(os.path.realpath(store))
    if real.is_relative_to(real_store) or real_store.is_relative_to(real):
        raise UsageError(
            f"trusted state directory {path}: overlaps the SEFS directory {store}; "
            "keep it outside the store, on trusted storage"
        )
    if not os.path.lexists(path):
        if named and not path.parent.is_dir():
            raise NotFoundError(f"trusted state directory {path}: {path.parent} does not exist")
        path.mkdir(mode=0o700, parents=not named, exist_ok=True)
    return path


def refuse_state_dir_under(state_dir: Path | None, mountpoint: Path) -> None:
    """A trusted state directory at or below ``mountpoint`` would be hidden by the
    mount: every commit's state write would fail behind it (usage error)."""
    path = Path(os.path.abspath(state_dir or default_state_dir()))
    if Path(os.path.realpath(path)).is_relative_to(os.path.realpath(mountpoint)):
        raise UsageError(
            f"trusted state directory {path}: inside the mountpoint {mountpoint}, "
            "which the mount would hide; keep it outside"
        )


def _read_doc(where: HostDir, name: str) -> dict | None:
    """A small JSON state file, None when absent; anything odd is an integrity error."""
    try:
        doc = json.loads(where.read_file(name, _STATE_MAX + 1))
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError):
        raise IntegrityError(f"trusted state {where.path}/{name} is unreadable") from None
    if not isinstance(doc, dict):
        raise IntegrityError(f"trusted state {where.path}/{name} is unreadable")
    return doc


def _write_doc(state_dir: Path, name: str, doc: dict) -> None:
    with HostDir.open(state_dir, follow=True) as where:
        # The default temporary name is unique per process and thread: the
        # commit's state writer thread and an open may write one file at once.
        where.replace_file(name, (json.dumps(doc) + "\n").encode())


class TrustedState:
    """``<state dir>/<fs id>.json``: the newest (counter, root tag) this machine committed."""

    def __init__(self, state_dir: Path, fs_id: bytes, mac_key: bytes) -> None:
        self.dir = Path(state_dir)
        self.name = f"{fs_id.hex()}.json"
        self.path = self.dir / self.name
        self._fs_id = fs_id
        self._key = mac_key

    def _mac(self, counter: int, root_tag: bytes, log_seq: int = 0, log_tag: bytes = b"") -> str:
        msg = self._fs_id + struct.pack(">Q", counter) + root_tag
        if log_seq:  # a log position (version 3): how many entries follow that commit
            msg += struct.pack(">Q", log_seq) + log_tag
        return hmac.digest(self._key, msg, "sha256").hex()

    def load(self) -> tuple[int, bytes] | None:
        """The pinned (counter, root tag), None when there is no state; tampering raises."""
        position = self.position()
        return None if position is None else position[:2]

    def position(self) -> tuple[int, bytes, int, bytes] | None:
        """(counter, root tag, log entries, last entry's tag): the newest commit and how
        many log entries after it this machine wrote (0, b"" when none were recorded)."""
        with HostDir.open(self.dir, follow=True) as where:
            doc = _read_doc(where, self.name)
        if doc is None:
            return None
        try:
            counter, tag, mac = doc["counter"], bytes.fromhex(doc["root_tag"]), doc["mac"]
            seq, log_tag = doc.get("log_seq", 0), bytes.fromhex(doc.get("log_tag", ""))
            if type(counter) is not int or not 0 <= counter < 1 << 64 or not isinstance(mac, str):
                raise TypeError("field types")
            if type(seq) is not int or not 0 <= seq < 1 << 64:
                raise TypeError("field types")
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(f"trusted state {self.path} is unreadable") from None
        want = self._mac(counter, tag, seq, log_tag).encode()
        if not hmac.compare_digest(mac.encode(errors="replace"), want):
            raise IntegrityError(f"trusted state {self.path}: MAC check failed")
        return counter, tag, seq, log_tag

    def check(self, counter: int, root_tag: bytes) -> bool:
        """Refuse a head older than the pinned one. True when a state was present."""
        pinned = self.load()
        if pinned is None:
            return False
        pinned_counter, pinned_tag = pinned
        if counter < pinned_counter or (counter == pinned_counter and root_tag != pinned_tag):
            raise IntegrityError(
                f"rolled back: the directory holds commit {counter} but this machine last "
                f"committed {pinned_counter} (trusted state {self.path})"
            )
        return True

    def update(self, counter: int, root_tag: bytes, log_seq: int = 0, log_tag: bytes = b"") -> None:
        doc = {"fs_id": self._fs_id.hex(), "counter": counter, "root_tag": root_tag.hex()}
        if log_seq:
            doc["log_seq"], doc["log_tag"] = log_seq, log_tag.hex()
        doc["mac"] = self._mac(counter, root_tag, log_seq, log_tag)
        _write_doc(self.dir, self.name, doc)


def pin_name(store: Path) -> str:
    """The state file that pins which store lives at ``store`` (by its real path)."""
    real = os.fsencode(os.path.realpath(store))
    return f"store-{hashlib.sha256(real).hexdigest()[:32]}.pin"


def pin_store(state_dir: Path, store: Path, fs_id: bytes, *, accept_new: bool = False) -> None:
    """Remember that ``store`` holds filesystem ``fs_id``; refuse another one there.

    ``<state dir>/store-<sha256 of the real path>.pin`` holds ``{"path", "fs_id"}``.
    The first use of a path pins what it finds (as the commit state does);
    ``accept_new`` re-pins a path whose store was replaced on purpose.
    """
    real = os.path.realpath(store)
    name = pin_name(store)
    with HostDir.open(state_dir, follow=True) as where:
        doc = _read_doc(where, name)
    if doc is not None and not accept_new:
        pinned = doc.get("fs_id")
        if not isinstance(pinned, str) or doc.get("path") != real:
            raise IntegrityError(f"trusted state {state_dir}/{name} is unreadable")
        if pinned == fs_id.hex():
            return
        raise IntegrityError(
            f"{store}: holds SEFS {fs_id.hex()}, but SEFS {pinned} was here before "
            "(replaced?); accept the new store explicitly (--accept-new-store) to use it"
        )
    _write_doc(state_dir, name, {"path": real, "fs_id": fs_id.hex()})


class DirLock:
    """Exclusive use of one SEFS directory by one process (and its forked server)."""

    def __init__(self, directory: HostDir) -> None:
        self._dir = directory
        self.path = Path(directory.path) / LOCK_NAME
        self._fd: int | None = None
        self._writable = True

    def acquire(self, read_only: bool = False) -> None:
        """Take the lock; ``read_only``: the holder will not write to the store.

        On read-only host storage the lock file is opened read-only (``flock``
        needs no write access) and keeps no pid; a holder that means to write
        is refused there, before it starts.
        """
        try:
            fd = self._dir.open_file(LOCK_NAME, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            if exc.errno != errno.EROFS:
                raise
            if not read_only:
                raise OcclumfsError(
                    f"{self.path.parent}: the store is on a read-only filesystem"
                    " (only 'mount --ro' and 'fsck' can open it)"
                ) from None
            fd = self._dir.open_file(LOCK_NAME, os.O_RDONLY)
            self._writable = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _pid_in(fd) or "unknown"
            os.close(fd)
            raise InUseError(
                f"{self.path.parent} is in use by pid {holder} (mounted or being checked)"
            ) from None
        old = _pid_in(fd)
        if old and old != str(os.getpid()):
            log.info("recovered a stale lock of %s left by pid %s", self.path.parent, old)
        self._fd = fd
        self.write_pid()

    def write_pid(self) -> None:
        if self._fd is not None and self._writable:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def _pid_in(fd: int) -> str:
    """The pid a lock file names, as printable text (the file is the host's to forge)."""
    words = os.pread(fd, 32, 0).decode(errors="replace").split()
    return "".join(c for c in words[0] if c.isprintable())[:20] if words else ""
