"""What SEFS keeps outside the untrusted directory, and who may use the directory.

* :class:`TrustedState`: the last committed counter and root tag, MAC'd, in a
  trusted place (not inside the SEFS directory), so rolling the whole directory
  back to an older snapshot is caught.
* :class:`DirLock`: an ``flock`` on ``DIR/lock`` held for as long as the
  filesystem is open. The lock belongs to the open file description, so it
  survives the mount's fork into the background and vanishes when the server
  dies; a lock file left by a crash is then just a file, recovered silently.
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import json
import logging
import os
import struct
from pathlib import Path

from occlumfs.errors import IntegrityError, InUseError
from occlumfs.sefs.format import LOCK_NAME

log = logging.getLogger("occlumfs.sefs")

STATE_ENV = "OCCLUMFS_STATE_DIR"


def default_state_dir() -> Path:
    env = os.environ.get(STATE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "occlumfs" / "sefs"


class TrustedState:
    """``<state dir>/<fs id>.json``: the newest (counter, root tag) this machine committed."""

    def __init__(self, state_dir: Path, fs_id: bytes, mac_key: bytes) -> None:
        self.path = Path(state_dir) / f"{fs_id.hex()}.json"
        self._fs_id = fs_id
        self._key = mac_key

    def _mac(self, counter: int, root_tag: bytes) -> str:
        msg = self._fs_id + struct.pack(">Q", counter) + root_tag
        return hmac.digest(self._key, msg, "sha256").hex()

    def load(self) -> tuple[int, bytes] | None:
        """The pinned (counter, root tag), None when there is no state; tampering raises."""
        try:
            doc = json.loads(self.path.read_text())
            counter, tag = int(doc["counter"]), bytes.fromhex(doc["root_tag"])
            mac = doc["mac"]
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise IntegrityError(f"trusted state {self.path} is unreadable: {exc}") from None
        if not hmac.compare_digest(mac, self._mac(counter, tag)):
            raise IntegrityError(f"trusted state {self.path}: MAC check failed")
        return counter, tag

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

    def update(self, counter: int, root_tag: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc = {
            "fs_id": self._fs_id.hex(),
            "counter": counter,
            "root_tag": root_tag.hex(),
            "mac": self._mac(counter, root_tag),
        }
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(doc) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class DirLock:
    """Exclusive use of one SEFS directory by one process (and its forked server)."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InUseError(
                f"{self.path.parent} is in use by pid {holder} (mounted or being checked)"
            ) from None
        old = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if old and old != str(os.getpid()):
            log.info("recovered a stale lock of %s left by pid %s", self.path.parent, old)
        self._fd = fd
        self.write_pid()

    def write_pid(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None
