"""Key files in the format of ``occlum gen-image-key``: 16 bytes as hex pairs joined by ``-``.

    c7-32-b3-ed-44-df-ec-7b-25-2d-9a-32-38-8d-58-61

A key file holds that one line (a trailing newline is allowed) and is created
with mode 0600. Loading fails with one line saying which file and what is wrong,
never echoing key material.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from occlumfs.errors import FormatError, NotFoundError, OcclumfsError

KEY_BYTES = 16
_KEY_RE = re.compile(rf"^[0-9a-fA-F]{{2}}(-[0-9a-fA-F]{{2}}){{{KEY_BYTES - 1}}}$")


def generate_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def format_key(key: bytes) -> str:
    if len(key) != KEY_BYTES:
        raise ValueError(f"an image key has {KEY_BYTES} bytes, not {len(key)}")
    return "-".join(f"{b:02x}" for b in key)


def parse_key(text: str, where: str = "key") -> bytes:
    line = text.strip()
    if not _KEY_RE.match(line):
        raise FormatError(
            f"{where}: not an image key (expected {KEY_BYTES} hex bytes joined by '-', "
            "as written by 'occlumfs keygen')"
        )
    return bytes.fromhex(line.replace("-", ""))


def write_key_file(path: Path, key: bytes | None = None, *, overwrite: bool = False) -> bytes:
    """Write a new key file (mode 0600) atomically; refuse to replace one unless asked."""
    key = generate_key() if key is None else key
    path = Path(path)
    if path.exists() and not overwrite:
        raise OcclumfsError(f"{path}: already exists; not overwriting a key")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileNotFoundError:
        raise NotFoundError(f"{path}: directory {path.parent} does not exist") from None
    except OSError as exc:
        raise OcclumfsError(f"{path}: cannot write the key file: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(format_key(key) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return key


def load_key_file(path: Path) -> bytes:
    path = Path(path)
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(4096)
    except FileNotFoundError:
        raise NotFoundError(f"{path}: key file not found") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, not a key file") from None
    except PermissionError:
        raise OcclumfsError(f"{path}: permission denied reading the key file") from None
    return parse_key(text, str(path))
