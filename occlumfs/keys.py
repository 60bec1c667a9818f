"""Key files in the format of ``occlum gen-image-key``: 16 bytes as hex pairs joined by ``-``.

    c7-32-b3-ed-44-df-ec-7b-25-2d-9a-32-38-8d-58-61

A key file holds that one line (a trailing newline is allowed) and is created
with mode 0600. Loading fails with one line saying which file and what is wrong,
never echoing key material.

:func:`hkdf_sha256` is the one subkey derivation of the project: every purpose
gets its own subkey under a readable ``info`` string (SEFS and image keys alike).
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from occlumfs.errors import FormatError, IntegrityError, NotFoundError, OcclumfsError
from occlumfs.hostio import HostDir, read_named_file

KEY_BYTES = 16
_KEY_RE = re.compile(rf"^[0-9a-fA-F]{{2}}(-[0-9a-fA-F]{{2}}){{{KEY_BYTES - 1}}}$")


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes | str, length: int = 32) -> bytes:
    """The subkey of ``ikm`` for the purpose named by ``info`` (HKDF-SHA256, RFC 5869)."""
    if isinstance(info, str):
        info = info.encode()
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


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
    try:
        with HostDir.open(path.parent, follow=True) as parent:
            parent.replace_file(path.name, (format_key(key) + "\n").encode())
    except NotFoundError:
        raise NotFoundError(f"{path}: directory {path.parent} does not exist") from None
    except IntegrityError:
        raise  # something other than a lone regular file is at the path: named in the message
    except OSError as exc:
        raise OcclumfsError(f"{path}: cannot write the key file: {exc.strerror}") from None
    return key


def load_key_file(path: Path) -> bytes:
    path = Path(path)
    raw = read_named_file(path, "key file", limit=4096)
    return parse_key(raw.decode("ascii", errors="replace"), str(path))
